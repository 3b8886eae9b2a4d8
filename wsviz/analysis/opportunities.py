"""Where could a trained network share weights, and what would each sharing cost?

For every candidate group of same-shape convolutions (by default contiguous runs of blocks in one
stage, the same conv role in each: ShaResNet's pattern generalised; in a plain CNN, whose
convolutions are in no numbered block, runs of consecutive convolutions between two pooling layers:
:func:`candidate_groups`), four scores:

* ``weight_similarity``: mean pairwise cosine of the members' trained kernels (flattened);
* ``output_cka``: mean pairwise linear CKA of the members' outputs on a calibration batch (Nguyen,
  Raghu & Kornblith 2021 find runs of near-identical representations in deep nets);
* ``gradient_conflict``: 1 - mean pairwise cosine of the loss gradients with respect to the members'
  weights on the calibration batch (SuperWeights' signal: members pulled apart by training);
* ``measured_drop``: held-out accuracy of the untied model minus that of the model tied now
  (least-squares init), both with BatchNorm statistics re-estimated on the calibration batch (so
  the drop is the tying's alone), no fine-tuning; measured in the same step, two continuous
  companions that do not move in whole images: ``measured_loss`` (the rise of the held-out
  cross-entropy) and ``measured_kl`` (the mean KL divergence from the untied model's predictions
  to the tied one's, which needs no labels).

They are combined into one ``predicted_cost`` (:func:`predicted_costs`): a weighted mean of each
group's rank under every score (0 the cheapest-looking group, 1 the costliest), so scores in
different units combine without scaling. The ranking is judged by ``benchmarks/bench_tie.py``
against the drop measured after a short fine-tune. Under a parameter budget,
:func:`choose_groups` picks disjoint groups by a measured cost added up instead (ranks do not
add up; the KL by default) and measures the best sets tied together.

Tying itself is :func:`wsviz.models.tie.tie`; this module only scores.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsviz.errors import WsvizError
from wsviz.models.hooks import this_thread
from wsviz.models.sharing import SharedConv2d


@dataclass(frozen=True)
class Opportunity:
    """One candidate group and its scores."""

    group: tuple[str, ...]
    params_saved: int
    weight_similarity: float
    output_cka: float
    gradient_conflict: float
    measured_drop: float | None  # accuracy points lost by tying now (None when not measured)
    predicted_cost: float | None = None  # the scores combined (predicted_costs): 0 cheapest .. 1 costliest
    measured_loss: float | None = None  # rise of the held-out cross-entropy when tied now (None when not measured)
    measured_kl: float | None = None  # mean KL(untied || tied now) of the held-out predictions (None: not measured)


# Each score's direction: +1 where a larger value predicts a costlier tie, -1 where it predicts a cheaper one.
COST_SIGN = {"measured_drop": 1.0, "measured_loss": 1.0, "measured_kl": 1.0, "output_cka": -1.0,
             "weight_similarity": -1.0, "gradient_conflict": 1.0}
# How much each score's rank counts in the predicted cost. Chosen on held-out data: the val half of
# benchmarks/bench_tie.py, weights in {0, 1, 2} per score, scores cross-fitted so that none shares
# images with the drops it is judged against. The drop measured now counts once and the KL from the
# untied predictions twice: val rho 0.75 (the drop alone 0.69); on the test half, never used to
# choose, 0.81 (drop alone 0.66, KL alone 0.86; weight similarity 0.22, CKA 0.00, adjacency 0.60).
# checkpoints/REPORT.md has the table. Without a measured cost the other three count equally
# (FALLBACK_WEIGHTS).
DEFAULT_WEIGHTS = {"measured_drop": 1.0, "measured_kl": 2.0}
FALLBACK_WEIGHTS = {"output_cka": 1.0, "weight_similarity": 1.0, "gradient_conflict": 1.0}


def predicted_costs(rows: Sequence[Opportunity], weights: dict[str, float] | None = None) -> list[float]:
    """One predicted cost per group in [0, 1]: the ``weights``-weighted mean over the scores of the
    group's rank among ``rows`` (ties share their mean rank), oriented by :data:`COST_SIGN` so that
    0 is the cheapest-looking group and 1 the costliest. Scores not measured (None) are left out.
    Default weights: :data:`DEFAULT_WEIGHTS`, or :data:`FALLBACK_WEIGHTS` when no drop was measured."""
    from scipy.stats import rankdata

    if weights is None:
        measured = bool(rows) and all(r.measured_drop is not None for r in rows)
        weights = DEFAULT_WEIGHTS if measured else FALLBACK_WEIGHTS
    n = len(rows)
    if n == 0:
        return []
    total, mass = np.zeros(n), 0.0
    for name, w in weights.items():
        values = [getattr(r, name) for r in rows]
        if not w or any(v is None for v in values):
            continue
        ranks = (rankdata(COST_SIGN[name] * np.asarray(values, dtype=float)) - 1) / max(n - 1, 1)
        total += w * ranks
        mass += w
    return (total / mass).tolist() if mass else [0.0] * n


def _place(name: str) -> tuple[str, int, str] | None:
    """(stage, block index, role) of a module path: its last numeric component is the block
    ("trunk.stages.2.1.conv2" -> ("trunk.stages.2", 1, "conv2"); "layer3.1.conv2" -> ("layer3", 1, "conv2"))."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    if not idx:
        return None
    i = idx[-1]
    return ".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:])


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Convolutions larger than 1x1 that neither use nor lend a shared weight: neither through
    :class:`SharedConv2d` nor by holding a parameter another module holds too
    (:func:`~wsviz.models.tie.aliased_convs`)."""
    from wsviz.models.tie import aliased_convs

    lent = {id(m.source) for m in model.modules() if isinstance(m, SharedConv2d)}
    aliased = aliased_convs(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(m, SharedConv2d)
             and min(m.kernel_size) > 1 and id(m) not in lent and n not in aliased}
    if not convs:
        raise WsvizError("This model has no (unshared) convolutions with kernels larger than 1x1 to share.")
    return convs


def _ends_a_run(module: nn.Module) -> bool:
    """Whether a layer between two convolutions of one container keeps them from being one run: it is
    or holds a convolution of its own (of any kind) or a layer that changes the resolution (pooling,
    upsampling, pixel shuffles, flattening)."""
    for m in module.modules():
        kind = type(m).__name__
        if "Conv" in kind or "Pool" in kind or isinstance(m, (SharedConv2d, nn.Upsample, nn.PixelShuffle,
                                                              nn.PixelUnshuffle, nn.Flatten)):
            return True
    return False


def _flat_places(model: nn.Module, convs: dict[str, nn.Conv2d]) -> dict[str, tuple[str, int, str]]:
    """(container, position, "") of every conv of ``convs`` that is not inside a numbered block (a plain
    CNN's ``features.16``, a root-level ``conv2``): such a conv is a block of its own, in the stage that
    its container's children form between two changes of resolution. Positions count the container's
    children in order, so that two convs are consecutive when nothing but resolution-keeping layers
    without convolutions (activations, normalisation, dropout) comes between them: another convolution
    (of any shape, 1x1 or shared included) or a pooling layer ends a run. Pooling done inside
    ``forward`` (F.max_pool2d) is not a child and cannot be seen: such runs may cross it."""
    parents: dict[str, set[str]] = {}
    for name in convs:
        if _place(name) is None:
            parent = name.rpartition(".")[0]
            parents.setdefault(parent, set()).add(name)
    out: dict[str, tuple[str, int, str]] = {}
    for parent, names in parents.items():
        container = model.get_submodule(parent) if parent else model
        position = 0
        for child_name, child in container.named_children():
            path = f"{parent}.{child_name}" if parent else child_name
            if path in names:
                position += 1
                out[path] = (parent, position, "")
            elif _ends_a_run(child):
                position += 1  # a gap: the convs on either side are not consecutive
    return out


def _lanes(convs: dict[str, nn.Conv2d], model: nn.Module | None = None) -> dict[tuple, list[tuple[int, str]]]:
    """Same-role convolutions of one stage that can be tied together as they are: {(stage, role, what tying
    needs to match (:func:`~wsviz.models.tie.tie_signature`: shape, groups, bias), geometry): [(block,
    path), ...]}. So every run of a lane is a group :func:`~wsviz.models.tie.tie` accepts.

    Blocks are numbered (:func:`_place`); with ``model``, the convs outside numbered blocks are placed
    too, each a block of its own in its container (:func:`_flat_places`)."""
    from wsviz.models.tie import tie_signature

    flat = _flat_places(model, convs) if model is not None else {}
    lanes: dict[tuple, list[tuple[int, str]]] = {}
    for name, m in convs.items():
        place = _place(name) or flat.get(name)
        if place is None:
            continue
        stage, block, role = place
        key = (stage, role, *tie_signature(m), m.stride, m.padding, m.dilation, m.padding_mode)
        lanes.setdefault(key, []).append((block, name))
    for members in lanes.values():
        members.sort()
    return lanes


def candidate_groups(model: nn.Module, max_size: int | None = None) -> list[tuple[str, ...]]:
    """Contiguous runs (two or more) of blocks within a stage whose conv of the same role has the same
    weight shape, groups, bias (or none) and geometry (stride, padding, dilation, padding mode), so that
    each can be tied as it is; convolutions already shared are left out.

    A block is a numbered module holding convolutions (``layer3.1`` of a ResNet: its ``conv2`` is the
    role). A convolution that is in no numbered block (a plain CNN's flat ``features`` Sequential, a
    model's ``conv1``, ``conv2`` attributes) is a block of its own: a run is then consecutive
    same-kind convolutions of one container with no other convolution and no pooling between them,
    so a run stays within one resolution, as a ResNet stage does (:func:`_flat_places`)."""
    convs = _convs(model)
    out = []
    for members in _lanes(convs, model).values():
        runs, run = [], [members[0]]
        for b, n in members[1:]:
            if b == run[-1][0] + 1:
                run.append((b, n))
            else:
                runs.append(run)
                run = [(b, n)]
        runs.append(run)
        for r in runs:
            names = [n for _, n in r]
            top = len(names) if max_size is None else min(max_size, len(names))
            for size in range(2, top + 1):
                for start in range(len(names) - size + 1):
                    out.append(tuple(names[start:start + size]))
    return sorted(out, key=lambda g: (list(convs).index(g[0]), len(g)))


def sharesnet_rule(model: nn.Module, imagenet: bool = False) -> list[tuple[str, ...]]:
    """ShaResNet's hand-made sharing pattern for ``model``, as groups (reference.md section 5): in every
    stage the blocks share the block's last (for bottlenecks: only) 3x3 convolution.

    The authors' CIFAR rule (default): blocks 2..n share it, the first block of each stage keeps its
    own. Their ImageNet rule (``imagenet=True``): every block shares it unless it differs in shape or
    stride (so a strided first block keeps its own). Convolutions of that role that differ in shape or
    stride form separate groups; a stage with fewer than two such blocks gives none. The CIFAR rule ties
    the digit twin into exactly the shipped shared model's 223,610 parameters; the ImageNet rule ties
    torchvision's ResNet-34/50/101/152 into exactly the authors' counts (13,613,864 ... 36,821,032)."""
    convs = _convs(model)
    order = {name: i for i, name in enumerate(convs)}
    roles: dict[str, dict[int, list[str]]] = {}  # stage -> block -> roles in module order
    for name in convs:
        place = _place(name)
        if place is not None:
            roles.setdefault(place[0], {}).setdefault(place[1], []).append(place[2])
    out = []
    for key, members in _lanes(convs).items():
        stage, role = key[0], key[1]
        blocks = roles[stage]
        first = min(blocks)
        if role != blocks[first + 1 if first + 1 in blocks else first][-1]:
            continue
        names = [n for b, n in members if imagenet or b != first]
        if len(names) >= 2:
            out.append(tuple(names))
    if not out:
        raise WsvizError("ShaResNet's rule finds nothing to share in this model: no stage has two or more blocks "
                         "after its first with a same-shape 3x3 convolution.")
    return sorted(out, key=lambda g: order[g[0]])


def _pairwise_mean(values: list[torch.Tensor], fn: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    return float(np.mean([fn(a, b) for a, b in itertools.combinations(values, 2)]))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _gram(o: torch.Tensor) -> torch.Tensor:
    """The centred Gram matrix of a layer's outputs (n, n), in float64: linear CKA needs no more."""
    x = o.detach().flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def _cka_from_grams(ka: torch.Tensor, kb: torch.Tensor) -> float:
    """Linear CKA from two centred Gram matrices (what :func:`linear_cka` computes when n < features)."""
    den = float(torch.linalg.norm(ka) * torch.linalg.norm(kb))
    return float((ka * kb).sum()) / den if den > 0 else float("nan")


def eval_view(model: nn.Module) -> nn.Module:
    """``model`` itself when every module of it is in eval mode (as the app's cached models are), else an
    eval-mode copy: an analysis never flips the mode of a model that other threads may be using."""
    if any(m.training for m in model.modules()):
        return copy.deepcopy(model).eval()
    return model


def _one_pass(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, layers: Sequence[str],
              grad_layers: Sequence[str], cov_layers: Sequence[str]):
    """One forward pass of ``images`` (eval mode) recording the centred output Gram matrix of every
    layer in ``layers`` and the input covariance of every layer in ``cov_layers``; with ``labels``,
    one backward pass for the loss gradients of the weights of ``grad_layers`` only (no other
    weight's gradient is computed). Returns (grams, grads, covs).

    ``model`` is not changed: not its mode (:func:`eval_view`), weights or statistics, and no
    gradient is left on it. Its hooks act in this thread only (:func:`wsviz.models.hooks.this_thread`),
    so another session's forward pass through the same cached model meanwhile is not recorded."""
    from wsviz.models.tie import _input_covariance_hook

    model = eval_view(model)
    grams: dict[str, torch.Tensor] = {}
    covs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        this_thread(lambda mod, a, o, n=n: grams.__setitem__(n, _gram(o)))) for n in layers]
    handles += [model.get_submodule(n).register_forward_pre_hook(this_thread(_input_covariance_hook(covs, n)))
                for n in cov_layers]
    grads: dict[str, torch.Tensor] = {}
    try:
        if labels is None:
            with torch.no_grad():
                model(images)
        else:
            weights = [model.get_submodule(n).weight for n in grad_layers]
            with torch.enable_grad():
                loss = F.cross_entropy(model(images), labels)
                found = torch.autograd.grad(loss, weights)
            grads = {n: g.detach() for n, g in zip(grad_layers, found)}
    finally:
        for h in handles:
            h.remove()
    return grams, grads, covs


