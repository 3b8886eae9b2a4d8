"""Kernels: top-k 2-D kernels by magnitude (Aich et al. Fig. 3/4), how alike two kernel sets
are, and ShaRDNet's blending layers (Fig. 4) with their pruning curve (Fig. 5).

A "kernel layer" is a place in the network (a module path) where 2-D kernels are applied,
with what it stores, how often its stored weights are applied in one forward pass (the
model package's reuse accounting) and how deep it lies (convolutions on the longest path from
the input). Twins built from one skeleton have the same kernel layers in the same order
(:func:`skeleton`), so :func:`default_layers` can put the same place side by side; variants of
different skeletons have no same place, and each shows its own deepest layer.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.overrides import TorchFunctionMode

from wsviz.errors import WsvizError


@dataclass(frozen=True)
class KernelLayer:
    """One place in the network where 2-D kernels are applied, with what it stores and reuses.

    ``shape`` is that of the distinct kernels applied there, concatenated along the output
    axis: an msws layer with its own kernels per rate shows both halves (as many kernels as
    vanilla), a shared one its single set (applied at every rate).
    """

    name: str  # module path of the place (same path = same place in twin architectures)
    shape: tuple[int, ...]  # (out, in, kh, kw) of the distinct kernels applied here
    derived: bool  # realised from parameters (RepeatNet tiles, e2cnn basis), not stored as such
    uses: int  # applications of this layer's stored weights in one forward pass, whole network
    params: tuple[str, ...] = ()  # the parameters carrying its kernels
    kind: str = "direct"  # direct / tiled / expanded / derived (see wsviz.models.REUSE_KINDS)
    factor: float = 1.0  # weights applied per weight stored, over the whole forward pass
    sites: tuple[str, ...] = ()  # every place its stored weights are applied
    variations: tuple[str, ...] = ()  # how its applications here differ, e.g. ("dilation=1", "dilation=2")
    depth: int = 0  # convolutions on the longest path from the input to its deepest output, itself included
    blocks: tuple[tuple[int, int], ...] = ()  # (kernel rows, times applied here) per stored set, in layer_weight's order

    @property
    def shared(self) -> bool:
        """Its stored weights are applied more than once (at several places, rates, or tiled/expanded)."""
        return self.factor > 1 + 1e-9

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    def applications(self) -> np.ndarray | None:
        """Per output row of the kernels :func:`layer_weight` gives for this place: how many times that row
        is applied here in one forward pass (2 for every kernel of an msws layer whose one stored set
        serves both rates, making output channels o and o + out; 1 for each rate's own set when unshared).
        None when unknown (a layer list made by hand)."""
        if not self.blocks:
            return None
        return np.repeat([n for _, n in self.blocks], [r for r, _ in self.blocks])

    def describe(self) -> str:
        """How this layer reuses its weights, in words the Kernels page shows."""
        stored = "x".join(map(str, self.shape))
        if self.kind == "tiled":
            return f"{stored} realised by tiling parameter(s) {', '.join(self.params)}: each stored weight " \
                   f"applied {self.factor:.3g}x"
        if self.kind == "expanded":
            return f"{stored} filters expanded from a basis ({', '.join(self.params)}): each learned coefficient " \
                   f"applied {self.factor:.3g}x"
        if self.uses > 1:
            other = [s for s in self.sites if s != self.name]
            here = f" here ({', '.join(self.variations)})" if self.variations else " here"
            named = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            where = here + (f" and at {named}" if other else "")
            return f"{stored}, shared: applied {self.uses}x per forward pass{where}"
        if self.variations:
            return f"{stored}, not shared: its own kernels at each of {', '.join(self.variations)}"
        return f"{stored}, applied once per forward pass (not shared)"

    def menu_label(self) -> str:
        """The layer menu's entry: the place, its kernel count and, when shared, its use count."""
        tag = {"tiled": f"tiled ×{self.factor:.3g}", "expanded": f"basis ×{self.factor:.3g}"}.get(
            self.kind, f"shared ×{self.uses}" if self.uses > 1 else "")
        return f"{self.name} · {self.shape[0]}x{self.shape[1]} {self.shape[2]}x{self.shape[3]}" + (f" · {tag}" if tag
                                                                                                   else "")


def kernel_layers(model: nn.Module, min_size: int = 2) -> list[KernelLayer]:
    """Every place that applies conv kernels of at least ``min_size`` x ``min_size``, in forward order."""
    from wsviz.models.accounting import _reuse, sharing_report

    traced, _, _ = sharing_report(model)  # the uses in the order the forward pass made them
    depths = _conv_depths(model)
    reuse = _reuse(traced, {n: tuple(p.shape) for n, p in model.named_parameters()})
    by_site: dict[str, list] = {}
    for r in reuse.values():
        for u in r.uses:
            if (u.op == "conv2d" and u.applied and len(u.applied_shape) == 4
                    and min(u.applied_shape[2:]) >= min_size):
                by_site.setdefault(u.site, []).append(u)
    order: dict[str, int] = {}
    for i, u in enumerate(traced):  # a place's first use in the trace: forward order, not parameter order
        order.setdefault(u.site, i)
    out = []
    for site in sorted(by_site, key=order.__getitem__):
        uses = by_site[site]
        params = tuple(dict.fromkeys(u.param for u in uses))
        first = {p: next(u for u in uses if u.param == p) for p in params}
        rows = sum(first[p].applied_shape[0] for p in params)
        o, i, kh, kw = first[params[0]].applied_shape
        stored = sum(reuse[p].numel for p in params)
        applied = sum(reuse[p].applied for p in params)
        kinds = [first[p].kind for p in params]
        kind = next((k for k in ("tiled", "expanded", "derived") if k in kinds), "direct")
        n_uses = max(sum(1 for u in reuse[p].uses if u.applied) for p in params)
        sites = tuple(dict.fromkeys(s for p in params for s in reuse[p].sites))
        here = [u for u in traced if u.site == site and u.param in params and u.op == "conv2d" and u.applied]
        blocks = tuple((first[p].applied_shape[0], sum(1 for u in here if u.param == p))
                       for p in dict.fromkeys(u.param for u in here))  # in the order layer_weight stacks them
        out.append(KernelLayer(site, (rows, i, kh, kw), kind != "direct", n_uses, params, kind,
                               applied / max(stored, 1), sites, _variations([u.detail for u in uses]),
                               depths.get(site, 0), blocks))
    return out


_CONV_OPS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d})
_DEPTH = "_wsviz_conv_depth"


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


