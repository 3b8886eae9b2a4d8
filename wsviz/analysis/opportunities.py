"""Where could a trained network share weights, and what would each sharing cost?

For every candidate group of same-shape convolutions (by default contiguous runs of blocks in one
stage, the same conv role in each: ShaResNet's pattern generalised), four scores:

* ``weight_similarity``: mean pairwise cosine of the members' trained kernels (flattened);
* ``output_cka``: mean pairwise linear CKA of the members' outputs on a calibration batch (Nguyen,
  Raghu & Kornblith 2021 find runs of near-identical representations in deep nets);
* ``gradient_conflict``: 1 - mean pairwise cosine of the loss gradients with respect to the members'
  weights on the calibration batch (SuperWeights' signal: members pulled apart by training);
* ``measured_drop``: held-out accuracy of the untied model minus that of the model tied now
  (least-squares init), both with BatchNorm statistics re-estimated on the calibration batch (so
  the drop is the tying's alone), no fine-tuning.

Tying itself is :func:`wsviz.models.tie.tie`; this module only scores.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsviz.analysis.similarity import linear_cka
from wsviz.errors import WsvizError
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


def _place(name: str) -> tuple[str, int, str] | None:
    """(stage, block index, role) of a module path: its last numeric component is the block
    ("trunk.stages.2.1.conv2" -> ("trunk.stages.2", 1, "conv2"); "layer3.1.conv2" -> ("layer3", 1, "conv2"))."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    if not idx:
        return None
    i = idx[-1]
    return ".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:])


def candidate_groups(model: nn.Module, max_size: int | None = None) -> list[tuple[str, ...]]:
    """Contiguous runs (two or more) of blocks within a stage whose conv of the same role has the same
    weight shape, stride and padding; convolutions already shared are left out."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(m, SharedConv2d)
             and min(m.kernel_size) > 1}
    if not convs:
        raise WsvizError("This model has no (unshared) convolutions with kernels larger than 1x1 to share.")
    lanes: dict[tuple, list[tuple[int, str]]] = {}
    for name, m in convs.items():
        place = _place(name)
        if place is None:
            continue
        stage, block, role = place
        key = (stage, role, tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups)
        lanes.setdefault(key, []).append((block, name))
    out = []
    for members in lanes.values():
        members.sort()
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


def _pairwise_mean(values: list[torch.Tensor], fn: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    return float(np.mean([fn(a, b) for a, b in itertools.combinations(values, 2)]))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def score_groups(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 groups: Sequence[Sequence[str]] | None = None, held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> list[Opportunity]:
    """Score every group (default :func:`candidate_groups`) on a calibration batch ``images``/``labels``;
    with ``held_out`` (images, labels), also the accuracy lost by tying each group now. Sorted by the
    measured drop when there is one, else by output CKA (most alike first)."""
    from wsviz.models.tie import check_groups, reestimate_batchnorm, tie
    from wsviz.training.loop import evaluate

    groups = [tuple(g) for g in (groups if groups is not None else candidate_groups(model))]
    if not groups:
        raise WsvizError("No candidate groups: no stage has two blocks with same-shape convolutions.")
    check_groups(model, groups)
    convs = {n: model.get_submodule(n) for g in groups for n in g}
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: outputs.__setitem__(n, o)) for n, m in convs.items()]
    was = model.training
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    grads = {n: m.weight.grad.detach().clone() for n, m in convs.items()}
    model.zero_grad(set_to_none=True)
    feats = {n: o.detach().flatten(1).numpy() for n, o in outputs.items()}
    # the baseline gets the same BatchNorm re-estimation, so the drop is the tying's alone
    base = evaluate(reestimate_batchnorm(copy.deepcopy(model), images), *held_out)[1] if held_out is not None \
        else None
    out = []
    for i, g in enumerate(groups):
        if progress:
            progress(i, len(groups), " + ".join(g))
        ws = [convs[n].weight.detach() for n in g]
        drop = None
        if held_out is not None:
            tied = reestimate_batchnorm(tie(model, [g], init="lstsq", images=images), images)
            drop = 100 * (base - evaluate(tied, *held_out)[1])
        out.append(Opportunity(
            g, (len(g) - 1) * ws[0].numel(), _pairwise_mean(ws, _cosine),
            float(np.mean([linear_cka(feats[a], feats[b]) for a, b in itertools.combinations(g, 2)])),
            1.0 - _pairwise_mean([grads[n] for n in g], _cosine), drop))
    key = (lambda o: o.measured_drop) if held_out is not None else (lambda o: -o.output_cka)
    return sorted(out, key=key)