@torch.no_grad()
def _log_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The log-softmax outputs of ``model`` in eval mode on ``images`` (float64); ``model``'s own mode is
    left as it is (:func:`eval_view`)."""
    model = eval_view(model)
    return torch.cat([F.log_softmax(model(images[i:i + batch_size]).double(), 1)
                      for i in range(0, len(images), batch_size)])


def _measure(log_p: torch.Tensor, labels: torch.Tensor, base: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(mean cross-entropy, accuracy, mean KL(base || this)) of log-probabilities ``log_p``; KL 0 without a base."""
    loss = float(F.nll_loss(log_p, labels))
    accuracy = float((log_p.argmax(1) == labels).double().mean())
    kl = float(F.kl_div(log_p, base, log_target=True, reduction="batchmean")) if base is not None else 0.0
    return loss, accuracy, kl


def _untied_baseline(model: nn.Module, images: torch.Tensor,
                     held_out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """The untied model's held-out log-probabilities and (loss, accuracy, 0), with its BatchNorm
    re-estimated on ``images`` like every tied model's, so that a measured cost is the tying's alone."""
    from wsviz.models.tie import reestimate_batchnorm

    base_lp = _log_probs(reestimate_batchnorm(copy.deepcopy(model), images), held_out[0])
    return base_lp, _measure(base_lp, held_out[1])


def _tying_costs(tied: nn.Module, images: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor],
                 baseline: tuple[torch.Tensor, tuple[float, float, float]]) -> dict[str, float]:
    """What a tied model costs on ``held_out`` against :func:`_untied_baseline`, after its BatchNorm is
    re-estimated on ``images``: accuracy points lost, the rise of the cross-entropy, and the KL."""
    from wsviz.models.tie import reestimate_batchnorm

    base_lp, base = baseline
    loss, accuracy, kl = _measure(_log_probs(reestimate_batchnorm(tied, images), held_out[0]), held_out[1], base_lp)
    return {"measured_drop": 100 * (base[1] - accuracy), "measured_loss": loss - base[0], "measured_kl": kl}


