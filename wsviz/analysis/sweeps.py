"""Scale and rotation sweeps: accuracy, agreement and stability as the input is transformed.

Scale: every image is rescaled about its centre by a factor, keeping its size, with the one
resampling operator of :mod:`wsviz.data.resample` — the one that makes the MNIST-scale
training and test data, so a sweep at factor f feeds exactly the protocol's images at f.
Agreement at a scale is the
fraction of images whose prediction equals the model's own prediction at scale 1 (so it is
1 at scale 1 by definition). The data are read once, in batches (a tensor sliced, or a
dataset streamed through a DataLoader, sharded under torchrun: :mod:`wsviz.analysis.streaming`);
each batch is transformed once per scale and shared by all models, and only the predictions are
kept, so a sweep over ImageNet's validation set needs the memory of one batch.

Rotation: every image is rotated about its centre (bilinear, zero fill) by the same operator,
as the Rot-MNIST protocol does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from wsviz.analysis.cache import PredictionCache
from wsviz.analysis.features import capture, select_taps
from wsviz.analysis.streaming import IDENTITY, Variant, predict_variants
from wsviz.data.datasets import fit_to
from wsviz.data.resample import rescale, rotate
from wsviz.data.stream import batches
from wsviz.errors import WsvizError
from wsviz.models.modes import eval_mode
from wsviz.models.registry import input_shape, num_classes


# The app keeps one model object per checkpoint for all its sessions (st.cache_resource), each session in
# a thread of its own, and the Scale page's live slider predicts through the object a sweep is using.
# So every hook set here records only its own thread's passes, and nothing here changes a model loaded
# in eval mode (as the app's are): eval_mode switches nothing then, weights and BatchNorm statistics are
# only read. (A model given in training mode is switched to eval for the call and restored after.)
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
    samples: int = 0  # images evaluated (each counted once, over all ranks)
    shares: list[int] = field(default_factory=list)  # images per rank under torchrun ([N] on one process)
    cached: int = 0  # (model, value) results read from the prediction cache instead of computed

    def rows(self) -> list[dict]:
        """Long-format rows for CSV: parameter value, model, accuracy, agreement."""
        return [{self.parameter: float(v), "model": m, "accuracy": float(self.accuracy[m][i]),
                 "agreement": float(self.agreement[m][i])}
                for m in self.accuracy for i, v in enumerate(self.values)]


def _variant(op, name: str, v: float, identity: float) -> Variant:
    if v == identity or (name == "rotate" and v % 360 == 0):  # the operator returns its input exactly
        return IDENTITY
    return Variant(f"{name}={v!r}", lambda x, v=v: op(x, v))


def _sweep(models: Mapping[str, nn.Module], images, labels: torch.Tensor | None, values: Sequence[float], op,
           parameter: str, identity: float, batch_size: int, progress, *, workers: int, loader: str,
           cache: PredictionCache | None) -> SweepResult:
    if not models:
        raise WsvizError("Choose at least one model for the sweep.")
    values = np.asarray(list(values), dtype=float)
    if not len(values):
        raise WsvizError(f"Give at least one {parameter} value for the sweep.")
    name = "rescale" if op is rescale else "rotate"
    variants = [_variant(op, name, float(v), identity) for v in values]
    ps = predict_variants(models, images, labels, [*variants, IDENTITY], batch_size=batch_size, workers=workers,
                          loader=loader, cache=cache, progress=progress)
    res = SweepResult(parameter, values, samples=ps.samples, shares=ps.shares, cached=ps.cached)
    for m in models:
        p = np.stack([ps.predictions[(m, v.key)] for v in variants])
        res.predictions[m] = p
        res.agreement[m] = (p == ps.predictions[(m, IDENTITY.key)]).mean(1)
        res.accuracy[m] = ((p == ps.labels).mean(1) if ps.labels is not None else np.full(len(values), np.nan))
    return res


def scale_sweep(models: Mapping[str, nn.Module], images, labels: torch.Tensor | None = None,
                scales: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4),
                batch_size: int = 512, progress=None, *, workers: int = 0, loader: str = "auto",
                cache: PredictionCache | None = None) -> SweepResult:
    """Accuracy and agreement (with the scale-1 prediction) of each model at each scale.

    ``images``: a tensor (N, C, H, W) with ``labels``, or a dataset (:func:`wsviz.data.stream.eval_data`,
    any map-style dataset, an in-order DataLoader) streamed in batches of ``batch_size`` with
    ``workers`` loader processes; under torchrun each rank sweeps its share. ``progress(done,
    total, text)`` is called after each batch; ``cache`` reuses known predictions.
    """
    return _sweep(models, images, labels, scales, rescale, "scale", 1.0, batch_size, progress, workers=workers,
                  loader=loader, cache=cache)


def rotation_sweep(models: Mapping[str, nn.Module], images, labels: torch.Tensor | None = None,
                   angles: Iterable[float] = tuple(range(0, 361, 15)), batch_size: int = 512,
                   progress=None, *, workers: int = 0, loader: str = "auto",
                   cache: PredictionCache | None = None) -> SweepResult:
    """Accuracy and agreement (with the 0-degree prediction) of each model at each angle (data as
    :func:`scale_sweep` takes them)."""
    return _sweep(models, images, labels, angles, rotate, "angle", 0.0, batch_size, progress, workers=workers,
                  loader=loader, cache=cache)


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
    # transformed at the image's own size, then fitted to the model's, as the protocols make their data
    # (padding a 28-px digit to an odd-sized model first would move the centre by half a pixel)
    if parameter == "angle":
        batch = torch.cat([fit_to(rotate(x, float(a)), c, s) for a in values])
    elif parameter == "scale":
        batch = torch.cat([fit_to(rescale(x, float(f)), c, s) for f in values])
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
def layer_scale_invariance(model: nn.Module, images, scale: float, kinds: Iterable[str] = ("level", "stage"),
                           batch_size: int = 64, *, workers: int = 0, loader: str = "auto",
                           centre: bool = True) -> LayerInvariance:
    """How far each layer's features for the rescaled input are from its rescaled features.

    error = ||g(T_s x) - T_s g(x)|| / ||T_s g(x)||, with T_s the sweep's operator applied to the
    feature map at the exact factor (it keeps the map's size and centre, so a 7x7 map is scaled
    by 0.5, not resized to 4x4), averaged over the images. 0 means the layer commutes with
    rescaling. ``images``: a tensor or a dataset, read in batches of ``batch_size`` (only the
    per-image errors are kept).

    ``centre`` (default): g(x) = f(x) - f(blank), the features less the layer's response to a blank
    image. T_s fills the border a shrunk input leaves with blank (0), where the network answers
    f(blank), not 0 (biases, BatchNorm shifts); zero-filling the shrunk *features* would count that
    background as a failure to commute (scale-resnet20 at 0.5 on 64 mnist5k test images spread over
    the set: stage 1 / 2 / 3 score 0.84 / 1.55 / 1.60 raw, 0.74 / 1.29 / 1.61 centred). With g, a
    layer that commutes up to its background scores 0. ``centre=False``: g = f, zero-filled.
    """
    taps = [t for t in select_taps(model, kinds)]
    if not taps:
        raise WsvizError("This model has no spatial taps to compare.")
    c, s, _ = input_shape(model)
    device = next(model.parameters()).device
    errs: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model):
        blank = {}
        if centre:  # the layers' answer to a blank image: what the zero-filled border of T_s x gets
            with capture(model, taps) as z:
                model(torch.zeros(1, c, s, s, device=device))
            blank = {k: v.float() for k, v in dict(z).items()}
        for b in batches(images, batch_size=batch_size, workers=workers, loader=loader):
            xb = b.images.to(device)
            xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb
            x = fit_to(xb, c, s)
            with capture(model, taps) as a:
                model(x)
            fa = dict(a)
            with capture(model, taps) as bb:  # rescaled at the data's size, then fitted (as the sweeps do)
                model(fit_to(rescale(xb, scale), c, s))
            fb = dict(bb)
            for t in taps:
                u, v = fa.get(t.name), fb.get(t.name)
                if u is None or v is None or u.ndim != 4:
                    continue
                f0 = blank.get(t.name, 0.0)
                tu = rescale(u.float() - f0, scale)
                err = (v.float() - f0 - tu).flatten(1).norm(dim=1) / tu.flatten(1).norm(dim=1).clamp_min(1e-12)
                errs.setdefault(t.name, []).append(err.cpu())
    names = [t.name for t in taps if t.name in errs]
    labels = [t.label for t in taps if t.name in errs]
    return LayerInvariance(scale, names, labels, np.asarray([float(torch.cat(errs[n]).mean()) for n in names]))


def invariance_per_model(models: Mapping[str, nn.Module], images, scale: float,
                         kinds: Iterable[str] = ("level", "stage"), progress: Callable | None = None,
                         **kw) -> tuple[dict[str, LayerInvariance], list[str], dict[str, str]]:
    """:func:`layer_scale_invariance` of each model: ({model: its invariance}, [models without taps of
    those kinds], {model: why it failed}). One model's failure is reported, not fatal to the others.

    ``progress(done, total, model)`` is called before each model (outside the failure handling: an
    exception it raises, a page's Cancel, stops the loop); ``kw`` go to :func:`layer_scale_invariance`."""
    kinds = tuple(kinds)
    inv: dict[str, LayerInvariance] = {}
    no_taps: list[str] = []
    failed: dict[str, str] = {}
    for i, (label, model) in enumerate(models.items()):
        if progress is not None:
            progress(i, len(models), label)
        try:
            if not select_taps(model, kinds):
                no_taps.append(label)
                continue
            inv[label] = layer_scale_invariance(model, images, scale, kinds, **kw)
        except Exception as exc:  # noqa: BLE001 - named with its model; the others' results stand
            failed[label] = str(exc) if isinstance(exc, WsvizError) else f"{type(exc).__name__}: {exc}"
    if progress is not None and models:
        progress(len(models), len(models), "")
    return inv, no_taps, failed


# ------------------------------------------------------------------------ comparable labels
def label_space(dataset: str | None) -> str | None:
    """What a dataset's label k means, as a name two datasets share when their labels mean the same
    classes: all the digit sets (mnist, mnist5k and their -rot / -scale protocols) share "digits";
    an image folder's labels are its own sorted sub-folders (only the same folder shares them); None
    for a dataset wsviz does not know."""
    name = (dataset or "").strip()
    if name.startswith("folder:"):
        return name
    low = name.lower()
    if low.partition("-")[0] in ("mnist", "mnist5k") and low.partition("-")[2] in ("", "rot", "scale"):
        return "digits"
    if low in ("fashion-mnist", "cifar10", "cifar100"):
        return low
    return None


def _digit_source(dataset: str | None) -> str:
    """'mnist5k' or 'mnist': which digits a digit set (any protocol) is made of."""
    return (dataset or "").strip().lower().partition("-")[0]


def label_mismatch(dataset: str, trained_on: str | None, classes: int | None) -> str | None:
    """Why the labels of ``dataset`` cannot score a model trained on ``trained_on`` (its card's dataset)
    with ``classes`` outputs, or None when they can: the same label space (:func:`label_space`) and as
    many classes as the model has. An accuracy against labels the model never learned means nothing; nor
    does one on images it was trained on (the mnist5k digits, for a model trained on full MNIST)."""
    from wsviz.data.datasets import dataset_info

    space, own = label_space(dataset), label_space(trained_on)
    if own is None:
        return f"its card names no training set wsviz knows the classes of ({trained_on or 'none'})"
    if space != own:
        return f"it was trained on {trained_on}, whose classes are not those of {dataset}"
    if space == "digits" and _digit_source(dataset) == "mnist5k" and _digit_source(trained_on) == "mnist":
        # mnist5k is 500 per class of MNIST's *training* digits (wsviz.data.digits): full MNIST's training
        # set, under any protocol, holds every one of them
        return (f"it was trained on {trained_on}, whose training images include every {dataset} digit (mnist5k "
                "is drawn from MNIST's training set): an accuracy here would be on its own training images")
    try:
        have = dataset_info(dataset).num_classes
    except (WsvizError, OSError) as exc:
        return f"the classes of {dataset} cannot be read ({exc})"
    if classes != have:
        return f"it has {classes} classes, {dataset} has {have}"
    return None


def model_label_mismatch(model: nn.Module, card: Mapping | None, dataset: str) -> str | None:
    """:func:`label_mismatch` for a loaded model and its card (the card's dataset; the model's classes,
    else the card's)."""
    card = card or {}
    classes = num_classes(model)
    if classes is None:
        classes = (card.get("config") or {}).get("num_classes")
    return label_mismatch(dataset, card.get("dataset"), classes)