class _DepthTracer(TorchFunctionMode):
    """Carries with every tensor of a forward pass the number of convolutions on the longest path from the
    input to it (a tensor's is the largest of the tensors it was computed from, one more out of a
    convolution), and keeps for each place (the innermost module running) its deepest convolution."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.depth: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        d = max((getattr(t, _DEPTH, 0) for t in _tensors((args, kwargs))), default=0)
        if func in _CONV_OPS:
            d += 1
            site = self.stack[-1] if self.stack else ""
            self.depth[site] = max(self.depth.get(site, 0), d)
        for t in _tensors(out):
            if d > getattr(t, _DEPTH, 0):  # an in-place op returns its input: it keeps the deeper count
                try:
                    setattr(t, _DEPTH, d)
                except (AttributeError, RuntimeError):  # a tensor that takes no attribute starts a new count
                    pass
        return out


def _conv_depths(model: nn.Module) -> dict[str, int]:
    """{place: convolutions on the longest path from the input to its deepest output, itself included}, from
    one forward pass of two random images through a private copy (training mode, as the use trace runs)."""
    from wsviz.models import input_shape
    from wsviz.models.hooks import private_copy
    from wsviz.models.modes import set_mode

    work = private_copy(model)
    stack: list[str] = []
    handles = []

    def leave(module, args, output) -> None:  # returns nothing: a forward hook's value would replace the output
        stack.pop()

    for name, mod in work.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(mod.register_forward_hook(leave, always_call=True))
    param = next(iter(work.parameters()), None)
    tracer = _DepthTracer(stack)
    try:
        x = torch.randn(2, *input_shape(work), device=param.device if param is not None else "cpu")
        with set_mode(work, True), torch.no_grad(), tracer:
            work(x)
    finally:
        for h in handles:
            h.remove()
    return tracer.depth


def _variations(details: list[str]) -> tuple[str, ...]:
    """The settings that differ between a layer's applications ("stride=1 dilation=2" strings)."""
    parsed = [dict(kv.split("=", 1) for kv in d.split()) for d in dict.fromkeys(details) if d]
    if len(parsed) < 2:
        return ()
    keys = [k for k in parsed[0] if len({p.get(k) for p in parsed}) > 1]
    return tuple(" ".join(f"{k}={p.get(k)}" for k in keys) for p in parsed)


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (out, in, kh, kw) kernels of a kernel layer (a place, see :func:`kernel_layers`), or of a
    4-D parameter named directly; detached, on the CPU. Kernels applied several times at one
    place (msws rates) appear once; distinct ones (unshared rates) are concatenated."""
    params = dict(model.named_parameters())
    if name in params and params[name].ndim == 4:
        return params[name].detach().cpu()
    if name in dict(model.named_modules()):
        from wsviz.models import applied_weights

        seen, parts = set(), []
        for w, carrier in applied_weights(model, name):
            key = carrier or id(w)
            if key not in seen and w.ndim == 4:
                seen.add(key)
                parts.append(w.cpu())
        if parts and len({p.shape[1:] for p in parts}) == 1:
            return torch.cat(parts)
    names = [k.name for k in kernel_layers(model)]
    raise WsvizError(f"{name!r} is not a conv layer of this model; choose one of: {', '.join(names[:12])}"
                     + (" ..." if len(names) > 12 else ""))


def skeleton(layers: list[KernelLayer]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """What twins have in common: their kernel layers in forward order, each as its module path with the
    numbers in it left out and its kernel size. The vanilla, unshared and shared variants of one family
    have the same paths; ShaRDNet SL's blending layers (1x1, not kernel layers) renumber E's and S's
    ``features.<i>.conv`` without adding or moving a kernel layer. Models of different depth or layout
    (13 convs against 17, branches against a chain) differ here, even where some paths coincide."""
    return tuple((re.sub(r"\d+", "#", k.name), k.kernel) for k in layers)


def skeleton_groups(layers: dict[str, list[KernelLayer]]) -> list[list[str]]:
    """The models (keys of ``layers``) grouped by :func:`skeleton`, groups and members in the given order;
    models without kernel layers are left out. Only within a group is a layer "the same place" (the
    same position) in every model."""
    groups: dict[tuple, list[str]] = {}
    for m, ls in layers.items():
        if ls:
            groups.setdefault(skeleton(ls), []).append(m)
    return list(groups.values())


def default_layers(models: dict[str, nn.Module] | dict[str, list[KernelLayer]]) -> dict[str, str]:
    """Default layers for side-by-side kernel views: the same place in twins, the deepest in each otherwise.

    Models are grouped by :func:`skeleton`. Each group shows one position: the deepest (by
    :attr:`KernelLayer.depth`, the convolutions on the longest path from the input; of places equally
    deep, the later in forward order, as in a chain) among the positions with kernels of 3x3 or more where at least one member's
    layer is shared, else among all positions with kernels of 3x3 or more (else among all). Twins thus
    show the same place, whatever their order; a model of another skeleton has no same place and
    shows its own deepest layer by the same rule (beside a ResNet-20's last conv, 19 convolutions deep,
    WSMS-Net shows its deepest shared conv, 13 deep in its first two branches, not the last conv
    of its third branch, 7 deep, which merely runs last).
    """
    layers = {k: (v if isinstance(v, list) else kernel_layers(v)) for k, v in models.items()}
    out = {}
    for group in skeleton_groups(layers):
        first = layers[group[0]]
        positions = range(len(first))
        big = [j for j in positions if min(first[j].kernel) >= 3] or list(positions)
        shared = [j for j in big if any(layers[m][j].shared for m in group)]
        j = max(shared or big, key=lambda j: (max(layers[m][j].depth for m in group), j))
        for m in group:
            out[m] = layers[m][j].name
    return {m: out[m] for m in layers if m in out}


@dataclass
class TopKernels:
    """The ``k`` 2-D kernels of largest aggregate magnitude (sum of |w|), largest first."""

    kernels: np.ndarray  # (k, kh, kw)
    out_index: np.ndarray  # (k,) output channel of each kernel (its first position when ``distinct``)
    in_index: np.ndarray  # (k,) input channel of each kernel
    magnitude: np.ndarray  # (k,) sum of |w| over the kernel
    copies: np.ndarray | None = None  # (k,) (out, in) positions this kernel is applied at here, every application
    # counted (1 = once), with or without ``distinct``

    @property
    def repeated(self) -> int:
        """Positions among those shown that hold a copy of a kernel shown elsewhere (0 with ``distinct``)."""
        return int(len(self.kernels) - len(np.unique(self.kernels.reshape(len(self.kernels), -1), axis=0)))


def top_k_kernels(weight: torch.Tensor, k: int = 256, distinct: bool = False,
                  applied: np.ndarray | None = None) -> TopKernels:
    """Aich et al. Fig. 3/4: the ``k`` kernels (of out x in) with the highest sum of |w|.

    ``distinct``: every kernel once. A tiled layer (RepeatNet) applies each stored kernel at
    several (out, in) positions, so its top-k by position repeats the same kernel: on
    ``scale-repeatnet-linear`` only 16 of the top 64 positions hold different kernels. With
    ``distinct`` the k strongest *different* kernels are shown, each at its first position,
    with ``copies`` saying at how many positions it is applied (exact copies; 1 = unique). Without
    ``distinct`` every position shown has the same count as its kernel would in the distinct view.

    ``applied``: per output row of ``weight``, how many times it is applied at its place
    (:meth:`KernelLayer.applications`); ``copies`` then counts the (out, in) positions of every
    application: msws's one stored set applied at rates 1 and 2 puts each kernel at output channel o
    and o + out, 2 positions, though it is stored once.
    """
    if weight.ndim != 4:
        raise WsvizError(f"Expected a (out, in, kh, kw) conv weight, got shape {tuple(weight.shape)}.")
    o, i, kh, kw = weight.shape
    flat = weight.reshape(o * i, kh, kw).float()
    mag = flat.abs().sum((1, 2))
    if applied is not None and len(applied) != o:
        raise WsvizError(f"applied gives {len(applied)} rows' application counts for a weight of {o} output rows.")
    _, inverse, counts = torch.unique(flat.reshape(o * i, -1) + 0.0, dim=0, return_inverse=True,
                                      return_counts=True)  # + 0.0: -0.0 and 0.0 are one value
    if applied is not None:  # each position counted once per application of its row
        per_position = torch.as_tensor(np.asarray(applied), dtype=torch.long).repeat_interleave(i)
        counts = torch.zeros(len(counts), dtype=torch.long).scatter_add(0, inverse, per_position)
    if distinct:
        first = torch.full((len(counts),), o * i, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(o * i), reduce="amin")
        candidates, copies = first, counts
    else:  # every position, each with the positions of its kernel (the same number as in the distinct view)
        candidates, copies = torch.arange(o * i), counts[inverse]
    k = min(k, len(candidates))
    pick = torch.topk(mag[candidates], k).indices
    top = candidates[pick]
    return TopKernels(flat[top].numpy(), (top // i).numpy(), (top % i).numpy(), mag[top].numpy(),
                      copies[pick].numpy())


def kernel_set_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two kernel sets are: mean |cosine| over the best one-to-one matching.

    Sign-invariant (a kernel and its negative count as the same pattern) and
    order-invariant (kernels are matched by the Hungarian algorithm). 1 = the same set.
    """
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise WsvizError(f"Kernel sets differ in kernel size ({a.shape[1]} vs {b.shape[1]} weights).")
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    sim = np.abs(an @ bn.T)
    rows, cols = linear_sum_assignment(-sim)
    return float(sim[rows, cols].mean())


