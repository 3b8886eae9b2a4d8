"""Kernels: top-k 2-D kernels by magnitude (Aich et al. Fig. 3/4), how alike two kernel sets
are, and ShaRDNet's blending layers (Fig. 4) with their pruning curve (Fig. 5).

A "kernel layer" is every convolution weight a model applies, named by its parameter when
it is one (a shared weight is listed once, however often it is applied) or by the module
that builds it otherwise (RepeatNet's realised block, e2cnn's expanded filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from wsviz.errors import WsvizError


@dataclass(frozen=True)
class KernelLayer:
    name: str  # parameter name, or module path for a derived weight
    shape: tuple[int, ...]  # (out, in, kh, kw)
    derived: bool
    uses: int  # how many times one forward pass applies it


def kernel_layers(model: nn.Module, min_size: int = 2) -> list[KernelLayer]:
    """Every conv weight with kernels of at least ``min_size`` x ``min_size``, in forward order."""
    from wsviz.models import sharing_report

    uses, _, _ = sharing_report(model)
    out: dict[str, KernelLayer] = {}
    for u in uses:
        if u.op != "conv2d" or len(u.applied_shape) != 4 or min(u.applied_shape[2:]) < min_size:
            continue
        name = u.site if u.derived else u.param
        if u.derived and not (u.param.endswith("weight") or u.param.endswith("weights")):
            continue  # transform parameters (swish betas, sign latents) are not the layer's name
        prev = out.get(name)
        out[name] = KernelLayer(name, u.applied_shape, u.derived, 1 if prev is None else prev.uses + 1)
    return list(out.values())


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (out, in, kh, kw) weight of a kernel layer, detached, on the CPU."""
    params = dict(model.named_parameters())
    if name in params and params[name].ndim == 4:
        return params[name].detach().cpu()
    modules = dict(model.named_modules())
    mod = modules.get(name)
    if mod is not None:
        if hasattr(mod, "realised_weight"):  # RepeatConv2d
            with torch.no_grad():
                return mod.realised_weight().detach().cpu()
        if hasattr(mod, "expand_parameters"):  # e2cnn R2Conv
            with torch.no_grad():
                w, _ = mod.expand_parameters()
            return w.detach().cpu()
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 4:
            return w.detach().cpu()
    names = [k.name for k in kernel_layers(model)]
    raise WsvizError(f"{name!r} is not a conv layer of this model; choose one of: {', '.join(names[:12])}"
                     + (" ..." if len(names) > 12 else ""))


@dataclass
class TopKernels:
    """The ``k`` 2-D kernels of largest aggregate magnitude (sum of |w|), largest first."""

    kernels: np.ndarray  # (k, kh, kw)
    out_index: np.ndarray  # (k,) output channel of each kernel
    in_index: np.ndarray  # (k,) input channel of each kernel
    magnitude: np.ndarray  # (k,) sum of |w| over the kernel


def top_k_kernels(weight: torch.Tensor, k: int = 256) -> TopKernels:
    """Aich et al. Fig. 3/4: the ``k`` kernels (of out x in) with the highest sum of |w|."""
    if weight.ndim != 4:
        raise WsvizError(f"Expected a (out, in, kh, kw) conv weight, got shape {tuple(weight.shape)}.")
    o, i, kh, kw = weight.shape
    flat = weight.reshape(o * i, kh, kw).float()
    mag = flat.abs().sum((1, 2))
    k = min(k, o * i)
    top = torch.topk(mag, k).indices
    return TopKernels(flat[top].numpy(), (top // i).numpy(), (top % i).numpy(), mag[top].numpy())


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
    """The same score for two independent Gaussian kernel sets: what "unrelated" looks like."""
    rng = np.random.default_rng(seed)
    return float(np.mean([kernel_set_similarity(rng.standard_normal((k, kh, kw)), rng.standard_normal((k, kh, kw)))
                          for _ in range(trials)]))


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

    No retraining; the model's weights are restored afterwards, even on error.
    """
    from wsviz.training.loop import evaluate

    layers = model.blending_layers() if hasattr(model, "blending_layers") else []
    if not layers:
        blending_weights(model)  # raises the explanatory error
    saved = [m.weight.detach().clone() for m in layers]
    allw = torch.cat([w.abs().flatten() for w in saved])
    accs, counts = [], []
    try:
        for f in fractions:
            n = int(round(f * allw.numel()))
            thresh = torch.kthvalue(allw, n).values if n > 0 else None
            for m, w in zip(layers, saved):
                m.weight.copy_(w if thresh is None else torch.where(w.abs() <= thresh, torch.zeros_like(w), w))
            _, acc, _ = evaluate(model, images, labels)
            accs.append(acc)
            counts.append(n)
    finally:
        for m, w in zip(layers, saved):
            m.weight.copy_(w)
    return PruningCurve(np.asarray(fractions, dtype=float), np.asarray(accs), np.asarray(counts))
