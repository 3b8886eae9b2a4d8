"""Kernels on hand-made inputs whose answers are known: a tiny network whose every kernel use is
written out, top-k and set similarity against brute force, the like-for-like default layers on
layer lists made by hand, blending marks and the pruning curve against a loop. Fast: no training."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsviz import WsvizError
from wsviz.analysis.kernels import (
    KernelLayer,
    _variations,
    blending_extremes,
    blending_pruning_curve,
    blending_weights,
    default_layers,
    kernel_layers,
    kernel_set_comparisons,
    kernel_set_similarity,
    layer_weight,
    random_kernel_similarity,
    random_similarity_null,
    top_k_kernels,
)


class Rates(nn.Module):
    """One weight applied at two dilations (an msws-style shared layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1, dilation=1) + F.conv2d(x, self.weight, padding=2, dilation=2)


class Borrow(nn.Module):
    """Applies another module's weight here (not registered: the parameter stays that module's)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        object.__setattr__(self, "conv", conv)

    def forward(self, x):
        return F.conv2d(x, self.conv.weight, padding=1)


class Pair(nn.Module):
    """Two weights at one place: ``a`` once, ``b`` at two dilations; outputs concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        return torch.cat([F.conv2d(x, self.a, padding=1),
                          F.conv2d(x, self.b, padding=1) + F.conv2d(x, self.b, padding=2, dilation=2)], 1)