def random_kernel_similarity(k: int, kh: int, kw: int, seed: int = 0, trials: int = 5) -> float:
    """The mean score of ``trials`` pairs of independent Gaussian kernel sets: where "unrelated" sits on
    average. A mean is not a test (about half of all unrelated pairs score above it): to call a score
    more alike than chance use :func:`random_similarity_null`."""
    rng = np.random.default_rng(seed)
    return float(np.mean([kernel_set_similarity(rng.standard_normal((k, kh, kw)), rng.standard_normal((k, kh, kw)))
                          for _ in range(trials)]))


NULL_DRAWS = 200  # pairs of random kernel sets per (k, kernel shape) in the null distribution
NULL_LEVEL = 0.05  # one-sided level of "more alike than chance"


@dataclass(frozen=True, eq=False)
class SimilarityNull:
    """The scores of ``draws`` pairs of independent Gaussian sets of ``k`` kernels of one shape: what
    :func:`kernel_set_similarity` gives two *unrelated* sets, as a distribution (a Monte Carlo test).

    A score is "more alike than chance" at one-sided level ``level`` when its Monte Carlo p-value
    ``(1 + #{null >= score}) / (draws + 1)`` is at most ``level``; that is, when it is above
    :attr:`critical`, the null's 95th percentile for level 0.05 (with 200 draws its 191st smallest
    score, ``np.quantile(scores, 0.95, method="higher")``). Two unrelated sets are then called alike
    in at most ``level`` of cases, whatever ``draws`` is.
    """

    k: int
    kh: int
    kw: int
    scores: np.ndarray  # (draws,) sorted ascending, read-only
    level: float = NULL_LEVEL

    @property
    def mean(self) -> float:
        return float(self.scores.mean())

    @property
    def critical(self) -> float:
        """The null score a similarity must exceed: the (1 - level) percentile, taken so that exceeding it
        is exactly p <= level."""
        n = len(self.scores)
        m = int(np.floor(self.level * (n + 1) + 1e-9)) - 1  # null scores allowed at or above a significant score
        return float(self.scores[n - 1 - m]) if m >= 0 else float("inf")

    def p_value(self, score: float) -> float:
        """One-sided Monte Carlo p-value of ``score``: how often unrelated sets score at least as high."""
        at_least = len(self.scores) - int(np.searchsorted(self.scores, score, side="left"))
        return (1 + at_least) / (len(self.scores) + 1)

    def alike(self, score: float) -> bool:
        """``score`` is more alike than chance at one-sided level :attr:`level`."""
        return self.p_value(score) <= self.level + 1e-12