@dataclass(frozen=True)
class Baseline:
    """What every measured cost is measured against (:func:`find_opportunities` with held-out images):
    the untied model with its BatchNorm re-estimated on the ``n_calibration`` calibration images, as
    each tied model's is, and its accuracy on the ``n_held_out`` held-out images; ``as_trained``, the
    untied model's accuracy on the same images with the statistics it was trained with. Re-estimating
    on a small calibration batch alone may cost accuracy (the difference of the two: 4 points, 96% to
    92%, on 100 held-out images of scale-sharesnet-unshared at 64 calibration images; none at 256); the
    drops are the tying's alone because both sides of them are re-estimated on the same images (a tied
    model's trained statistics no longer fit its outputs, so it is re-estimated in any case). Measured
    from the as-trained accuracy instead, every drop would be larger by that same difference, so the
    ranking would not change."""

    accuracy: float  # fraction, untied with BatchNorm re-estimated on the calibration images
    as_trained: float  # fraction, untied with its trained BatchNorm statistics
    n_calibration: int
    n_held_out: int


@dataclass(frozen=True)
class Opportunities:
    """What :func:`find_opportunities` returns: the ranked groups, the per-stage similarity matrices and,
    when costs were measured, what they were measured against."""

    rows: list[Opportunity]
    stages: list[StageSimilarity]
    baseline: Baseline | None = None