class Chain(nn.Module):
    """Two weights at one place that cannot be stacked: their input channels differ."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, 5, 3, 3))
        self.b = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.a, padding=1), self.b, padding=1)


class Net(nn.Module):
    """``late`` is defined first but runs second, three times (twice itself, once borrowed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wsviz_config = {"in_channels": 2, "input_size": 8, "num_classes": 3}
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.early = nn.Conv2d(2, 4, 3, padding=1)
        self.borrow = Borrow(self.late)
        self.point = nn.Conv2d(4, 4, 1)
        self.wide = nn.Conv2d(4, 3, (3, 5), padding=(1, 2))
        self.rates = Rates()
        self.pair = Pair()
        self.chain = Chain()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.late(self.late(self.early(x)))
        x = self.point(self.borrow(x))
        x = self.chain(self.pair(self.rates(self.wide(x))))
        return self.fc(x.mean((2, 3)))


class Flip(nn.Module):
    """Its weight applied mirrored: derived from the parameter, not stored as applied."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight.flip(-1), padding=1)


class Buffers(nn.Module):
    """Two kernel sets that are no parameter (buffers) applied at one place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("u", torch.randn(2, 2, 3, 3))
        self.register_buffer("v", torch.randn(1, 2, 3, 3))

    def forward(self, x):
        return torch.cat([F.conv2d(x, self.u, padding=1), F.conv2d(x, self.v, padding=1)], 1)


class Odd(nn.Module):
    """A 2x2 conv, a conv of one weight, a derived weight, buffers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.wsviz_config = {"in_channels": 1, "input_size": 6, "num_classes": 2}
        self.one = nn.Conv2d(1, 1, 1, bias=False)
        self.small = nn.Conv2d(1, 2, 2, padding=1)
        self.flip = Flip()
        self.bufs = Buffers()

    def forward(self, x):
        return self.bufs(self.flip(self.small(self.one(x)))).mean((2, 3))[:, :2]


def L(name: str, kernel=(3, 3), shared: bool = False, **kw) -> KernelLayer:  # noqa: N802 - reads like a table row
    return KernelLayer(name, (4, 4, *kernel), False, 2 if shared else 1, factor=2.0 if shared else 1.0, **kw)


# ---------------------------------------------------------------------------- kernel layers
def test_kernel_layers_of_a_network_written_out():
    m = Net()
    got = {k.name: k for k in kernel_layers(m)}
    assert list(got) == ["early", "late", "borrow", "wide", "rates", "pair", "chain"]  # forward order, no 1x1
    # depth: convolutions on the longest path from the input (late runs twice: its deeper application counts)
    assert got["early"] == KernelLayer("early", (4, 2, 3, 3), False, 1, ("early.weight",), "direct", 1.0,
                                       ("early",), (), 1, ((4, 1),))
    assert got["late"] == KernelLayer("late", (4, 4, 3, 3), False, 3, ("late.weight",), "direct", 3.0,
                                      ("late", "borrow"), (), 3, ((4, 2),))  # twice here
    assert got["borrow"] == KernelLayer("borrow", (4, 4, 3, 3), False, 3, ("late.weight",), "direct", 3.0,
                                        ("late", "borrow"), (), 4, ((4, 1),))
    assert got["wide"].shape == (3, 4, 3, 5) and got["wide"].kernel == (3, 5) and got["wide"].uses == 1
    assert got["wide"].menu_label() == "wide · 3x4 3x5"
    assert got["rates"] == KernelLayer("rates", (3, 3, 3, 3), False, 2, ("rates.weight",), "direct", 2.0, ("rates",),
                                       ("padding=1 dilation=1", "padding=2 dilation=2"), 7, ((3, 2),))  # point (1x1): 5
    # two weights at one place: their kernels stacked, uses the most of either, factor pooled over both
    assert got["pair"] == KernelLayer("pair", (5, 3, 3, 3), False, 2, ("pair.a", "pair.b"), "direct",
                                      (54 + 2 * 81) / (54 + 81), ("pair",),
                                      ("padding=1 dilation=1", "padding=2 dilation=2"), 8, ((2, 1), (3, 2)))
    assert got["chain"].shape == (4, 5, 3, 3) and got["chain"].params == ("chain.a", "chain.b")
    assert got["chain"].depth == 10 and got["wide"].depth == 6  # chain's two convs in a row
    assert [k.name for k in kernel_layers(m, min_size=1)] == ["early", "late", "borrow", "point", "wide", "rates",
                                                              "pair", "chain"]
    assert [k.name for k in kernel_layers(m, min_size=4)] == []  # the 3x5 kernel's smaller side is 3


def test_kernel_layers_of_odd_places():
    m = Odd()
    got = {k.name: k for k in kernel_layers(m)}
    assert list(got) == ["small", "flip"]  # 2x2 kernels count by default; buffers are no stored weights
    assert got["flip"] == KernelLayer("flip", (2, 2, 3, 3), True, 1, ("flip.weight",), "derived", 1.0, ("flip",), (),
                                      3, ((2, 1),))
    assert got["flip"].menu_label() == "flip · 2x2 3x3"
    one = kernel_layers(m, min_size=1)[0]
    assert (one.name, one.shape, one.factor, one.shared) == ("one", (1, 1, 1, 1), 1.0, False)
    assert torch.equal(layer_weight(m, "bufs"), torch.cat([m.bufs.u, m.bufs.v]))  # two tensors of no parameter
    assert torch.equal(layer_weight(m, "flip"), m.flip.weight.detach().flip(-1))  # as applied


def test_variations_name_what_differs_between_applications():
    assert _variations([]) == () and _variations(["", ""]) == ()
    assert _variations(["stride=1 dilation=1", "stride=1 dilation=1"]) == ()  # the same settings twice
    assert _variations(["stride=1 dilation=1", "", "stride=1 dilation=2", "stride=1 dilation=1"]) == (
        "dilation=1", "dilation=2")
    assert _variations(["a=1 b=2 c=x=y", "a=2 b=2 c=x=z"]) == ("a=1 c=x=y", "a=2 c=x=z")
    assert _variations(["a=1 b=1", "a=1 b=2 c=3"]) == ("b=1", "b=2")  # keys of the first application
    assert _variations(["c=x=y", "c=w=y"]) == ("c=x=y", "c=w=y")  # split at the first "="


def test_layer_weight_by_parameter_place_or_message():
    m = Net()
    assert torch.equal(layer_weight(m, "late.weight"), m.late.weight.detach())
    assert not layer_weight(m, "late.weight").requires_grad
    assert torch.equal(layer_weight(m, "late"), m.late.weight.detach())  # applied twice here: once
    assert torch.equal(layer_weight(m, "borrow"), m.late.weight.detach())
    assert torch.equal(layer_weight(m, "rates"), m.rates.weight.detach())  # two dilations, one set of kernels
    assert torch.equal(layer_weight(m, "pair"), torch.cat([m.pair.a, m.pair.b]).detach())
    assert torch.equal(layer_weight(m, "pair.b"), m.pair.b.detach())
    names = "early, late, borrow, wide, rates, pair, chain"
    for bad in ("chain", "fc.weight", "fc", "nope", "point.bias"):  # not stackable, 2-D, no kernels, unknown
        with pytest.raises(WsvizError) as e:
            layer_weight(m, bad)
        assert str(e.value) == f"{bad!r} is not a conv layer of this model; choose one of: {names}"


def test_layer_weight_message_lists_twelve_layers_at_most():
    class Many(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.wsviz_config = {"in_channels": 1, "input_size": 4, "num_classes": 1}
            self.convs = nn.ModuleList(nn.Conv2d(1, 1, 3, padding=1) for _ in range(n))

        def forward(self, x):
            for c in self.convs:
                x = c(x)
            return x.mean((1, 2, 3))[:, None]

    with pytest.raises(WsvizError) as e:
        layer_weight(Many(13), "x")
    assert str(e.value).endswith(": " + ", ".join(f"convs.{i}" for i in range(12)) + " ...")
    with pytest.raises(WsvizError) as e:
        layer_weight(Many(12), "x")
    assert str(e.value).endswith(": " + ", ".join(f"convs.{i}" for i in range(12)))


# ------------------------------------------------------------------------------ describe
def test_kernel_layer_words():
    assert not L("a").shared and L("a", shared=True).shared
    assert not KernelLayer("a", (1, 1, 3, 3), False, 1, factor=1 + 1e-9).shared
    assert KernelLayer("a", (1, 1, 3, 3), False, 1, factor=1 + 1e-8).shared
    assert KernelLayer("a", (1, 1, 3, 5), False, 1).kernel == (3, 5)
    tiled = KernelLayer("t", (16, 1, 3, 3), True, 1, ("p", "q"), "tiled", 4.0)
    assert tiled.describe() == "16x1x3x3 realised by tiling parameter(s) p, q: each stored weight applied 4x"
    assert tiled.menu_label() == "t · 16x1 3x3 · tiled ×4"
    basis = KernelLayer("e", (8, 2, 5, 5), True, 1, ("c", "d"), "expanded", 12.5)
    assert basis.describe() == "8x2x5x5 filters expanded from a basis (c, d): each learned coefficient applied 12.5x"
    assert basis.menu_label() == "e · 8x2 5x5 · basis ×12.5"
    derived = KernelLayer("d", (8, 2, 3, 3), True, 1, ("c",), "derived", 1.0)
    assert derived.menu_label() == "d · 8x2 3x3"
    assert derived.describe() == "8x2x3x3, applied once per forward pass (not shared)"
    plain = KernelLayer("p", (4, 2, 3, 3), False, 1)
    assert plain.describe() == "4x2x3x3, applied once per forward pass (not shared)"
    assert plain.menu_label() == "p · 4x2 3x3"
    own = KernelLayer("o", (4, 2, 3, 3), False, 1, variations=("dilation=1", "dilation=2"))
    assert own.describe() == "4x2x3x3, not shared: its own kernels at each of dilation=1, dilation=2"


def test_shared_kernel_layer_words():
    here = KernelLayer("s", (4, 4, 3, 3), False, 2, factor=2.0, sites=("s",))
    assert here.describe() == "4x4x3x3, shared: applied 2x per forward pass here"
    assert here.menu_label() == "s · 4x4 3x3 · shared ×2"
    rates = KernelLayer("s", (4, 4, 3, 3), False, 2, factor=2.0, sites=("s",), variations=("dilation=1", "dilation=2"))
    assert rates.describe() == "4x4x3x3, shared: applied 2x per forward pass here (dilation=1, dilation=2)"
    three = KernelLayer("b", (4, 4, 3, 3), False, 4, sites=("a", "b", "c", "d"), factor=4.0)
    assert three.describe() == "4x4x3x3, shared: applied 4x per forward pass here and at a, c, d"
    many = KernelLayer("b", (4, 4, 3, 3), False, 6, sites=("a", "b", "c", "d", "e", "f"), factor=6.0)
    assert many.describe() == "4x4x3x3, shared: applied 6x per forward pass here and at a, c, d and 2 more"
    four = KernelLayer("b", (4, 4, 3, 3), False, 5, sites=("a", "b", "c", "d", "e"), factor=5.0)
    assert four.describe() == "4x4x3x3, shared: applied 5x per forward pass here and at a, c, d and 1 more"


# -------------------------------------------------------------------------- default layers
def test_default_layers_like_for_like():
    assert default_layers({}) == {}
    assert default_layers({"a": []}) == {}
    a = [L("a1"), L("a2", shared=True), L("a3"), L("a4", (1, 1))]
    b = [L("b1"), L("b2"), L("b3"), L("b4"), L("b5", (1, 1))]
    c = [L("c1", (5, 5)), L("c2", (5, 5), shared=True), L("c3", (5, 5))]
    d = [L("d1")]
    e = [L("e1", (1, 1), shared=True), L("e2", (1, 1))]
    f = [L("a1"), L("a2"), L("a3"), L("a4", (1, 1))]  # a's twin: the same skeleton
    g = [L("a2"), L("a9")]  # a path of a, but another skeleton: no same place
    # a and its twin f show a's shared a2; every other model (another skeleton) its own deepest layer,
    # preferring a shared one of 3x3 or more: b its last 3x3, c its shared 5x5, d the one it has, e (no kernel
    # of 3 or more) its shared 1x1, g its last
    got = default_layers({"a": a, "b": b, "c": c, "d": d, "e": e, "f": f, "g": g, "h": []})
    assert got == {"a": "a2", "b": "b4", "c": "c2", "d": "d1", "e": "e1", "f": "a2", "g": "a9"}


def test_default_layers_prefer_a_shared_big_layer_within_each_skeleton():
    plain = [L("p1"), L("p2"), L("p3")]
    shared = [L("s1", shared=True), L("s2"), L("s3")]
    twin = [L("s1"), L("s2"), L("s3")]  # shared's skeleton: it shows the place shared is shared at
    assert default_layers({"plain": plain, "shared": shared}) == {"plain": "p3", "shared": "s1"}
    assert default_layers({"twin": twin, "shared": shared}) == {"twin": "s1", "shared": "s1"}
    only_small = [L("q1", (1, 1), shared=True), L("q2")]  # its shared layer is 1x1: not preferred
    assert default_layers({"small": only_small, "shared": shared}) == {"small": "q2", "shared": "s1"}
    assert default_layers({"plain": plain, "again": [L("x1"), L("x2")]}) == {"plain": "p3", "again": "x2"}
    deep_shared = [L("s1", shared=True), L("s2", shared=True), L("s3")]
    assert default_layers({"m": deep_shared}) == {"m": "s2"}  # the deepest shared one
    bigger = [L("k1", (5, 5), shared=True), L("k2", (3, 3), shared=True), L("k3", (2, 2), shared=True)]
    assert default_layers({"m": bigger}) == {"m": "k2"}  # 3x3 counts as big, 2x2 does not


def test_default_layers_of_models():
    m = Net()
    assert default_layers({"a": m, "b": Net()}) == {"a": "pair", "b": "pair"}  # the deepest shared 3x3 place
    assert default_layers({"a": kernel_layers(m)}) == {"a": "pair"}


# -------------------------------------------------------------------------------- top k
def test_top_k_kernels_against_sorting():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 15, 3, 2, generator=g, dtype=torch.float64)
    mags = [(float(w[o, i].abs().sum()), o, i) for o in range(20) for i in range(15)]
    want = sorted(mags, reverse=True)
    top = top_k_kernels(w, 7)
    assert top.out_index.tolist() == [o for _, o, _ in want[:7]]
    assert top.in_index.tolist() == [i for _, _, i in want[:7]]
    np.testing.assert_allclose(top.magnitude, [m for m, _, _ in want[:7]], rtol=1e-6)
    assert top.kernels.dtype == np.float32 and top.kernels.shape == (7, 3, 2)
    for j, (_, o, i) in enumerate(want[:7]):
        np.testing.assert_array_equal(top.kernels[j], w[o, i].float().numpy())
    assert len(top_k_kernels(w).magnitude) == 256  # k = 256 by default
    assert top_k_kernels(w[:2]).out_index.tolist() == [o for _, o, _ in sorted(
        [m for m in mags if m[1] < 2], reverse=True)]  # fewer than k kernels: all of them


def tiled(stored: torch.Tensor, reps: tuple[int, int]) -> torch.Tensor:
    """A RepeatNet-style layer: the stored (o, i, kh, kw) kernels repeated over (out, in) blocks."""
    return stored.repeat(reps[0], reps[1], 1, 1)


def test_top_k_distinct_kernels_of_a_tiled_layer():
    """Tiling repeats each stored kernel: the k strongest positions show the same kernel several times, the
    distinct view each one once, at its first position, with how many positions apply it."""
    g = torch.Generator().manual_seed(1)
    stored = torch.randn(3, 2, 3, 3, generator=g)
    w = tiled(stored, (2, 3))  # 6 x 6 positions, 6 different kernels, each at 6 positions
    plain = top_k_kernels(w, 12)
    assert plain.repeated == 10 and plain.copies.tolist() == [6] * 12  # 12 positions, 2 different kernels, 6 each
    top = top_k_kernels(w, 12, distinct=True)
    assert len(top.kernels) == 6 and top.repeated == 0 and top.copies.tolist() == [6] * 6
    mags = sorted(((float(stored[o, i].abs().sum()), o, i) for o in range(3) for i in range(2)), reverse=True)
    assert top.out_index.tolist() == [o for _, o, _ in mags] and top.in_index.tolist() == [i for _, _, i in mags]
    for j, (_, o, i) in enumerate(mags):  # the first position of each kernel is its stored one
        np.testing.assert_array_equal(top.kernels[j], stored[o, i].numpy())
    np.testing.assert_allclose(top.magnitude, [m for m, _, _ in mags], rtol=1e-6)


def test_top_k_distinct_is_top_k_of_the_unique_kernels():
    """Against brute force on a weight mixing unique and repeated kernels, zeros of both signs included."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, 2, 2, generator=g)
    w[1, 1], w[3, 2], w[4, 0] = w[0, 0], w[0, 0], w[2, 3]  # three copies of one kernel, two of another
    w[0, 3], w[2, 0] = torch.zeros(2, 2), -torch.zeros(2, 2)  # 0.0 and -0.0: one kernel
    positions = {}
    for o in range(5):
        for i in range(4):
            positions.setdefault(tuple((w[o, i] + 0.0).flatten().tolist()), []).append((o, i))
    want = sorted(((sum(map(abs, key)), -p[0][0], -p[0][1], len(p)) for key, p in positions.items()), reverse=True)
    top = top_k_kernels(w, 100, distinct=True)
    assert len(top.kernels) == len(positions) == 16  # 20 positions, 4 of them copies
    np.testing.assert_allclose(top.magnitude, [m for m, *_ in want], rtol=1e-6)
    assert sorted(top.copies.tolist()) == sorted(len(p) for p in positions.values())
    assert top.copies.sum() == 20
    by_first = {(int(o), int(i)): int(n) for o, i, n in zip(top.out_index, top.in_index, top.copies)}
    assert by_first[(0, 0)] == 3 and by_first[(2, 3)] == 2 and by_first[(0, 3)] == 2
    assert top_k_kernels(w, 4, distinct=True).magnitude.tolist() == top.magnitude[:4].tolist()


def test_top_k_distinct_on_the_shipped_tiled_repeatnet():
    """The claim the Kernels page's caption rests on: on scale-repeatnet-linear's default layer only 16 of the
    64 strongest positions hold different kernels; the distinct view shows 64 different ones, each applied at
    4 positions (the layer tiles its stored block 4 times)."""
    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "scale-repeatnet-linear"
    if not (folder / "card.json").is_file():
        pytest.skip("needs the shipped scale-repeatnet-linear")
    from wsviz.training.checkpoint import load_checkpoint

    m, _ = load_checkpoint(folder)
    w = layer_weight(m, "trunk.stages.3.1.conv2")
    assert top_k_kernels(w, 64).repeated == 48
    top = top_k_kernels(w, 64, distinct=True)
    flat = top.kernels.reshape(64, -1)
    assert len(np.unique(flat, axis=0)) == 64 and set(top.copies.tolist()) == {4}


def test_top_k_kernels_message():
    with pytest.raises(WsvizError) as e:
        top_k_kernels(torch.zeros(3, 3, 3))
    assert str(e.value) == "Expected a (out, in, kh, kw) conv weight, got shape (3, 3, 3)."


# ---------------------------------------------------------------------------- similarity
def test_kernel_set_comparisons_say_why_a_pair_is_not_compared():
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((8, 3, 3)), rng.standard_normal((5, 3, 3)), rng.standard_normal((8, 5, 5))
    rows = {(r["A"], r["B"]): r for r in kernel_set_comparisons({"a": a, "b": b, "c": c})}
    assert set(rows) == {("a", "b"), ("a", "c"), ("b", "c")}  # every pair has a row
    ab = rows[("a", "b")]  # a distinct view may show fewer kernels: the strongest 5 of each are compared
    assert ab["kernels compared"] == 5
    assert ab["similarity"] == round(kernel_set_similarity(a[:5], b), 4)
    null = random_similarity_null(5, 3, 3)  # the null of 200 random pairs of 5 kernels: its mean and 95th percentile
    assert ab["two random sets"] == round(null.mean, 4) and ab["random, 95th percentile"] == round(null.critical, 4)
    assert ab["p (one-sided)"] == round(null.p_value(kernel_set_similarity(a[:5], b)), 4)
    assert rows[("a", "c")]["two random sets"] is None and rows[("a", "c")]["p (one-sided)"] is None
    assert rows[("a", "c")]["similarity"] is None and rows[("a", "c")]["reading"] == \
        "not compared: 3x3 kernels against 5x5"
    same = kernel_set_comparisons({"x": a, "y": -a[::-1]})[0]
    assert same["similarity"] == 1.0 and same["reading"] == "more alike than chance"



def _brute_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cos = np.abs((a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T)
    if len(a) <= len(b):
        return max(np.mean([cos[i, j] for i, j in enumerate(p)]) for p in itertools.permutations(range(len(b)), len(a)))
    return max(np.mean([cos[i, j] for j, i in enumerate(p)]) for p in itertools.permutations(range(len(a)), len(b)))


@pytest.mark.parametrize("na,nb,seed", [(4, 4, 0), (3, 5, 1), (5, 3, 2), (4, 4, 3)])
def test_kernel_set_similarity_is_the_best_matching(na, nb, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((na, 2, 3)), rng.standard_normal((nb, 2, 3))
    assert kernel_set_similarity(a, b) == pytest.approx(_brute_similarity(a, b), rel=1e-12)
    assert kernel_set_similarity(a, -3 * a[::-1]) == pytest.approx(1.0)


def test_kernel_set_similarity_computes_in_double_precision():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((4, 3, 3)).astype(np.float32), rng.standard_normal((4, 3, 3)).astype(np.float32)
    want = _brute_similarity(a.astype(np.float64), b.astype(np.float64))
    assert abs(kernel_set_similarity(a, b) - want) < 1e-13
    assert abs(kernel_set_similarity(a.tolist(), b) - want) < 1e-13  # any array-like


def test_kernel_set_similarity_zero_kernel_and_message():
    a = np.zeros((2, 3, 3))
    a[1, 1, 1] = 2.0
    assert kernel_set_similarity(a, a) == pytest.approx(0.5)  # the zero kernel matches nothing, not NaN
    with pytest.raises(WsvizError) as e:
        kernel_set_similarity(np.ones((2, 3, 3)), np.ones((2, 2, 2)))
    assert str(e.value) == "Kernel sets differ in kernel size (9 vs 4 weights)."
    tiny = np.full((1, 1, 2), 1e-300)  # norms below 1e-12 are divided by 1e-12: cosines of tiny kernels shrink
    assert kernel_set_similarity(tiny, tiny) == pytest.approx(0.0, abs=1e-200)


def test_random_kernel_similarity_is_the_mean_over_trials_of_one_stream():
    def ref(k, kh, kw, seed, trials):
        rng = np.random.default_rng(seed)
        return np.mean([kernel_set_similarity(rng.standard_normal((k, kh, kw)), rng.standard_normal((k, kh, kw)))
                        for _ in range(trials)])

    assert random_kernel_similarity(6, 3, 2) == pytest.approx(ref(6, 3, 2, 0, 5), rel=1e-12)
    assert random_kernel_similarity(6, 3, 2, seed=4, trials=2) == pytest.approx(ref(6, 3, 2, 4, 2), rel=1e-12)
    assert random_kernel_similarity(6, 3, 2, seed=4, trials=2) != pytest.approx(ref(6, 3, 2, 4, 3), rel=1e-9)


# ----------------------------------------------------------------------------- blending
class Blended(nn.Module):
    """Two 1x1 blending layers between a conv and a linear head (every pixel counts: no pooling)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.wsviz_config = {"in_channels": 1, "input_size": 6, "num_classes": 4}
        self.conv = nn.Conv2d(1, 6, 3)
        self.b1 = nn.Conv2d(6, 5, 1, bias=False)
        self.b2 = nn.Conv2d(5, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def blending_layers(self):
        return [self.b1, self.b2]

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.conv(x))).flatten(1))


def test_blending_weights_and_their_messages():
    m = Blended()
    ws = blending_weights(m)
    assert [w.shape for w in ws] == [(5, 6), (6, 5)]
    np.testing.assert_array_equal(ws[1], m.b2.weight.detach()[:, :, 0, 0].numpy())
    msg = ("This model has no blending layers; they exist in ShaRDNet's SL variants (shardnet_vgg kind='SL', "
           "sl_resnet34/50).")
    for bad in (Net(), type("Empty", (nn.Module,), {"blending_layers": lambda self: []})()):
        with pytest.raises(WsvizError) as e:
            blending_weights(bad)
        assert str(e.value) == msg
        with pytest.raises(WsvizError) as e:
            blending_pruning_curve(bad, torch.zeros(1, 1, 6, 6), torch.zeros(1, dtype=torch.long))
        assert str(e.value) == msg


@pytest.mark.parametrize("cols,n,want", [(10, 3, 3), (10, 7, 5), (70, None, 32), (9, 4, 4), (1, 3, 0)])
def test_blending_extremes_by_sorting(cols, n, want):
    rng = np.random.default_rng(cols)
    w = rng.standard_normal((4, cols))
    marks = blending_extremes(w) if n is None else blending_extremes(w, n)
    assert marks.dtype == np.int8 and marks.shape == w.shape
    for row, mark in zip(w, marks):
        order = sorted(range(cols), key=lambda j: abs(row[j]))
        expect = np.zeros(cols, dtype=np.int8)
        if want:
            expect[order[:want]] = -1
            expect[order[-want:]] = 1
        np.testing.assert_array_equal(mark, expect)


def _accuracy_pruned(m: Blended, x, y, f: float) -> tuple[float, int]:
    saved = [layer.weight.detach().clone() for layer in m.blending_layers()]
    allw = sorted(float(v) for w in saved for v in w.abs().flatten())
    n = int(round(f * len(allw)))
    with torch.no_grad():
        for layer, w in zip(m.blending_layers(), saved):
            if n:
                layer.weight.copy_(torch.where(w.abs() <= allw[n - 1], torch.zeros_like(w), w))
        acc = float((m(x).argmax(1) == y).float().mean())
        for layer, w in zip(m.blending_layers(), saved):
            layer.weight.copy_(w)
    return acc, n


def test_blending_pruning_curve_against_a_loop():
    m = Blended()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = m(x).argmax(1)  # the unpruned model is right on every image
    before = [layer.weight.detach().clone() for layer in m.blending_layers()]
    fractions = (0.0, 0.3, 0.5, 0.8, 1.0)
    curve = blending_pruning_curve(m, x, y, fractions)
    assert curve.fractions.tolist() == list(fractions) and curve.fractions.dtype == np.float64
    want = [_accuracy_pruned(m, x, y, f) for f in fractions]
    assert curve.accuracy.tolist() == pytest.approx([a for a, _ in want])
    assert curve.pruned_weights.tolist() == [n for _, n in want] == [0, 18, 30, 48, 60]
    assert curve.accuracy[0] == 1.0 and len(set(curve.accuracy.tolist())) > 2
    assert all(torch.equal(layer.weight, w) for layer, w in zip(m.blending_layers(), before))
    default = blending_pruning_curve(m, x, y)
    assert default.fractions.tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95]
    assert default.pruned_weights.tolist() == [0, 12, 24, 36, 48, 54, 57]


def test_blending_pruning_curve_leaves_the_weights_alone_on_error():
    m = Blended()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError):  # 2.0 asks for more weights than there are, after 0.5 pruned half
        blending_pruning_curve(m, torch.rand(4, 1, 6, 6), torch.zeros(4, dtype=torch.long), (0.5, 2.0))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["scale-sharesnet", "scale-wsms-1x1", "scale-msws-shared", "scale-repeatnet-linear"])
def test_the_layer_menu_is_in_forward_order(name):
    """The Kernels page's menu says "places in forward order", and default_layers takes the later of two
    equally deep places: the order must be the order the forward pass reaches each place (pre-hooks record it), not
    the order the parameters were registered in (which put ShaResNet's conv2 before conv1)."""
    from wsviz.models import input_shape
    from wsviz.training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(Path(__file__).resolve().parents[1] / "checkpoints" / name)
    names = [k.name for k in kernel_layers(model)]
    modules, reached = dict(model.named_modules()), []
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: reached.append(n) if n not in reached else None)
             for n in names]
    c, h, w = input_shape(model)
    with torch.no_grad():
        model.eval()(torch.rand(2, c, h, w))
    for hk in hooks:
        hk.remove()
    assert names == reached


def test_default_layers_pick_the_last_shared_conv_of_each_variant():
    """ShaResNet's last conv is stages.2.2.conv2 (shared); msws's last shared 3x3 is trunk.stages.2.1.conv2."""
    from wsviz.training.checkpoint import load_checkpoint

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints"
    models = {k: load_checkpoint(ckpt / k)[0] for k in ("scale-sharesnet", "scale-msws-shared")}
    assert default_layers(models) == {"scale-sharesnet": "stages.2.2.conv2", "scale-msws-shared": "trunk.stages.2.1.conv2"}


# ------------------------------------------------------------------- positions: every application
def _positions_applied(model: nn.Module, site: str) -> dict[tuple, int]:
    """Brute force: every (out, in) kernel of every weight one forward pass applies at ``site``, counted."""
    from collections import Counter

    from wsviz.models import applied_weights

    kernels = torch.cat([w.reshape(-1, *w.shape[2:]) for w, _ in applied_weights(model, site) if w.ndim == 4])
    return Counter(tuple((kk.float() + 0.0).flatten().tolist()) for kk in kernels)


def _check_positions(model: nn.Module, site: str) -> set[int]:
    layer = next(x for x in kernel_layers(model) if x.name == site)
    top = top_k_kernels(layer_weight(model, site), 10_000, distinct=True, applied=layer.applications())
    want = _positions_applied(model, site)
    assert len(top.kernels) == len(want)  # every different kernel applied here, once
    assert [want[tuple((kk + 0.0).flatten().tolist())] for kk in top.kernels] == top.copies.tolist()
    return set(top.copies.tolist())


def test_positions_count_every_application_of_a_kernel_at_its_place():
    """Rates applies its one stored set at two dilations: each kernel at 2 (out, in) positions, though stored
    once; pair stacks a (once) over b (at two dilations); early runs once; late runs twice at its place."""
    m = Net()
    layers = {x.name: x for x in kernel_layers(m)}
    assert layers["rates"].blocks == ((3, 2),) and layers["rates"].applications().tolist() == [2, 2, 2]
    assert layers["pair"].blocks == ((2, 1), (3, 2)) and layers["pair"].applications().tolist() == [1, 1, 2, 2, 2]
    assert _check_positions(m, "rates") == {2}
    assert _check_positions(m, "pair") == {1, 2}
    assert _check_positions(m, "early") == {1}
    assert _check_positions(m, "late") == {2}
    assert L("hand-made").applications() is None
    with pytest.raises(WsvizError, match="applied gives 2 rows"):
        top_k_kernels(torch.zeros(3, 1, 3, 3), 4, distinct=True, applied=np.array([1, 2]))


@pytest.mark.parametrize(("name", "site", "want"), [
    ("scale-msws-shared", "trunk.stages.2.1.conv2", {2}),  # one stored set at rates 1 and 2: channels o and o + 32
    ("scale-msws-unshared", "trunk.stages.2.1.conv2", {1}),  # each rate its own set
    ("scale-repeatnet-linear", "trunk.stages.3.1.conv2", {4}),  # a stored block tiled 4 times
])
def test_positions_of_the_shipped_rate_shared_and_tiled_layers(name, site, want):
    from wsviz.training.checkpoint import load_checkpoint

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / name
    if not (folder / "card.json").is_file():
        pytest.skip(f"needs the shipped {name}")
    assert _check_positions(load_checkpoint(folder)[0], site) == want


def test_positions_are_true_with_each_kernel_once_off():
    """The k strongest positions, copies included: each row's 'positions' is still how many (out, in) positions
    apply that kernel here (not 1 for a kernel the layer repeats), the same as in the distinct view."""
    g = torch.Generator().manual_seed(3)
    w = tiled(torch.randn(3, 2, 3, 3, generator=g), (2, 3))  # every kernel at 6 positions
    assert top_k_kernels(w, 12).copies.tolist() == [6] * 12
    assert top_k_kernels(w, 12, applied=np.full(6, 2)).copies.tolist() == [12] * 12  # each row applied twice
    w = torch.randn(4, 3, 2, 2, generator=g)
    w[3, 2] = w[0, 1]  # one kernel at two positions, the others once
    top = top_k_kernels(w, 12)
    by_position = {(int(o), int(i)): int(n) for o, i, n in zip(top.out_index, top.in_index, top.copies)}
    assert by_position[(0, 1)] == by_position[(3, 2)] == 2 and sum(by_position.values()) == 12 + 2
    m = Net()
    layer = next(x for x in kernel_layers(m) if x.name == "pair")
    plain = top_k_kernels(layer_weight(m, "pair"), 100, applied=layer.applications())
    want = _positions_applied(m, "pair")
    assert plain.copies.tolist() == [want[tuple((kk + 0.0).flatten().tolist())] for kk in plain.kernels]