@functools.lru_cache(maxsize=128)
def random_similarity_null(k: int, kh: int, kw: int, draws: int = NULL_DRAWS, seed: int = 0,
                           level: float = NULL_LEVEL) -> SimilarityNull:
    """The null distribution of :func:`kernel_set_similarity` for two independent sets of ``k`` Gaussian
    ``kh`` x ``kw`` kernels (the score is scale-free, so any isotropic distribution gives the same
    null): ``draws`` pairs, deterministic for a ``seed`` (each (k, kh, kw) its own stream), computed
    once per process and kept (about a second for k = 256)."""
    if k < 1 or draws < 1:
        raise WsvizError(f"A null distribution needs at least one kernel and one draw (got k={k}, draws={draws}).")
    rng = np.random.default_rng([seed, k, kh, kw])
    sets = rng.standard_normal((draws, 2, k, kh * kw))
    scores = np.sort([kernel_set_similarity(a, b) for a, b in sets])
    scores.setflags(write=False)
    return SimilarityNull(k, kh, kw, scores, level)


def kernel_set_comparisons(panels: dict[str, np.ndarray], draws: int = NULL_DRAWS, seed: int = 0) -> list[dict]:
    """Every pair of kernel sets (each strongest first, as :func:`top_k_kernels` gives them): the
    similarity of the ``n`` strongest kernels both sets have (``n`` the smaller set's size), tested
    against the null of :func:`random_similarity_null` for that ``n`` and kernel shape: its mean
    ("two random sets"), its 95th percentile and the one-sided p-value. "More alike than chance"
    means p <= 0.05 (the score above the null's 95th percentile). A pair whose kernels differ in
    size cannot be matched: its row says so (``similarity`` None) instead of being left out."""
    names, out = list(panels), []
    for j, a in enumerate(names):
        for b in names[j + 1:]:
            pa, pb = np.asarray(panels[a]), np.asarray(panels[b])
            row = {"A": a, "B": b, "kernels compared": 0, "similarity": None, "two random sets": None,
                   "random, 95th percentile": None, "p (one-sided)": None}
            if pa.shape[1:] != pb.shape[1:]:
                size = lambda p: "x".join(map(str, p.shape[1:]))  # noqa: E731
                row["reading"] = f"not compared: {size(pa)} kernels against {size(pb)}"
            elif min(len(pa), len(pb)) < 2:
                row["reading"] = "not compared: fewer than 2 kernels"
            else:
                n = min(len(pa), len(pb))
                score = kernel_set_similarity(pa[:n], pb[:n])
                null = random_similarity_null(n, *pa.shape[1:], draws=draws, seed=seed)
                row.update({"kernels compared": n, "similarity": round(score, 4), "two random sets": round(null.mean, 4),
                            "random, 95th percentile": round(null.critical, 4),
                            "p (one-sided)": round(null.p_value(score), 4),
                            "reading": "more alike than chance" if null.alike(score) else
                            "no more alike than two random sets"})
            out.append(row)
    return out


