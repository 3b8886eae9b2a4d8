"""Which input pixels a wsviz model's decision rests on: captum attributions for every model.

Three methods, chosen because they answer different questions and work on any architecture
(including e2cnn's steerable models, whose internals are not ``nn.Conv2d``):

* ``integrated_gradients`` (Sundararajan et al. 2017): path integral of the gradient from a
  black image. Exactly integrated, the attributions add up to ``f(x) - f(black)`` for the
  explained logit; computed with a finite number of steps they miss it by a numerical error,
  reported per image (``relative_delta``: |sum - (f(x) - f(black))| / |f(x) - f(black)|). By
  default each image starts at :data:`IG_START_STEPS` Gauss-Legendre steps and is redone at twice
  the steps while that error is over :data:`IG_TOLERANCE`, up to :data:`IG_MAX_STEPS` (the result
  says which images stopped at the cap). At a fixed 32 steps the shipped scale-msws-shared missed
  by a median 4% and up to 120% over 32 test images, at 64 by a median 2.5%, at 256 by 0.5%;
* ``saliency`` (Simonyan et al. 2014): absolute gradient of the logit w.r.t. the input;
* ``grad_cam`` (Selvaraju et al. 2017): a layer's activations weighted by their mean gradient,
  upsampled to the input; class-discriminative, but only as fine as the layer's grid (``grid``
  in the result: 2x2 for the shipped rot-* and ShaRDNet checkpoints' default layers, whose four
  cells each respond to nearly the whole input). The layer defaults to
  :func:`default_cam_layer`: the deepest named output that the classifier reads and that still
  has a spatial layout, found by running the model (WSMS: the integrated features of all
  stages; ShaRDNet S/SL-VGG: the last iteration of the shared conv; e2cnn: the last block's
  regular-field map, whose map rotates with the input).

Images are processed in chunks of ``batch_size`` (Integrated Gradients also batches its path
steps) so memory stays bounded however many images are explained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from wsviz.analysis.embeddings import check_batch_size, model_inputs
from wsviz.device import model_device
from wsviz.errors import WsvizError
from wsviz.models.hooks import private_copy, this_thread
from wsviz.models.modes import eval_mode
from wsviz.models.taps import list_taps

log = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "saliency", "grad_cam")
IG_START_STEPS = 64  # Integrated Gradients' first try, doubled per image while its error is over IG_TOLERANCE
IG_TOLERANCE = 0.02  # |sum of attributions - (f(x) - f(black))| / |f(x) - f(black)| aimed for
IG_MAX_STEPS = 512  # the most steps an image is given; its error is reported either way
IG_INTERNAL_ELEMENTS = 512 * 28 * 28  # input values per captum internal batch (512 steps of one digit at once)
COARSE_CAM = 2  # a Grad-CAM grid this many cells across or fewer is warned about
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@dataclass
class AttributionResult:
    """Attributions of ``targets`` for N images, on CPU.

    ``maps`` (N, H, W) aggregates channels: the sum for Integrated Gradients (so a map still
    adds up to the logit difference), the maximum for saliency (Simonyan et al.), and Grad-CAM
    is single-channel already. ``raw`` (N, C, H, W) keeps the per-channel attributions
    (None for Grad-CAM, which attributes to a layer, not to input channels).
    """

    method: str
    maps: torch.Tensor
    raw: torch.Tensor | None
    targets: torch.Tensor
    layer: str | None = None  # Grad-CAM: module path of the layer used
    convergence_delta: torch.Tensor | None = None  # IG: sum(raw) - (f(x) - f(baseline)) per image
    logit_change: torch.Tensor | None = None  # IG: f(x) - f(baseline) per image, what the sum should be
    ig_steps: torch.Tensor | None = None  # IG: the steps each image was integrated with
    ig_tolerance: float | None = None  # IG: the relative error aimed for (None: fixed steps, none aimed for)
    grid: tuple[int, int] | None = None  # Grad-CAM: (H, W) of the layer's map, before upsampling

    @property
    def relative_delta(self) -> torch.Tensor | None:
        """IG: |sum of the attributions - (f(x) - f(black))| / |f(x) - f(black)| per image, the
        numerical integration's completeness error (0: the map adds up to the logit change)."""
        if self.convergence_delta is None or self.logit_change is None:
            return None
        return self.convergence_delta.abs() / self.logit_change.abs().clamp_min(torch.finfo(torch.float32).tiny)

    def completeness_note(self, i: int = 0) -> str | None:
        """IG: image ``i``'s completeness error and steps, as a panel's title says them (None otherwise)."""
        rel = self.relative_delta
        if rel is None:
            return None
        return f"sum off f(x) − f(black) by {float(rel[i]):.1%} ({int(self.ig_steps[i])} steps)"

    @property
    def capped(self) -> torch.Tensor | None:
        """IG with a tolerance: the images still over it at :data:`IG_MAX_STEPS` (their error is reported)."""
        if self.ig_tolerance is None or self.ig_steps is None:
            return None
        return (self.ig_steps >= IG_MAX_STEPS) & (self.relative_delta > self.ig_tolerance)