def find_opportunities(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       groups: Sequence[Sequence[str]] | None = None,
                       held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                       progress: Callable[[int, int, str], None] | None = None,
                       weights: dict[str, float] | None = None) -> Opportunities:
    """Score every group (default :func:`candidate_groups`) on a calibration batch ``images``/``labels``
    and build the per-stage similarity matrices (:func:`stage_similarity`), from one forward and one
    backward pass; with ``held_out`` (images, labels), also measure what tying each group now costs
    on them. Rows sorted by the predicted cost (:func:`predicted_costs` with ``weights``), cheapest first.

    The pass gives every layer's output Gram matrix (CKA), the group members' weight gradients and
    input covariances (the least-squares kernels) at once; each measured cost then takes one tie,
    one BatchNorm re-estimation and one evaluation. ``progress(i, n, what)`` is called as it goes.
    With ``held_out``, ``baseline`` (:class:`Baseline`) says what the costs were measured against.
    """
    from wsviz.models.tie import check_groups, tie

    groups = [tuple(g) for g in (groups if groups is not None else candidate_groups(model))]
    if not groups:
        raise WsvizError("No candidate groups: no two convolutions (larger than 1x1, not already shared) that one "
                         "weight could serve follow each other, neither in consecutive blocks of a stage nor in one "
                         "container with no other convolution or pooling between them; pass groups to score others.")
    for g in groups:  # each on its own: candidates overlap (a run of three holds two runs of two)
        check_groups(model, [g])
    lanes = _similarity_lanes(model, required=False)
    members = list(dict.fromkeys(n for g in groups for n in g))
    layers = list(dict.fromkeys(members + [n for _, names in lanes for n in names]))
    n_steps = len(groups) + 1
    if progress:
        progress(0, n_steps, "one forward and backward pass for all groups")
    grams, grads, covs = _one_pass(model, images, labels, layers, members, members if held_out is not None else [])
    baseline = _untied_baseline(model, images, held_out) if held_out is not None else None
    said = None
    if baseline is not None:
        _, as_trained, _ = _measure(_log_probs(model, held_out[0]), held_out[1])
        said = Baseline(baseline[1][1], as_trained, len(images), len(held_out[0]))
    out = []
    for i, g in enumerate(groups):
        if progress:
            progress(i + 1, n_steps, " + ".join(g))
        ws = [model.get_submodule(n).weight.detach() for n in g]
        costs = {"measured_drop": None}
        if held_out is not None:
            costs = _tying_costs(tie(model, [g], init="lstsq", covariances=covs), images, held_out, baseline)
        out.append(Opportunity(
            g, group_saving(model, g), _pairwise_mean(ws, _cosine),
            float(np.mean([_cka_from_grams(grams[a], grams[b]) for a, b in itertools.combinations(g, 2)])),
            1.0 - _pairwise_mean([grads[n] for n in g], _cosine), **costs))
    if progress:
        progress(n_steps, n_steps, "done")
    out = [replace(o, predicted_cost=c) for o, c in zip(out, predicted_costs(out, weights))]
    rows = sorted(out, key=lambda o: (o.predicted_cost, -o.params_saved))
    return Opportunities(rows, _stage_matrices(model, lanes, grams), said)


