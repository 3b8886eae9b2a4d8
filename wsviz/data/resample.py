"""The one resampling operator of wsviz: an affine warp about the image centre.

Every place that rescales or rotates an image uses these two functions — the MNIST-scale
and Rot-MNIST protocols that make the training and test data, the scale and rotation
sweeps, the live sliders, and the per-layer invariance measure (applied to feature maps).
So a sweep at factor ``f`` feeds a model exactly the images the scale protocol makes at
``f``, and a model is never judged on a resampling it was not trained with.

Why this operator (``grid_sample``, bilinear, zero fill, ``align_corners=False``):

* the shipped zoo was trained on it (the protocols have always used it);
* it applies the exact factor at any size: a resize-then-pad pipeline must round the new
  size to whole pixels (28 px at 0.3 gives 8 px, factor 0.286; a 7x7 feature map at 0.5
  gives 4x4, factor 0.571), which matters most on small feature maps;
* it keeps the image size and centre, so it applies unchanged to images and feature maps,
  and rotation and scaling are one mechanism.

What it does not do: no low-pass filter before shrinking (as Rot-MNIST and MNIST-scale
generators that sample bilinearly). Shrunk digits therefore alias slightly; that is part of
the protocol the models are trained and tested on, not an artefact of the sweep.
Factor 1 and angle 0 return the input unchanged, exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wsviz.errors import WsvizError


def _per_image(images: torch.Tensor, values: torch.Tensor | float, what: str) -> torch.Tensor:
    if images.ndim != 4:
        raise WsvizError(f"Expected images as (N, C, H, W), got shape {tuple(images.shape)}.")
    v = torch.as_tensor(values, dtype=images.dtype, device=images.device)
    if v.ndim == 0:
        v = v.expand(images.shape[0])
    if v.shape != (images.shape[0],):
        raise WsvizError(f"Give one {what} or one per image ({images.shape[0]}), got shape {tuple(v.shape)}.")
    return v


def _warp(images: torch.Tensor, mat: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Sample ``images`` at ``mat`` @ (x, y, 1) (normalised coordinates); rows where ``identity``
    holds are copied instead, so the identity transform is exact."""
    if bool(identity.all()):
        return images
    grid = F.affine_grid(mat, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if bool(identity.any()):
        out = torch.where(identity.view(-1, 1, 1, 1), images, out)
    return out


def rescale(images: torch.Tensor, factors: torch.Tensor | float) -> torch.Tensor:
    """Shrink (factor < 1) or enlarge each image (N, C, H, W) about its centre, keeping its size.

    ``factors`` is one factor or one per image; the content is scaled by exactly that factor.
    """
    f = _per_image(images, factors, "scale factor")
    if not bool((f > 0).all()) or not bool(torch.isfinite(f).all()):
        raise WsvizError(f"Scale factors must be positive and finite, got {f.min().item():g}.")
    inv = 1.0 / f
    zero = torch.zeros_like(f)
    mat = torch.stack([torch.stack([inv, zero, zero], 1), torch.stack([zero, inv, zero], 1)], 1)
    return _warp(images, mat, f == 1)


def rotate(images: torch.Tensor, degrees: torch.Tensor | float) -> torch.Tensor:
    """Rotate each image (N, C, H, W) counter-clockwise by ``degrees`` about its centre."""
    d = _per_image(images, degrees, "angle")
    theta = d * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(images, mat, torch.remainder(d, 360) == 0)