@contextmanager
def _no_new_hooks(model: nn.Module) -> Iterator[None]:
    """Remove any module hook registered during the body (captum removes its own; this is a guard)."""
    before = {m: {d: set(getattr(m, d, {}) or {}) for d in _HOOK_DICTS} for m in model.modules()}
    try:
        yield
    finally:
        for m, dicts in before.items():
            for d, keys in dicts.items():
                hooks = getattr(m, d, None)
                if hooks:
                    for k in [k for k in hooks if k not in keys]:
                        del hooks[k]
                        log.warning("removed a leftover %s entry from %s", d, type(m).__name__)


def cam_candidates(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module path, label, output shape) of every spatial named output (level / iteration /
    stage / rate tap) in the order one forward pass runs them; a model may also name its own
    Grad-CAM layer with a ``cam_layer`` attribute (a module path), listed last."""
    from wsviz.models import input_shape
    from wsviz.models.taps import tap_modules

    c, s, _ = input_shape(model)
    seen: list[tuple[str, str, tuple[int, ...]]] = []
    handles = []
    for info, mod in tap_modules(model):
        if info.kind == "embedding":
            continue

        def hook(m, args, out, info=info) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
                seen.append((info.name, info.label, tuple(out.shape[1:])))
        handles.append(mod.register_forward_hook(this_thread(hook)))
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, c, s, s, device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(n for n, _, _ in seen))
    last = {n: (n, lab, shp) for n, lab, shp in seen}
    out = [last[n] for n in order]
    own = getattr(model, "cam_layer", None)
    if isinstance(own, str):
        out = [o for o in out if o[0] != own] + [(own, "declared by the model", ())]
    return out


def default_cam_layer(model: nn.Module) -> str:
    """Grad-CAM's default layer: the model's declared ``cam_layer``, else the spatial named
    output that runs last in the forward pass — the deepest map the classifier reads, so the
    explanation covers the whole model (not, say, one WSMS stage)."""
    cands = cam_candidates(model)
    if not cands:
        taps = ", ".join(t.name for t in list_taps(model)) or "none"
        raise WsvizError(f"This model has no spatial named output for Grad-CAM to default to; pass layer= a module "
                         f"path with a (N, C, H, W) output (its taps: {taps}).")
    return cands[-1][0]


def _resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    if layer is None:
        layer = default_cam_layer(model)
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        options = ", ".join(n for n, _, _ in cam_candidates(model)) or "none"
        raise WsvizError(f"Model has no layer {layer!r}. Grad-CAM layers to choose from: {options}.") from None
    runs = _runs_per_forward(model, module)
    if runs > 1:  # captum's layer hook keeps the last run's output and gradient: one use of a shared layer
        options = ", ".join(n for n, _, _ in cam_candidates(model)) or "a module that runs once"
        raise WsvizError(f"Layer {layer!r} runs {runs} times in one forward pass (a shared layer): Grad-CAM would "
                         f"explain its last run only. Choose a layer that runs once: {options}.")
    return layer, module


def _runs_per_forward(model: nn.Module, module: nn.Module) -> int:
    """How many times ``module`` runs in one forward pass of a blank image."""
    from wsviz.models import input_shape

    calls = []
    handle = module.register_forward_hook(this_thread(lambda m, a, o: calls.append(1)))
    try:
        c, s, _ = input_shape(model)
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, c, s, s, device=model_device(model)))
    finally:
        handle.remove()
    return len(calls)


def _targets(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None, batch_size: int,
             device: torch.device) -> torch.Tensor:
    """The class explained for each image: given, or the model's prediction."""
    n = len(x)
    from wsviz.models.registry import num_classes as classes_of

    num_classes = classes_of(model)
    if target is None:
        preds = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                preds.append(model(x[start:start + batch_size].to(device)).argmax(1).cpu())
        return torch.cat(preds)
    if isinstance(target, bool):
        raise WsvizError(f"target must be a class index or a tensor of them, got {target!r}.")
    t = torch.full((n,), target, dtype=torch.long) if isinstance(target, int) else torch.as_tensor(target)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise WsvizError(f"target must be one class index or {n} of them (one per image), got shape "
                         f"{tuple(t.shape)} and dtype {t.dtype}.")
    t = t.long().cpu()
    if num_classes is not None and (t.min() < 0 or t.max() >= num_classes):
        raise WsvizError(f"target classes must be in 0..{num_classes - 1}, got {t.tolist()[:8]}.")
    return t.clone()