def score_groups(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 groups: Sequence[Sequence[str]] | None = None, held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 weights: dict[str, float] | None = None) -> list[Opportunity]:
    """The ranked rows of :func:`find_opportunities` (cheapest first)."""
    return find_opportunities(model, images, labels, groups, held_out, progress, weights).rows


@dataclass(frozen=True)
class StageSimilarity:
    """Layer-by-layer similarity of the same-role, same-shape convolutions of one stage."""

    stage: str
    role: str
    layers: tuple[str, ...]
    weight_similarity: np.ndarray  # cosine of the flattened kernels, (n, n)
    output_cka: np.ndarray  # linear CKA of the outputs on the calibration batch, (n, n)


def _similarity_lanes(model: nn.Module, required: bool = True) -> list[tuple[tuple, list[str]]]:
    """Every lane of two or more convolutions that could share one weight, consecutive or not (a plain
    CNN's container counts as one stage here, its pooling layers and all)."""
    lanes = [(key, [n for _, n in members]) for key, members in _lanes(_convs(model), model).items()
             if len(members) > 1]
    if required and not lanes:
        raise WsvizError("No stage has two convolutions (larger than 1x1, not already shared) of one role, shape, "
                         "bias and geometry to compare.")
    return lanes


def _stage_matrices(model: nn.Module, lanes: list[tuple[tuple, list[str]]],
                    grams: dict[str, torch.Tensor]) -> list[StageSimilarity]:
    out = []
    for key, layers in lanes:
        k = len(layers)
        ws = [model.get_submodule(n).weight.detach() for n in layers]
        wsim, cka = np.eye(k), np.eye(k)
        for i, j in itertools.combinations(range(k), 2):
            wsim[i, j] = wsim[j, i] = _cosine(ws[i], ws[j])
            cka[i, j] = cka[j, i] = _cka_from_grams(grams[layers[i]], grams[layers[j]])
        out.append(StageSimilarity(key[0], key[1], tuple(layers), wsim, cka))
    return out


