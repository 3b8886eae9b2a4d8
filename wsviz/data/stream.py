"""Evaluation data at any scale: one dataset abstraction, read in batches, on one process or many.

Training streams its data through :mod:`wsviz.data.loaders`; the analyses read theirs the same
way. A *source* is any of

* a tensor of images (N, C, H, W) with optional labels: the in-memory fast path, sliced into
  batches (no DataLoader, no per-image indexing);
* an :class:`EvalData` (from :func:`eval_data`): a ``torch.utils.data.Dataset`` — an image
  folder decoded one image at a time with the recipe's evaluation transform, a torchvision
  dataset, or the shipped digit sets — plus a stable identity (for the prediction cache) and
  what is known about every sample without decoding it (labels, protocol angles / scales);
* any map-style ``Dataset`` yielding ``(image, label)`` (PIL images are converted), or a
  ``DataLoader`` that reads its dataset in order (not under torchrun).

:func:`batches` yields :class:`Batch` es (sample indices, images, labels) of this process's
share. Under torchrun each rank reads the indices ``rank, rank + world, ...``
(:class:`~wsviz.data.loaders.ShardSampler`: no padding, no duplicates) and :func:`gather`
puts the per-sample results of all ranks back in sample order, checking that every sample was
counted exactly once. Only per-sample results (predictions, a few numbers) are kept; images are
dropped after their batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from wsviz.data.loaders import TensorImages, eval_loader, folder_dataset, transforms_for
from wsviz.errors import WsvizError

log = logging.getLogger(__name__)

LOADERS = ("auto", "memory", "stream")


@dataclass
class EvalData:
    """A split to evaluate on: a map-style dataset and what identifies it.

    ``ident`` names the data (dataset, split, realisation, and for folders a digest of the file
    list with sizes and modification times), ``transform`` the evaluation transform: together
    they key cached predictions. ``angles`` / ``scales`` are the protocol's per-sample values,
    when the set has them.
    """

    dataset: Dataset
    ident: str
    transform: str = "none"
    description: str = ""
    angles: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    indices: np.ndarray | None = field(default=None, repr=False)  # rows of the full split, when a subset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        """Every sample's label, read without decoding any image."""
        return dataset_labels(self.dataset)

    def subset(self, indices, what: str = "") -> EvalData:
        """The samples at ``indices`` (sorted, distinct) of this data, keeping their order."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise WsvizError(f"Subset indices must be positions 0..{len(self) - 1} of the data.")
        digest = hashlib.sha256(idx.tobytes()).hexdigest()[:16]
        pick = (lambda t: None if t is None else t[torch.from_numpy(idx)])  # noqa: E731
        full = idx if self.indices is None else self.indices[idx]
        return EvalData(Subset(self.dataset, idx.tolist()), f"{self.ident}|rows={len(idx)}:{digest}", self.transform,
                        what or f"{len(idx):,} of {len(self):,} images of {self.description or self.ident}",
                        pick(self.angles), pick(self.scales), full)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, labels) when the data are an untransformed in-memory split (the fast path), else None."""
        ds, rows = self.dataset, None
        if isinstance(ds, Subset) and isinstance(ds.dataset, TensorImages):
            rows, ds = torch.as_tensor(list(ds.indices), dtype=torch.long), ds.dataset
        if isinstance(ds, TensorImages) and ds.transform is None:
            return (ds.images, ds.labels) if rows is None else (ds.images[rows], ds.labels[rows])
        return None


def _check_count(k, what: str) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0):
        raise WsvizError(f"{what} must be a whole number of images >= 0 (0 or None: all of them), got {k!r}.")


def spread_indices(n: int, k: int | None) -> np.ndarray:
    """``k`` indices evenly spaced over ``0..n-1`` (all of them if ``k`` is None, 0 or >= n), as
    :meth:`wsviz.data.digits.DigitSplit.spread` picks them: splits in class order keep every class."""
    _check_count(k, "The number of images (limit)")
    if not k or k >= n:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def sample_indices(n: int, k: int | None, seed: int = 0) -> np.ndarray:
    """A fixed (seeded) random subset of ``k`` of ``n`` indices, sorted; all when ``k`` >= n."""
    _check_count(k, "The number of images (limit)")
    if not k or k >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