# ---------------------------------------------------------------------------- ShaRDNet
def blending_weights(model: nn.Module) -> list[np.ndarray]:
    """ShaRDNet Fig. 4: each blending (1x1) layer's weights as an (out, in) matrix, in network order."""
    layers = getattr(model, "blending_layers", None)
    if layers is None or not layers():
        raise WsvizError("This model has no blending layers; they exist in ShaRDNet's SL variants "
                         "(shardnet_vgg kind='SL', sl_resnet34/50).")
    return [m.weight.detach().cpu()[:, :, 0, 0].numpy() for m in layers()]


def blending_extremes(w: np.ndarray, n: int = 32) -> np.ndarray:
    """Per output row: -1 for the ``n`` smallest |w|, +1 for the ``n`` largest, 0 otherwise (Fig. 4)."""
    n = min(n, w.shape[1] // 2)
    order = np.argsort(np.abs(w), axis=1)
    marks = np.zeros_like(w, dtype=np.int8)
    rows = np.arange(w.shape[0])[:, None]
    if n:
        marks[rows, order[:, :n]] = -1
        marks[rows, order[:, -n:]] = 1
    return marks


@dataclass
class PruningCurve:
    fractions: np.ndarray
    accuracy: np.ndarray
    pruned_weights: np.ndarray  # how many blending weights were zeroed at each fraction


@torch.no_grad()
def blending_pruning_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           fractions=(0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)) -> PruningCurve:
    """ShaRDNet Fig. 5: accuracy when the smallest-|w| fraction of all blending weights is zeroed.

    No retraining. The weights are zeroed in a private copy of ``model``
    (:func:`wsviz.models.hooks.private_copy`), never in ``model`` itself: the app shares one model
    object per checkpoint with every session, whose predictions must not see a pruned network, even
    for a moment, and two curves computed at once must not restore each other's pruned weights.
    """
    from wsviz.models.hooks import private_copy
    from wsviz.training.loop import evaluate

    if not (model.blending_layers() if hasattr(model, "blending_layers") else []):
        blending_weights(model)  # raises the explanatory error
    work = private_copy(model)
    layers = work.blending_layers()
    saved = [m.weight.detach().clone() for m in layers]
    allw = torch.cat([w.abs().flatten() for w in saved])
    accs, counts = [], []
    for f in fractions:
        n = int(round(f * allw.numel()))
        thresh = torch.kthvalue(allw, n).values if n > 0 else None
        for m, w in zip(layers, saved):
            m.weight.copy_(w if thresh is None else torch.where(w.abs() <= thresh, torch.zeros_like(w), w))
        _, acc, _ = evaluate(work, images, labels)
        accs.append(acc)
        counts.append(n)
    return PruningCurve(np.asarray(fractions, dtype=float), np.asarray(accs), np.asarray(counts))