def stage_similarity(model: nn.Module, images: torch.Tensor) -> list[StageSimilarity]:
    """For every stage and conv role with two or more same-shape convolutions, the matrices of weight
    cosine and output CKA between them (one forward pass of ``images`` for all; each layer's Gram
    matrix is computed once). :func:`find_opportunities` returns the same matrices from its pass."""
    lanes = _similarity_lanes(model)
    grams, _, _ = _one_pass(model, images, None, [n for _, names in lanes for n in names], [], [])
    return _stage_matrices(model, lanes, grams)


@dataclass(frozen=True)
class Choice:
    """A set of disjoint groups chosen to save at least a parameter budget (:func:`choose_groups`)."""

    groups: tuple[tuple[str, ...], ...]
    params_saved: int
    by: str  # the measured cost the choice minimises: measured_kl, measured_loss or measured_drop
    predicted: float  # the groups' costs (each measured alone) added up
    measured: float | None = None  # the cost measured with all of them tied at once (None: not verified)
    measured_drop: float | None = None  # all tied at once: accuracy points lost,
    measured_loss: float | None = None  # the rise of the held-out cross-entropy,
    measured_kl: float | None = None  # and the mean KL from the untied predictions
    complete: bool = True  # False: the search was cut short, so a cheaper set than these may exist


BUDGET_COSTS = ("measured_kl", "measured_loss", "measured_drop")


def group_saving(model: nn.Module, group: Sequence[str]) -> int:
    """Parameters saved by tying ``group``: every member but the first stops storing its weight and,
    where the convolutions have one, its bias (a tied use site applies the owner's both)."""
    conv = model.get_submodule(group[0])
    per_layer = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    return (len(group) - 1) * per_layer


SEARCH_NODES = 1_000_000  # sets of groups the budget search looks at before it stops and says it was cut short
SEARCH_KEPT = 200_000  # minimal sets it keeps when asked for all of them


def most_saved(rows: Sequence[Opportunity]) -> int:
    """The most that any choice of ``rows``' groups no two of which share a layer saves (adding up the
    rows would count a layer once for every group it is in). Exact (:func:`best_disjoint_saving`);
    only where that search is cut short, an upper bound: the chains of overlapping groups tied whole."""
    return best_disjoint_saving(rows)[0]