def _folder_digest(ds: Dataset) -> str:
    """A digest of the files behind a folder dataset: paths, sizes and modification times."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    h = hashlib.sha256()
    for path, target in getattr(base, "samples", []):
        st = os.stat(path)
        h.update(f"{path}\0{target}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if isinstance(ds, Subset):
        h.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def split_fingerprint(name: str, split: str = "test", seed: int = 0) -> str | None:
    """What identifies the content of an image folder's split now (its files' paths, sizes and modification
    times), so that a result computed on it is known stale once a file changes; None for the built-in
    sets (their name says it) and for a folder that cannot be read (using it says why)."""
    if not name.startswith("folder:"):
        return None
    try:
        return _folder_digest(folder_dataset(name[len("folder:"):], split, seed))
    except (WsvizError, OSError):
        return None


def eval_data(name: str, split: str = "test", *, size: int | None = None, augment: str = "none", seed: int = 0,
              limit: int | None = None, data_root: str | Path | None = None, download: bool = False) -> EvalData:
    """Dataset ``name``'s ``split`` as :class:`EvalData`, with ``limit`` images spread over it (all: None).

    Image folders (``folder:PATH``) are decoded one image at a time when read, with the
    ``augment`` preset's evaluation transform at ``size`` pixels (``none``: letterboxed to the
    size; ``imagenet``: resize to 8/7 and centre crop; default size 32, as the app's
    in-memory folders); nothing is decoded here. The other sets are in memory already (the
    digit sets and torchvision's tensors) and stay tensors: untransformed, unless ``augment`` has an
    evaluation transform for tensors and ``size`` is given (``imagenet``: resize to 8/7 of ``size`` and
    centre crop), which is what the training loop tested such a model on.
    """
    from wsviz.data.datasets import dataset_info, load_split

    _check_count(limit, "limit")
    info = dataset_info(name)
    if name.startswith("folder:"):
        side = size or 32
        ds = folder_dataset(name[len("folder:"):], split, seed, transforms_for(augment, side, train=False,
                                                                                from_pil=True))
        data = EvalData(ds, f"{name}|{split}|seed={seed}|files={_folder_digest(ds)}", f"eval:{augment}@{side}",
                        f"{name} ({split})")
    else:
        te = load_split(name, split, data_root=data_root, seed=seed, download=download)
        tf = None if size is None else transforms_for(augment, size, train=False, from_pil=False,
                                                      side=te.images.shape[-1])
        where = "" if data_root is None else f"|root={Path(data_root).expanduser().resolve()}"  # another copy
        data = EvalData(TensorImages(te.images, te.labels, tf), f"{name}|{split}|seed={seed}|n={len(te.labels)}{where}",
                        "none" if tf is None else f"eval:{augment}@{size}", f"{info.name} ({split})", te.angles,
                        te.scales)
    if limit and limit < len(data):
        data = data.subset(spread_indices(len(data), limit))
    return data


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """The labels of a map-style dataset without decoding its images, where it says them
    (in-memory splits, ``ImageFolder``, torchvision sets, subsets of those); else a WsvizError."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if isinstance(ds, TensorImages):
        return torch.as_tensor(ds.labels, dtype=torch.long)
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(np.asarray(targets), dtype=torch.long)
    raise WsvizError(f"Cannot read the labels of a {type(ds).__name__} without decoding it; give an EvalData "
                     "(wsviz.data.stream.eval_data) or a dataset with a `targets` list.")


# ------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Samples ``index`` (positions in the source) with their images and labels (None when unknown)."""

    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor | None


class _Indexed(Dataset):
    """``(index, image, label)`` per sample, images as tensors (PIL and arrays converted)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
        if not isinstance(x, torch.Tensor):
            from torchvision.transforms.v2.functional import to_image

            x = to_image(x)
        return i, x, torch.as_tensor(y, dtype=torch.long)


def num_samples(source) -> int:
    if isinstance(source, DataLoader):
        return len(source.dataset)
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise WsvizError(f"Expected images as (N, C, H, W), got shape {tuple(source.shape)}.")
        return len(source)
    if isinstance(source, (EvalData, Dataset)):
        return len(source)
    raise WsvizError(f"Cannot read images from a {type(source).__name__}: give a tensor (N, C, H, W), a dataset "
                     "(wsviz.data.stream.eval_data) or a DataLoader.")


def distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_size(n: int, rank: int, world: int) -> int:
    return len(range(rank, n, world))


def batches(source, labels: torch.Tensor | None = None, batch_size: int = 256, *, workers: int = 0,
            loader: str = "auto", rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> Iterator[Batch]:
    """This rank's share of ``source`` in batches of ``batch_size``, in sample order.

    ``loader``: ``memory`` slices in-memory tensors (a tensor source, or an :class:`EvalData`
    whose split is in memory untransformed), ``stream`` reads every source through a
    ``DataLoader`` with ``workers`` processes, ``auto`` slices when it can.
    """
    if loader not in LOADERS:
        raise WsvizError(f"loader must be one of {LOADERS}, got {loader!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise WsvizError(f"batch_size must be a positive whole number, got {batch_size!r}.")
    n = num_samples(source)
    if isinstance(source, DataLoader):
        yield from _loader_batches(source, world_size)
        return
    tensors = (source, labels) if isinstance(source, torch.Tensor) else \
        source.tensors() if isinstance(source, EvalData) else None
    if loader == "memory" and tensors is None:
        raise WsvizError("loader='memory' needs images in memory (a tensor, or an in-memory dataset); this data is "
                         "read from files: use loader='stream' or 'auto'.")
    if tensors is not None and loader != "stream":
        images, labs = tensors
        order = torch.arange(rank, n, world_size)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            sl = slice(int(idx[0]), int(idx[-1]) + 1) if world_size == 1 else idx
            yield Batch(idx, images[sl], None if labs is None else torch.as_tensor(labs[sl]))
        return
    if isinstance(source, torch.Tensor):
        ds: Dataset = TensorImages(source, labels if labels is not None else torch.full((n,), -1, dtype=torch.long))
    else:
        ds = source.dataset if isinstance(source, EvalData) else source
    known = labels is not None or not isinstance(source, torch.Tensor)
    dl = eval_loader(_Indexed(ds), batch_size, workers=workers, pin_memory=pin_memory, rank=rank,
                     world_size=world_size)
    for idx, x, y in dl:
        yield Batch(idx, x, y if known and not bool((y < 0).all()) else None)


def _loader_batches(dl: DataLoader, world_size: int) -> Iterator[Batch]:
    if world_size > 1:
        raise WsvizError("Under torchrun give the dataset, not a DataLoader: wsviz splits it over the ranks itself.")
    if not isinstance(dl.sampler, SequentialSampler):
        raise WsvizError("The DataLoader must read its dataset in order (shuffle=False, no sampler), so that "
                         "per-sample results line up with the samples.")
    seen = 0
    for item in dl:
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        idx = torch.arange(seen, seen + len(x))
        seen += len(x)
        yield Batch(idx, x, None if y is None else torch.as_tensor(y, dtype=torch.long))


def take(source, indices=None, *, batch_size: int = 256, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of the samples at ``indices`` (all: None) as tensors, reading only those.

    For a bounded set of a large source (calibration batches, a gallery): the rest of the data
    is never decoded. ``indices`` must name at least one sample, each a position ``0..n-1``.
    """
    n = num_samples(source)
    if indices is not None:
        try:
            idx = np.asarray(indices, dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise WsvizError(f"take() indices must be whole-number sample positions, got {indices!r}.") from exc
        if idx.ndim != 1 or not len(idx):
            raise WsvizError(f"take() needs one or more sample indices (a list of positions, or None for all), got "
                             f"{indices!r}.")
        if idx.min() < 0 or idx.max() >= n:
            raise WsvizError(f"take() indices must be positions 0..{n - 1} of the data, got {int(idx.min())}.."
                             f"{int(idx.max())}.")
        if isinstance(source, torch.Tensor):
            return source[torch.from_numpy(idx)], None
        source = source.subset(idx) if isinstance(source, EvalData) else Subset(source, idx.tolist())
    elif not n:
        raise WsvizError("take() was given data without any sample: there is nothing to read.")
    xs, ys = [], []
    for b in batches(source, batch_size=batch_size, workers=workers):
        xs.append(b.images)
        ys.append(b.labels)
    images = torch.cat(xs)
    return images, None if any(y is None for y in ys) else torch.cat(ys)


# ------------------------------------------------------------------------------- gathering
def gather(n: int, index: torch.Tensor, arrays: Mapping[str, np.ndarray],
           world_size: int = 1) -> tuple[dict[str, np.ndarray], list[int]]:
    """Per-sample arrays of every rank put back in sample order: ({name: (n, ...)}, samples per rank).

    ``index`` holds this rank's sample positions, ``arrays`` one row per position. Raises a
    WsvizError unless every one of the ``n`` samples was counted exactly once.
    """
    idx = index.cpu().numpy().astype(np.int64)
    parts = [(idx, dict(arrays))]
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, (idx, dict(arrays)))
    all_idx = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
    counts = np.bincount(all_idx, minlength=n) if len(all_idx) else np.zeros(n, np.int64)
    if len(counts) != n or not (counts == 1).all():
        bad = np.flatnonzero(counts != 1)[:5]
        raise WsvizError(f"Evaluation lost or repeated samples: {len(all_idx)} results for {n} samples "
                         f"(e.g. sample {bad.tolist()} counted {counts[bad].tolist()} times). This is a bug; please "
                         "report it.")
    out = {}
    for name in arrays:
        first = parts[0][1][name]
        full = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for p_idx, p_arrays in parts:
            full[p_idx] = p_arrays[name]
        out[name] = full
    return out, [len(p[0]) for p in parts]


def model_sample(dataset: str, split: str, model, n: int | None = None, *, seed: int = 0, augment: str = "none",
                 data_root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images as ``model``'s input, labels, the whole split's size): ``n`` images spread over the split
    (all: None), as :meth:`~wsviz.data.digits.DigitSplit.spread` picks them, and only those decoded.

    An image folder is decoded at the model's input size with the ``augment`` preset's evaluation
    transform, as its training evaluated it (give the card's preset); the in-memory sets come at their
    own size and are fitted to the model. For the analyses that take a bounded sample (tying
    calibration, held-out scoring) or a model's whole test split (a pruning curve, a tie's check)."""
    from wsviz.data.datasets import fit_to
    from wsviz.models import input_shape

    c, size, _ = input_shape(model)
    full = eval_data(dataset, split, size=size, augment=augment, seed=seed, data_root=data_root)
    total = len(full)
    x, y = take(full, spread_indices(total, n))
    return fit_to(x.float().div(255) if x.dtype == torch.uint8 else x, c, size), y, total