def _integrated_gradients(model: nn.Module, x: torch.Tensor, t: torch.Tensor, steps: int,
                          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr import IntegratedGradients

    # captum evaluates steps x images points of the path, internal_batch_size at a time: as many as about
    # IG_INTERNAL_ELEMENTS input values (512 steps of a digit in one pass), never fewer than batch_size
    per_point = max(1, x[0].numel())
    internal = max(batch_size, min(steps * len(x), IG_INTERNAL_ELEMENTS // per_point))
    attr, delta = IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=t, n_steps=steps, internal_batch_size=internal,
        return_convergence_delta=True)
    return attr.detach(), delta.detach().reshape(len(x))


def attribute(model: nn.Module, images, method: str, target: int | torch.Tensor | None = None,
              layer: str | None = None, batch_size: int = 16, ig_steps: int | None = None, *,
              absolute: bool = True, workers: int = 0) -> AttributionResult:
    """Attribute the ``target`` logit of each image to its pixels with ``method`` (see :data:`METHODS`).

    ``images`` (N, C, H, W) are fitted to the model's input (or a dataset to explain whole, e.g. a
    gallery ``eval_data(name, limit=k)`` or ``data.subset(indices)``: only those images are read);
    ``target`` None explains the predicted class. ``layer`` (Grad-CAM only, ignored otherwise) is a module path, default
    :func:`default_cam_layer`. ``absolute`` (saliency only) takes |gradient| as captum does by
    default. ``ig_steps`` (Integrated Gradients): a fixed number of steps, or None (default) to
    start at :data:`IG_START_STEPS` and double each image's steps while its ``relative_delta`` is
    over :data:`IG_TOLERANCE`, up to :data:`IG_MAX_STEPS`. ``workers``: DataLoader processes
    reading a dataset given as ``images``. The model runs in eval mode and every submodule's mode is restored afterwards,
    also on errors.
    """
    if method not in METHODS:
        raise WsvizError(f"Unknown attribution method {method!r}; choose one of {', '.join(METHODS)}.")
    check_batch_size(batch_size)
    if method == "integrated_gradients" and ig_steps is not None and (
            not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1):
        raise WsvizError(f"ig_steps must be a positive whole number (64 to 512 is typical), or None to refine "
                         f"until the completeness error is under {IG_TOLERANCE:.0%}, got {ig_steps!r}.")
    if method != "grad_cam" and layer is not None:
        log.debug("layer=%r ignored: %s attributes to the input pixels", layer, method)
    from captum.attr import LayerAttribution, LayerGradCam, Saliency

    if not isinstance(images, torch.Tensor):  # a gallery from a dataset: only its images are decoded
        from wsviz.data.stream import take

        images, _ = take(images, batch_size=batch_size, workers=workers)
    x_all = model_inputs(model, images).detach()
    h, w = x_all.shape[-2:]
    device = model_device(model)
    # captum hooks the Grad-CAM layer and the body switches modes: all of it on a private copy, never on
    # a model other threads run at the same time (the app shares one object per checkpoint)
    model = private_copy(model)
    layer_name, layer_module = _resolve_layer(model, layer) if method == "grad_cam" else (None, None)
    maps, raws, deltas, changes, used = [], [], [], [], []
    grid = None
    with eval_mode(model), _no_new_hooks(model), torch.enable_grad():
        targets = _targets(model, x_all, target, batch_size, device)
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size].to(device)
            t = targets[start:start + batch_size].to(device)
            if method == "integrated_gradients":
                steps = ig_steps or IG_START_STEPS
                attr, delta = _integrated_gradients(model, x, t, steps, batch_size)
                steps_of = torch.full((len(x),), steps, dtype=torch.long, device=delta.device)
                while ig_steps is None and steps < IG_MAX_STEPS:
                    change = attr.sum(tuple(range(1, attr.dim()))) - delta
                    redo = delta.abs() > IG_TOLERANCE * change.abs()
                    if not redo.any():
                        break
                    steps = min(2 * steps, IG_MAX_STEPS)
                    attr[redo], delta[redo] = _integrated_gradients(model, x[redo], t[redo], steps, batch_size)
                    steps_of[redo] = steps
                raws.append(attr.cpu())
                maps.append(attr.sum(1).cpu())
                deltas.append(delta.cpu())
                changes.append((attr.sum(tuple(range(1, attr.dim()))) - delta).cpu())
                used.append(steps_of.cpu())
            elif method == "saliency":
                x = x.detach().requires_grad_(True)  # captum would warn that it had to set this
                attr = Saliency(model).attribute(x, target=t, abs=absolute)
                raws.append(attr.detach().cpu())
                maps.append((attr.detach().amax(1) if absolute else attr.detach().sum(1)).cpu())
            else:
                cam = LayerGradCam(model, layer_module).attribute(x, target=t, relu_attributions=True)
                if cam.dim() != 4:
                    raise WsvizError(
                        f"Layer {layer_name!r} outputs shape {tuple(cam.shape)}, not a (N, C, H, W) feature map; "
                        "Grad-CAM needs a spatial layer, e.g. one of: "
                        f"{', '.join(n for n, _, _ in cam_candidates(model)) or 'a conv layer'}.")
                grid = (int(cam.shape[-2]), int(cam.shape[-1]))
                cam = LayerAttribution.interpolate(cam.detach(), (h, w), interpolate_mode="bilinear")
                maps.append(cam.clamp_min(0)[:, 0].cpu())
    return AttributionResult(
        method=method, maps=torch.cat(maps).float(), raw=torch.cat(raws).float() if raws else None,
        targets=targets, layer=layer_name, convergence_delta=torch.cat(deltas).float() if deltas else None,
        logit_change=torch.cat(changes).float() if changes else None, ig_steps=torch.cat(used) if used else None,
        ig_tolerance=IG_TOLERANCE if deltas and ig_steps is None else None, grid=grid)