def best_disjoint_saving(rows: Sequence[Opportunity], max_nodes: int = SEARCH_NODES) -> tuple[int, bool]:
    """(the most any choice of disjoint groups of ``rows`` saves, exact). Groups that share a layer join
    one chain (of one conv shape: one saving per layer); each chain is searched on its own, depth first
    over its groups, largest saving first: a branch is left once even every free layer at the best
    saving per layer of any group holding it cannot beat the best choice so far. For candidate runs the
    first choice, the whole chain, is the best and ends the search at once; groups a user passes need not
    form runs (a+b and b+c: the chain a, b, c is no group, so it saves one layer, not two).

    After ``max_nodes`` branches in all it stops, ``exact`` False, and returns an upper bound instead: a
    chain of ``n`` layers saves at most ``n - 1`` layers' parameters."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        for n in r.group[1:]:
            parent[root(n)] = root(r.group[0])
    chains: dict[str, list[Opportunity]] = {}
    for r in rows:
        chains.setdefault(root(r.group[0]), []).append(r)
    nodes, total, exact = 0, 0, True
    for members in chains.values():
        members = sorted(members, key=lambda r: -r.params_saved)
        layers = [frozenset(r.group) for r in members]
        saved = [r.params_saved for r in members]
        rate: dict[str, float] = {}
        for r in members:
            for n in r.group:
                rate[n] = max(rate.get(n, 0.0), r.params_saved / len(r.group))
        every = frozenset(rate)
        per_layer = max(r.params_saved // max(len(r.group) - 1, 1) for r in members)
        bound = (len(every) - 1) * per_layer
        best = 0
        stopped = False

        def walk(start: int, used: frozenset, now: int) -> None:
            """Every choice that adds one more group, from position ``start`` on, to the groups ``used``."""
            nonlocal best, nodes, stopped
            best = max(best, now)
            if best >= bound or now + sum(rate[n] for n in every - used) <= best + 1e-9:
                return  # the whole chain is reached, or the free layers cannot beat the best so far
            for p in range(start, len(members)):
                if stopped or best >= bound:
                    return
                if layers[p] & used:
                    continue
                nodes += 1
                if nodes > max_nodes:
                    stopped = True
                    return
                walk(p + 1, used | layers[p], now + saved[p])

        walk(0, frozenset(), 0)
        exact = exact and not stopped
        total += bound if stopped else best
    return total, exact


def selection_saving(rows: Sequence[Opportunity]) -> tuple[int, list[str]]:
    """(parameters saved, layers in more than one group) of tying the groups of ``rows`` together; with
    overlaps the choice cannot be tied as it is, and the saving is that of its disjoint part only."""
    seen: dict[str, int] = {}
    for r in rows:
        for n in r.group:
            seen[n] = seen.get(n, 0) + 1
    twice = [n for n, k in seen.items() if k > 1]
    return sum(r.params_saved for r in rows if not set(r.group) & set(twice)), twice


def _disjoint_sets(rows: Sequence[Opportunity], budget: int, costs: Sequence[float] | None = None,
                   keep: int | None = None, *, limit: int = SEARCH_KEPT, max_nodes: int = SEARCH_NODES,
                   progress: Callable[[int, int, str], None] | None = None) -> tuple[list[tuple[int, ...]], bool]:
    """(sets, complete): sets of rows no two of which share a layer and that save at least ``budget``
    parameters, minimal (dropping any member would miss the budget), as sorted tuples of row indices,
    found by depth-first search.

    Without ``costs``: every such set, in lexicographic order (at most ``limit`` kept). With ``costs``
    (one per row) and ``keep``: the ``keep`` sets with the least summed cost (ties: fewer parameters
    saved, then lexicographic), best first: exactly the first ``keep`` of every set sorted that way,
    found by branch and bound (a branch is left once even the negative costs of the rows after it
    cannot bring it under the ``keep``-th best so far).

    The rows are walked largest saving first, so a set is only ever extended while it is short of the
    budget and the row that crosses it is its smallest: every set reached is minimal, and the count
    of sets looked at is not spent on the many that are not. A branch is also left once the layers it
    has not used cannot save the rest of the budget (each layer counted at the best saving per layer
    of any row holding it). Neither drops a set.
    ``complete`` is False when the search stopped early: ``max_nodes`` sets looked at, or ``limit``
    sets kept; the sets are then those found so far. ``progress(looked at, max_nodes, what)`` is
    called every few thousand sets, so a caller can cancel (by raising) mid-search."""
    import bisect

    n = len(rows)
    layers = [frozenset(r.group) for r in rows]
    saved = [r.params_saved for r in rows]
    per_layer: dict[str, float] = {}  # the most any row saves per layer it uses: an upper bound per free layer
    for r in rows:
        for name in r.group:
            per_layer[name] = max(per_layer.get(name, 0.0), r.params_saved / len(r.group))
    row_bound = [sum(per_layer[name] for name in layers[i]) for i in range(n)]
    slack = 1e-9 * max(budget, 1)  # bounds are floats: leave a branch only when clearly out of reach
    ranked = costs is not None and keep is not None
    # Largest saving first: the row that crosses the budget is then a set's smallest, so every set that
    # crosses it is minimal and no time goes into the many that are not; equal savings cheapest first.
    order = sorted(range(n), key=lambda i: (-saved[i], float(costs[i]) if ranked else 0.0, i))
    # From position p on: the negative costs added up, the saving of the rows that cost nothing or less,
    # and the least cost per parameter saved of the others: any completion that saves R more costs at
    # least neg + rate * (R - free_saving) (a fractional knapsack's bound; disjointness ignored).
    neg_after, free_after, rate_after = [0.0] * (n + 1), [0] * (n + 1), [float("inf")] * (n + 1)
    if ranked:
        for p in range(n - 1, -1, -1):
            c, sv = float(costs[order[p]]), saved[order[p]]
            neg_after[p] = neg_after[p + 1] + min(0.0, c)
            free_after[p] = free_after[p + 1] + (sv if c <= 0 else 0)
            rate_after[p] = min(rate_after[p + 1], c / sv) if c > 0 and sv > 0 else rate_after[p + 1]

    def least_more(p: int, rest: int) -> float:
        """The least cost that rows from position p on can add while saving ``rest`` more parameters."""
        short = rest - free_after[p]
        if short <= 0:
            return neg_after[p]
        return neg_after[p] + (rate_after[p] * short if rate_after[p] < float("inf") else float("inf"))
    best: list[tuple[float, int, tuple[int, ...]]] = []  # (cost, saved, set), ascending; at most ``keep``
    found: list[tuple[int, ...]] = []
    nodes = 0
    stopped = False
    every = 5_000

    def cut_off(cost: float) -> bool:
        if len(best) < keep:
            return False
        worst = best[-1][0]
        return cost > worst + 1e-9 * max(1.0, abs(worst))

    def walk(start: int, chosen: tuple[int, ...], used: frozenset, total: int, free: float, cost: float) -> None:
        nonlocal nodes, stopped
        for p in range(start, n):
            if stopped:
                return
            i = order[p]
            if layers[i] & used:
                continue
            nodes += 1
            if progress and nodes % every == 0:
                progress(nodes, max_nodes, f"looking for disjoint groups: {nodes:,} sets looked at, "
                                           f"{len(best) if ranked else len(found):,} kept")
            if nodes >= max_nodes:
                stopped = True
                return
            now = total + saved[i]
            if now >= budget:
                s = tuple(sorted(chosen + (i,)))
                if all(now - saved[j] < budget for j in s):
                    if ranked:
                        entry = (sum(float(costs[j]) for j in s), now, s)
                        if len(best) < keep or entry < best[-1]:
                            bisect.insort(best, entry)
                            del best[keep:]
                    else:
                        found.append(s)
                        if len(found) >= limit:
                            stopped = True
                            return
                continue
            left = free - row_bound[i]
            if now + left < budget - slack:
                continue  # the unused layers cannot make up the rest
            c = cost + float(costs[i]) if ranked else 0.0
            if ranked and cut_off(c + least_more(p + 1, budget - now)):
                continue
            walk(p + 1, chosen + (i,), used | layers[i], now, left, c)

    walk(0, (), frozenset(), 0, sum(per_layer.values()), 0.0)
    if ranked:
        return [s for _, _, s in best], not stopped
    return sorted(found), not stopped


def choose_groups(model: nn.Module, rows: Sequence[Opportunity], budget: int, images: torch.Tensor,
                  held_out: tuple[torch.Tensor, torch.Tensor], *, by: str = "measured_kl", verify: int = 8,
                  progress: Callable[[int, int, str], None] | None = None,
                  max_nodes: int = SEARCH_NODES) -> list[Choice]:
    """Disjoint groups among ``rows`` (scored with held-out data) that save at least ``budget``
    parameters at the least measured cost ``by``, best first.

    Ranks cannot be added up, measured costs can (to first order): every minimal disjoint set saving
    the budget is ranked by the sum of its groups' costs, each measured alone (ties: fewer parameters
    saved; :func:`_disjoint_sets` finds the best without listing them all). Costs do not add exactly
    (tying one group changes what the next sees), so the ``verify`` best sets are then tied together,
    BatchNorm re-estimated on ``images``, and measured on ``held_out``; the list is then sorted by
    that measurement. The default cost is the KL divergence
    from the untied model's predictions, the measured cost that best predicted the accuracy lost
    after fine-tuning in ``benchmarks/bench_tie.py`` (``checkpoints/REPORT.md``).

    The search looks at ``max_nodes`` sets of groups at most; when it stops there, the best sets it
    found are returned with ``complete`` False (a cheaper set may exist), and with none found it
    says the search was cut short, not that no set exists. ``progress`` is called during the search
    too (raising in it stops the search).
    """
    from wsviz.models.tie import tie

    if by not in BUDGET_COSTS:
        raise WsvizError(f"Unknown cost {by!r}; choose one of {', '.join(BUDGET_COSTS)}.")
    if any(getattr(r, by) is None for r in rows):
        raise WsvizError("Choosing groups under a budget needs each group's measured cost: score them with "
                         "held-out data.")
    if budget <= 0:
        raise WsvizError(f"The parameter budget must be a positive number of parameters to save, got {budget}.")
    best, complete = _disjoint_sets(rows, budget, [getattr(r, by) for r in rows], max(verify, 1),
                                    max_nodes=max_nodes, progress=progress)
    if not best:
        most, exact = best_disjoint_saving(rows)
        if exact and (complete or most < budget):
            raise WsvizError(f"No disjoint candidate groups save {budget:,} parameters: the most any choice of disjoint "
                             f"groups saves is {most:,}; lower the budget or pass larger groups.")
        if complete:
            raise WsvizError(f"No disjoint candidate groups save {budget:,} parameters (every choice of them was looked "
                             "at); lower the budget or pass larger groups.")
        exist = f"such sets exist (the most any choice of disjoint groups saves is {most:,})" if exact else \
            f"such sets may exist (no choice of disjoint groups saves more than {most:,})"
        raise WsvizError(f"The search for disjoint groups saving {budget:,} parameters was cut short after "
                         f"looking at {max_nodes:,} sets of groups without finding one; {exist}: pass fewer or "
                         "larger groups.")

    def predicted(s):
        return sum(getattr(rows[i], by) for i in s), sum(rows[i].params_saved for i in s)

    baseline = _untied_baseline(model, images, held_out) if verify else None
    out = []
    for k, s in enumerate(best):
        groups = tuple(rows[i].group for i in s)
        cost, saved = predicted(s)
        choice = Choice(groups, saved, by, cost, complete=complete)
        if verify:
            if progress:
                progress(k, len(best), " | ".join(" + ".join(g) for g in groups))
            now = _tying_costs(tie(model, [list(g) for g in groups], init="lstsq", images=images), images, held_out,
                               baseline)
            choice = replace(choice, measured=now[by], **now)
        out.append(choice)
    if progress and verify:
        progress(len(best), len(best), "done")
    if verify:
        out.sort(key=lambda c: (c.measured, c.params_saved))
    return out
