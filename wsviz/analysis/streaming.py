"""Per-sample predictions of several models under several input transformations, streamed.

The one evaluation loop behind the sweeps and the fair comparison: the data are read once, in
batches (:func:`wsviz.data.stream.batches`: tensors sliced, datasets through a DataLoader with
workers, this rank's share under torchrun); every batch is transformed once per variant (a
scale factor, an angle: :mod:`wsviz.data.resample`) on the models' device and fed to every model
that still needs it; only the predicted classes are kept. Results known in the prediction cache
(:mod:`wsviz.analysis.cache`) are read instead of computed, and new ones are written there (by
rank 0 only, once the ranks' results are gathered).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from wsviz.analysis.cache import PredictionCache, model_hash, tensor_hash
from wsviz.data.datasets import fit_to
from wsviz.data.stream import EvalData, batches, distributed, gather, num_samples, share_size
from wsviz.device import model_device
from wsviz.errors import WsvizError
from wsviz.models.modes import eval_mode
from wsviz.models.registry import input_shape

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, what): images x variants of this rank's share


@dataclass(frozen=True)
class Variant:
    """An input transformation: ``key`` names it in the cache (``identity``, ``rescale=0.5``)."""

    key: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None


IDENTITY = Variant("identity")


@dataclass
class PredictionSet:
    """Predicted classes per (model, variant key), one per sample in sample order."""

    predictions: dict[tuple[str, str], np.ndarray]
    labels: np.ndarray | None
    samples: int
    shares: list[int] = field(default_factory=list)  # samples each rank evaluated (empty: all from the cache)
    cached: int = 0  # (model, variant) results read from the cache


def data_ident(source, labels: torch.Tensor | None = None) -> tuple[str, str] | None:
    """(identity, transform) of a source for the cache, or None when it has no stable identity."""
    if isinstance(source, EvalData):
        return source.ident, source.transform
    if isinstance(source, torch.Tensor):
        return f"tensor:{tensor_hash(source)}", "none"
    return None


def _known_labels(source, labels) -> np.ndarray | None:
    if labels is not None:
        return torch.as_tensor(labels).cpu().numpy().astype(np.int64)
    if isinstance(source, EvalData):
        try:
            return source.labels.numpy().astype(np.int64)
        except WsvizError:
            return None
    return None


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def predict_variants(models: Mapping[str, nn.Module], source, labels: torch.Tensor | None = None,
                     variants: Sequence[Variant] = (IDENTITY,), *, batch_size: int = 512, workers: int = 0,
                     loader: str = "auto", cache: PredictionCache | None = None, progress: Progress | None = None,
                     ) -> PredictionSet:
    """Every model's predicted class for every sample of ``source`` under every variant.

    ``source``: a tensor (with ``labels``), an :class:`~wsviz.data.stream.EvalData`, a dataset or
    an in-order DataLoader. Under an initialised torch.distributed group each rank evaluates its
    share and every rank returns the gathered whole. Images are never held beyond one batch.
    """
    if not models:
        raise WsvizError("Choose at least one model.")
    keys = list(dict.fromkeys(v.key for v in variants))
    by_key = {v.key: v for v in variants}
    rank, world = distributed()
    n = num_samples(source)
    if n == 0:
        raise WsvizError("No images to evaluate: the data are empty.")
    known = _known_labels(source, labels)
    ident = data_ident(source, labels) if cache is not None else None
    entry = {}
    if cache is not None and ident is not None:
        entry = {(m, k): cache.key(model_hash(model), *ident, k) for m, model in models.items() for k in keys}
    cached: dict[tuple[str, str], np.ndarray] = {}
    if rank == 0:
        for mk, key in entry.items():
            arr = cache.get(key)
            if arr is not None and arr.shape == (n,):
                cached[mk] = arr
    cached = _broadcast(cached, world)
    missing = [(m, k) for m in models for k in keys if (m, k) not in cached]
    result = PredictionSet(dict(cached), known, n, cached=len(cached))
    if not missing and known is not None:
        log.info("all %d results read from the prediction cache", len(cached))
        return result

    need = {k: [m for m, kk in missing if kk == k] for k in keys}
    need = {k: ms for k, ms in need.items() if ms} or {keys[0]: []}  # labels only: one pass, no model
    shapes = {m: input_shape(models[m])[:2] for m in {m for ms in need.values() for m in ms}}
    devices = {m: model_device(models[m]) for m in shapes}
    first = next(iter(devices.values()), torch.device("cpu"))
    parts: dict[tuple[str, str], list[torch.Tensor]] = {(m, k): [] for k, ms in need.items() for m in ms}
    share = share_size(n, rank, world)
    idx_parts, lab_parts, done, images, total = [], [], 0, 0, share * len(need)
    with contextlib.ExitStack() as stack:
        for m in shapes:
            stack.enter_context(eval_mode(models[m]))
        for b in batches(source, labels, batch_size, workers=workers, loader=loader, rank=rank, world_size=world,
                         pin_memory=first.type == "cuda"):
            x = b.images.to(first, non_blocking=True)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            for k, ms in need.items():
                if ms:
                    fn = by_key[k].fn
                    xk = fn(x) if fn is not None else x
                    for m in ms:
                        c, s = shapes[m]
                        out = models[m](fit_to(xk.to(devices[m]), c, s))
                        parts[(m, k)].append(out.argmax(1).cpu())
                done += len(b.index)
                if progress is not None:  # after every (batch, variant): a page's Cancel answers within one
                    progress(done, total, f"{images + len(b.index):,} of {share:,} images, {k}")
            images += len(b.index)
            idx_parts.append(b.index.cpu())
            lab_parts.append(b.labels)
    index = torch.cat(idx_parts) if idx_parts else torch.empty(0, dtype=torch.long)
    local = {f"{m}\0{k}": (torch.cat(p) if p else torch.empty(0, dtype=torch.long)).numpy() for (m, k), p in
             parts.items()}
    if known is None and all(y is not None for y in lab_parts):
        local["\0labels"] = (torch.cat(lab_parts) if lab_parts else torch.empty(0, dtype=torch.long)).numpy()
    full, shares = gather(n, index, local, world)
    labels_full = full.pop("\0labels", None)
    if result.labels is None and labels_full is not None:
        result.labels = labels_full.astype(np.int64)
    for name, arr in full.items():
        m, k = name.split("\0")
        result.predictions[(m, k)] = arr.astype(np.int64)
        if rank == 0 and (m, k) in entry:
            cache.put(entry[(m, k)], arr)
    result.shares = shares
    return result
