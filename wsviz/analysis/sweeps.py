"""Scale and rotation sweeps: accuracy, agreement and stability as the input is transformed.

Scale: every image is rescaled about its centre by a factor, keeping its size, with the one
resampling operator of :mod:`wsviz.data.resample` — the one that makes the MNIST-scale
training and test data, so a sweep at factor f feeds exactly the protocol's images at f.
Agreement at a scale is the
fraction of images whose prediction equals the model's own prediction at scale 1 (so it is
1 at scale 1 by definition). The transformed batch is made once per scale and shared by all
models; every forward pass is batched.

Rotation: every image is rotated about its centre (bilinear, zero fill) by the same operator,
as the Rot-MNIST protocol does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from wsviz.analysis.features import capture, select_taps
from wsviz.data.datasets import fit_to
from wsviz.data.resample import rescale, rotate
from wsviz.errors import WsvizError
from wsviz.models.modes import eval_mode
from wsviz.models.registry import input_shape


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, softmax probabilities) in eval mode, batched."""
    c, s, _ = input_shape(model)
    device = next(model.parameters()).device
    preds, probs = [], []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            out = model(fit_to(images[i:i + batch_size].to(device), c, s)).float()
            p = out.softmax(1)
            probs.append(p.cpu())
            preds.append(p.argmax(1).cpu())
    return torch.cat(preds), torch.cat(probs)


@dataclass
class SweepResult:
    """Accuracy and agreement of several models over a transformation parameter."""

    parameter: str  # "scale" or "angle"
    values: np.ndarray
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    agreement: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # (len(values), N)

    def rows(self) -> list[dict]:
        """Long-format rows for CSV: parameter value, model, accuracy, agreement."""
        return [{self.parameter: float(v), "model": m, "accuracy": float(self.accuracy[m][i]),
                 "agreement": float(self.agreement[m][i])}
                for m in self.accuracy for i, v in enumerate(self.values)]


def _sweep(models: Mapping[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None,
           values: Sequence[float], transform, parameter: str, identity: float, batch_size: int,
           progress=None) -> SweepResult:
    if not models:
        raise WsvizError("Choose at least one model for the sweep.")
    values = np.asarray(list(values), dtype=float)
    res = SweepResult(parameter, values)
    preds = {name: [] for name in models}
    for i, v in enumerate(values):
        if progress:
            progress(i, len(values), v)
        x = transform(images, float(v))
        for name, m in models.items():
            preds[name].append(predict(m, x, batch_size)[0])
    at_identity = np.flatnonzero(np.isclose(values, identity))
    if len(at_identity):  # reuse the untransformed pass instead of running it again
        base = {name: preds[name][at_identity[0]] for name in models}
    else:
        base = {name: predict(m, transform(images, identity), batch_size)[0] for name, m in models.items()}
    for name in models:
        p = torch.stack(preds[name])
        res.predictions[name] = p.numpy()
        res.agreement[name] = (p == base[name]).float().mean(1).numpy()
        res.accuracy[name] = ((p == labels).float().mean(1).numpy() if labels is not None
                              else np.full(len(values), np.nan))
    return res


def scale_sweep(models: Mapping[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None,
                scales: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4),
                batch_size: int = 512, progress=None) -> SweepResult:
    """Accuracy and agreement (with the scale-1 prediction) of each model at each scale."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images
    return _sweep(models, x, labels, scales, rescale, "scale", 1.0, batch_size, progress)


def rotation_sweep(models: Mapping[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None,
                   angles: Iterable[float] = tuple(range(0, 361, 15)), batch_size: int = 512,
                   progress=None) -> SweepResult:
    """Accuracy and agreement (with the 0-degree prediction) of each model at each angle."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images
    return _sweep(models, x, labels, angles, rotate, "angle", 0.0,
                  batch_size, progress)


@dataclass
class Stability:
    """One image under a transformation: the predicted class and its probability per value."""

    parameter: str
    values: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray  # probability of the predicted class
    probabilities: np.ndarray  # (len(values), classes)


def single_image_stability(model: nn.Module, image: torch.Tensor, values: Sequence[float],
                           parameter: str = "angle") -> Stability:
    """Per-value prediction of one image (C, H, W) rotated by each angle or rescaled by each factor."""
    x = image.unsqueeze(0) if image.ndim == 3 else image[:1]
    x = x.float().div(255) if x.dtype == torch.uint8 else x
    c, s, _ = input_shape(model)
    x = fit_to(x, c, s)
    if parameter == "angle":
        batch = torch.cat([rotate(x, float(a)) for a in values])
    elif parameter == "scale":
        batch = torch.cat([rescale(x, float(f)) for f in values])
    else:
        raise WsvizError(f"parameter must be 'angle' or 'scale', got {parameter!r}")
    pred, prob = predict(model, batch)
    conf = prob.gather(1, pred[:, None])[:, 0]
    return Stability(parameter, np.asarray(values, dtype=float), pred.numpy(), conf.numpy(), prob.numpy())


@dataclass
class LayerInvariance:
    """Per tap: relative distance between f(rescaled x) and rescaled f(x)."""

    scale: float
    taps: list[str]
    labels: list[str]
    error: np.ndarray


@torch.no_grad()
def layer_scale_invariance(model: nn.Module, images: torch.Tensor, scale: float,
                           kinds: Iterable[str] = ("level", "stage")) -> LayerInvariance:
    """How far each layer's features for the rescaled input are from its rescaled features.

    error = ||f(T_s x) - T_s f(x)|| / ||T_s f(x)||, with T_s the sweep's operator applied to the
    feature map at the exact factor (it keeps the map's size and centre, so a 7x7 map is scaled
    by 0.5, not resized to 4x4). 0 means the layer commutes with rescaling.
    """
    taps = [t for t in select_taps(model, kinds)]
    if not taps:
        raise WsvizError("This model has no spatial taps to compare.")
    c, s, _ = input_shape(model)
    x = fit_to(images.float().div(255) if images.dtype == torch.uint8 else images, c, s)
    device = next(model.parameters()).device
    with eval_mode(model):
        with capture(model, taps) as a:
            model(x.to(device))
        fa = dict(a)
        with capture(model, taps) as b:
            model(rescale(x, scale).to(device))
        fb = dict(b)
    errs, names, labels = [], [], []
    for t in taps:
        u, v = fa.get(t.name), fb.get(t.name)
        if u is None or v is None or u.ndim != 4:
            continue
        tu = rescale(u.float(), scale)
        err = (v.float() - tu).flatten(1).norm(dim=1) / tu.flatten(1).norm(dim=1).clamp_min(1e-12)
        errs.append(float(err.mean()))
        names.append(t.name)
        labels.append(t.label)
    return LayerInvariance(scale, names, labels, np.asarray(errs))
