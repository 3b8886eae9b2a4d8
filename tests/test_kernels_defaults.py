"""The Kernels page's default layers: twins (one skeleton) show the same place, variants of different
skeletons each their own deepest layer, by a measured depth (convolutions on the longest path from the
input), whatever the order they are chosen in; the page never calls two places of different skeletons
'the same place'. Hand-made networks whose depths are known, then the shipped checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-kdefaults-runs-"))

from conftest import needs, open_app  # noqa: E402

from wsviz.analysis.kernels import KernelLayer, default_layers, kernel_layers, skeleton, skeleton_groups  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"


def L(name: str, kernel=(3, 3), shared: bool = False, depth: int = 0) -> KernelLayer:  # noqa: N802 - a table row
    return KernelLayer(name, (4, 4, *kernel), False, 2 if shared else 1, factor=2.0 if shared else 1.0, depth=depth)


class Branches(nn.Module):
    """A deep branch (three convs, one skip) and a shallow one (one conv) that runs last, concatenated, then a 1x1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wsviz_config = {"in_channels": 1, "input_size": 8, "num_classes": 2}
        self.a1, self.a2, self.a3 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.b1 = nn.Conv2d(1, 2, 3, padding=1)
        self.mix = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.a1(x)
        a = self.a3(F.relu(self.a2(a)) + a)  # the skip does not shorten the longest path: a1, a2, a3
        return self.mix(torch.cat([a, self.b1(x)], 1)).mean((2, 3))


def test_depth_is_the_longest_convolution_path_from_the_input():
    layers = kernel_layers(Branches())
    assert [(k.name, k.depth) for k in layers] == [("a1", 1), ("a2", 2), ("a3", 3), ("b1", 1)]  # forward order
    assert default_layers({"m": layers}) == {"m": "a3"}  # the deepest, not the shallow branch's conv run last


def test_a_place_applied_twice_in_a_row_is_as_deep_as_its_deeper_application():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wsviz_config = {"in_channels": 1, "input_size": 6, "num_classes": 2}
            self.first, self.again = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.again(self.again(self.first(x))).mean((2, 3))

    assert [(k.name, k.depth) for k in kernel_layers(Twice())] == [("first", 1), ("again", 3)]


def test_a_path_name_in_both_models_is_no_match_when_their_skeletons_differ():
    short = [L("x"), L("y", shared=True)]
    long = [L("x"), L("y"), L("z")]  # y is its 2nd of 3 layers, not its last
    for order in ((("short", short), ("long", long)), (("long", long), ("short", short))):
        assert default_layers(dict(order)) == {"short": "y", "long": "z"}
    assert skeleton_groups({"short": short, "long": long, "none": []}) == [["short"], ["long"]]


def test_twins_show_the_same_position_whatever_their_order_and_their_path_numbers():
    plain = [L("f.0.conv"), L("f.1.conv"), L("f.3.conv")]
    renumbered = [L("f.0.conv", shared=True), L("f.2.conv", shared=True), L("f.5.conv")]  # SL-like: paths renumbered
    assert skeleton(plain) == skeleton(renumbered)
    want = {"plain": "f.1.conv", "renumbered": "f.2.conv"}  # the deepest position shared in one of them
    assert default_layers({"plain": plain, "renumbered": renumbered}) == want
    assert default_layers({"renumbered": renumbered, "plain": plain}) == want
    other_kernel = [L("f.0.conv"), L("f.1.conv", (5, 5)), L("f.3.conv")]
    assert skeleton(other_kernel) != skeleton(plain)


def test_deepest_is_measured_not_the_last_in_forward_order():
    branchy = [L("b0.1", shared=True, depth=4), L("b0.2", depth=5), L("b1.1", shared=True, depth=2)]
    assert default_layers({"m": branchy}) == {"m": "b0.1"}  # the deepest shared one, not the shared one run last
    assert default_layers({"m": [L("p", depth=3), L("q", depth=3)]}) == {"m": "q"}  # equally deep: the later


def _shipped(*names: str) -> dict[str, list[KernelLayer]]:
    from wsviz.training.checkpoint import load_checkpoint

    return {n: kernel_layers(load_checkpoint(CKPT / n)[0]) for n in needs(*names)}


def _position(layers: list[KernelLayer], name: str) -> tuple[int, int]:
    return [k.name for k in layers].index(name) + 1, len(layers)


