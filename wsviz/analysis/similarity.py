"""How similar two layers' representations are: linear CKA (Kornblith et al. 2019).

Centred kernel alignment compares what two layers compute on the same images without any
training, and is invariant to orthogonal transforms and isotropic scaling of the features (but
not to arbitrary invertible linear maps), so it can compare layers of different widths, of a
shared model and its unshared twin, or of two trainings of one model.

With column-centred features X (n, p) and Y (n, q)::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F),   K_X = X X^T, K_Y = Y Y^T

The second (Gram) form is used whenever n < p + q: flattened feature maps have many more
features than there are images, and the p x p matrices would not fit in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsviz.analysis.embeddings import capture_outputs
from wsviz.errors import WsvizError
from wsviz.models.taps import list_taps

log = logging.getLogger(__name__)


def _matrix(a: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """``a`` as a float64 (n, features) array: extra dimensions are flattened, 1-D is one feature."""
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = arr.astype(np.float64)
    if arr.ndim == 0:
        raise WsvizError(f"{what} must have one row per example, got a scalar.")
    arr = arr.reshape(len(arr), -1)
    if not np.isfinite(arr).all():
        raise WsvizError(f"{what} contains NaN or infinite values (a diverged model?); CKA is undefined.")
    return arr


def _centred(a: np.ndarray) -> np.ndarray:
    """Column-centred ``a``, divided by its largest magnitude (CKA is scale invariant): the sums of
    products that follow then neither overflow (features ~1e200) nor underflow to 0 (~1e-170)."""
    a = a - a.mean(axis=0, keepdims=True)
    peak = np.abs(a).max(initial=0.0)
    return a / peak if peak > 0 else a


def _centred_gram(a: np.ndarray) -> np.ndarray:
    """Gram matrix of the column-centred rows of ``a``, scaled to unit Frobenius norm (zero if constant)."""
    c = _centred(a)
    k = c @ c.T
    norm = np.linalg.norm(k)
    return k / norm if norm > 0 else k


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples, in [0, 1].

    NaN when either representation is constant over the examples (CKA is 0/0 there).
    """
    a, b = _matrix(x, "x"), _matrix(y, "y")
    n = len(a)
    if len(b) != n:
        raise WsvizError(f"x and y must describe the same examples; got {n} and {len(b)} rows.")
    if n < 2:
        raise WsvizError(f"CKA needs at least 2 examples, got {n}.")
    a, b = _centred(a), _centred(b)
    if n < a.shape[1] + b.shape[1]:
        ka, kb = a @ a.T, b @ b.T
        cross, na, nb = float((ka * kb).sum()), np.linalg.norm(ka), np.linalg.norm(kb)
    else:
        cross, na, nb = float(np.linalg.norm(b.T @ a) ** 2), np.linalg.norm(a.T @ a), np.linalg.norm(b.T @ b)
    if na == 0 or nb == 0:
        return float("nan")
    return cross / float(na * nb)


def layer_features(model: nn.Module, images, taps: Sequence[str],
                   batch_size: int = 128, *, workers: int = 0) -> dict[str, np.ndarray]:
    """Outputs of the modules at paths ``taps`` (e.g. names from ``list_taps``), (N, features) each.

    Eval mode, no gradients, batched; the forward hooks are removed even on errors.
    """
    return capture_outputs(model, images, taps, batch_size, workers=workers)


def default_taps(model: nn.Module) -> list[str]:
    """The layers CKA compares by default: every ``level`` tap, then the ``embedding`` tap."""
    names = [t.name for t in list_taps(model, "level")] + [t.name for t in list_taps(model, "embedding")]
    if not names:
        raise WsvizError("This model has no 'level' or 'embedding' taps; pass taps= module paths to compare.")
    return names


@dataclass
class CKAResult:
    """Linear CKA between every layer in ``taps_a`` (rows) and every layer in ``taps_b`` (columns)."""

    taps_a: list[str]
    taps_b: list[str]
    matrix: np.ndarray  # (len(taps_a), len(taps_b)), NaN where a layer is constant on the images
    images: int = 0  # how many images it was computed on
    subset: str = ""  # which images, when a dataset was sampled: e.g. "1,000 of 50,000 (seeded random subset, seed 0)"


def cka_matrix(model_a: nn.Module, model_b: nn.Module, images, taps_a: Sequence[str] | None = None,
               taps_b: Sequence[str] | None = None, batch_size: int = 128, *, max_images: int = 1000,
               seed: int = 0, workers: int = 0) -> CKAResult:
    """Linear CKA between layers of two models on the same ``images`` (each fitted to its model).

    Default layers: every ``level`` tap plus the ``embedding`` tap. The features of the images
    are held in memory, and CKA's Gram matrices are n x n: a tensor is used whole (a few hundred
    to a thousand images is what CKA needs); a dataset (:func:`wsviz.data.stream.eval_data`, any
    ``Dataset``) is read only at a fixed random subset of ``max_images`` (``seed``), stated in
    the result's ``subset``.
    """
    taps_a = list(taps_a) if taps_a is not None else default_taps(model_a)
    taps_b = list(taps_b) if taps_b is not None else default_taps(model_b)
    subset = ""
    if not isinstance(images, torch.Tensor):
        from torch.utils.data import Subset

        from wsviz.data.stream import EvalData, num_samples, sample_indices

        total = num_samples(images)
        if not isinstance(max_images, int) or max_images < 2:
            raise WsvizError(f"max_images must be a whole number of at least 2, got {max_images!r}.")
        if total > max_images:
            idx = sample_indices(total, max_images, seed)
            images = images.subset(idx) if isinstance(images, EvalData) else Subset(images, idx.tolist())
            subset = f"{max_images:,} of {total:,} images (a seeded random subset, seed {seed})"
    n_images = len(images)
    if n_images < 2:
        raise WsvizError(f"CKA needs at least 2 images, got {n_images}.")
    grams_a = {k: _centred_gram(v.astype(np.float64))
               for k, v in layer_features(model_a, images, taps_a, batch_size, workers=workers).items()}
    if model_b is model_a and set(taps_b) <= set(grams_a):
        grams_b = grams_a
    else:
        grams_b = {k: _centred_gram(v.astype(np.float64))
                   for k, v in layer_features(model_b, images, taps_b, batch_size, workers=workers).items()}
    matrix = np.empty((len(taps_a), len(taps_b)))
    for i, ta in enumerate(taps_a):
        ka = grams_a[ta]
        for j, tb in enumerate(taps_b):
            kb = grams_b[tb]
            matrix[i, j] = float((ka * kb).sum()) if ka.any() and kb.any() else np.nan
    log.debug("CKA matrix %s over %d images", matrix.shape, n_images)
    return CKAResult(taps_a, taps_b, matrix, n_images, subset)