def test_msws_and_repeatnet_each_show_their_last_conv_in_either_order():
    """They reuse the path trunk.stages.2.1.conv2: msws's 13th of 13 kernel layers, RepeatNet's 13th of 17."""
    layers = _shipped("scale-msws-shared", "scale-repeatnet-linear")
    want = {"scale-msws-shared": "trunk.stages.2.1.conv2", "scale-repeatnet-linear": "trunk.stages.3.1.conv2"}
    assert default_layers(layers) == want
    assert default_layers(dict(reversed(layers.items()))) == want
    assert _position(layers["scale-repeatnet-linear"], want["scale-repeatnet-linear"]) == (17, 17)
    assert len(skeleton_groups(layers)) == 2


def test_wsms_shows_its_deepest_shared_conv_not_its_third_branchs_last():
    layers = _shipped("scale-wsms-1x1", "scale-resnet20")
    wsms = {k.name: k for k in layers["scale-wsms-1x1"]}
    assert wsms["branches.2.1.2.conv2"].depth == 7  # runs last in the trace, 7 convolutions deep
    assert max(k.depth for k in wsms.values() if k.shared) == 13
    got = default_layers(layers)
    assert got == {"scale-wsms-1x1": "branches.1.2.2.conv2", "scale-resnet20": "trunk.stages.2.2.conv2"}
    assert default_layers(dict(reversed(layers.items()))) == got
    assert wsms[got["scale-wsms-1x1"]].depth == 13 and wsms[got["scale-wsms-1x1"]].shared
    assert layers["scale-resnet20"][-1].depth == 19


def test_twins_keep_the_same_place():
    sl = _shipped("scale-shardnet-SL", "scale-shardnet-E", "scale-shardnet-S")
    want = {"scale-shardnet-SL": "features.20.conv", "scale-shardnet-E": "features.16.conv",
            "scale-shardnet-S": "features.16.conv"}  # the 13th of 13 3x3 convs; SL's blending layers renumber
    assert default_layers(sl) == want and default_layers(dict(reversed(sl.items()))) == want
    assert skeleton_groups(sl) == [list(sl)]
    msws = _shipped("scale-msws-vanilla", "scale-msws-unshared", "scale-msws-shared")
    assert set(default_layers(msws).values()) == {"trunk.stages.2.1.conv2"}
    assert skeleton_groups(msws) == [list(msws)]


def _said(at) -> list[str]:
    return [str(x.value).replace("\\", "") for x in [*at.warning, *at.caption, *at.markdown]]


@pytest.mark.parametrize("pair", [["scale-msws-shared", "scale-repeatnet-linear"], ["scale-wsms-1x1", "scale-resnet20"]])
def test_the_page_says_different_skeletons_have_no_same_place(pair):
    at = open_app("pages/kernels.py", needs(*pair))
    assert not at.exception and not at.error, [e.value for e in at.error]
    said = _said(at)
    assert not any("same place where" in s or "share a skeleton" in s for s in said), said
    warned = [s for s in said if s.startswith("These variants are built on different skeletons")]
    assert len(warned) == 1, said
    assert "is not the same place as any layer of another" in warned[0]
    assert "deepest layer (the most convolutions on the path from the input)" in warned[0]
    shown = {s.label: s.value for s in at.selectbox if s.label.startswith("Layer of ")}
    layers = _shipped(*pair)
    assert shown == {f"Layer of {v}": n for v, n in default_layers(layers).items()}
    for v, n in default_layers(layers).items():
        i, total = _position(layers[v], n)
        depth = next(k.depth for k in layers[v] if k.name == n)
        assert f"{v}: `{n}` (kernel layer {i} of {total}, {depth} convolutions deep)" in warned[0]


def test_the_page_calls_twins_the_same_place_under_renumbered_paths():
    pair = needs("scale-shardnet-SL", "scale-shardnet-E")
    at = open_app("pages/kernels.py", pair)
    assert not at.exception and not at.error
    said = _said(at)
    assert not any("different" in s and "place" in s for s in at.warning), said
    assert ("scale-shardnet-SL, scale-shardnet-E share a skeleton (the same kernel layers in the same order): their "
            "panels show the same place (under different module paths), kernel layer 13 of 13.") in said
    at.selectbox(key="layer-scale-shardnet-E").set_value("features.15.conv").run()
    warned = [s for s in _said(at) if "share a skeleton, but their panels show different places" in s]
    assert len(warned) == 1 and "scale-shardnet-E: `features.15.conv` (kernel layer 12 of 13" in warned[0]
