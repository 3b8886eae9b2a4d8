"""Which input pixels a wsviz model's decision rests on: captum attributions for every model.

Three methods, chosen because they answer different questions and work on any architecture
(including e2cnn's steerable models, whose internals are not ``nn.Conv2d``):

* ``integrated_gradients`` (Sundararajan et al. 2017): path integral of the gradient from a
  black image; the attributions add up to ``f(x) - f(black)`` for the explained logit;
* ``saliency`` (Simonyan et al. 2014): absolute gradient of the logit w.r.t. the input;
* ``grad_cam`` (Selvaraju et al. 2017): a layer's activations weighted by their mean gradient,
  upsampled to the input; coarse but class-discriminative. The layer defaults to
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
        return layer, model.get_submodule(layer)
    except AttributeError:
        options = ", ".join(n for n, _, _ in cam_candidates(model)) or "none"
        raise WsvizError(f"Model has no layer {layer!r}. Grad-CAM layers to choose from: {options}.") from None


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


def attribute(model: nn.Module, images, method: str, target: int | torch.Tensor | None = None,
              layer: str | None = None, batch_size: int = 16, ig_steps: int = 32, *,
              absolute: bool = True) -> AttributionResult:
    """Attribute the ``target`` logit of each image to its pixels with ``method`` (see :data:`METHODS`).

    ``images`` (N, C, H, W) are fitted to the model's input (or a dataset to explain whole, e.g. a
    gallery ``eval_data(name, limit=k)`` or ``data.subset(indices)``: only those images are read);
    ``target`` None explains the predicted class. ``layer`` (Grad-CAM only, ignored otherwise) is a module path, default
    :func:`default_cam_layer`. ``absolute`` (saliency only) takes |gradient| as captum does by
    default. The model runs in eval mode and every submodule's mode is restored afterwards,
    also on errors.
    """
    if method not in METHODS:
        raise WsvizError(f"Unknown attribution method {method!r}; choose one of {', '.join(METHODS)}.")
    check_batch_size(batch_size)
    if method == "integrated_gradients" and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise WsvizError(f"ig_steps must be a positive whole number (32 to 300 is typical), got {ig_steps!r}.")
    if method != "grad_cam" and layer is not None:
        log.debug("layer=%r ignored: %s attributes to the input pixels", layer, method)
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

    if not isinstance(images, torch.Tensor):  # a gallery from a dataset: only its images are decoded
        from wsviz.data.stream import take

        images, _ = take(images, batch_size=batch_size)
    x_all = model_inputs(model, images).detach()
    h, w = x_all.shape[-2:]
    device = model_device(model)
    # captum hooks the Grad-CAM layer and the body switches modes: all of it on a private copy, never on
    # a model other threads run at the same time (the app shares one object per checkpoint)
    model = private_copy(model)
    layer_name, layer_module = _resolve_layer(model, layer) if method == "grad_cam" else (None, None)
    maps, raws, deltas = [], [], []
    with eval_mode(model), _no_new_hooks(model), torch.enable_grad():
        targets = _targets(model, x_all, target, batch_size, device)
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size].to(device)
            t = targets[start:start + batch_size].to(device)
            if method == "integrated_gradients":
                attr, delta = IntegratedGradients(model).attribute(
                    x, baselines=torch.zeros_like(x), target=t, n_steps=ig_steps,
                    internal_batch_size=batch_size, return_convergence_delta=True)
                raws.append(attr.detach().cpu())
                maps.append(attr.detach().sum(1).cpu())
                deltas.append(delta.detach().cpu())
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
                cam = LayerAttribution.interpolate(cam.detach(), (h, w), interpolate_mode="bilinear")
                maps.append(cam.clamp_min(0)[:, 0].cpu())
    return AttributionResult(
        method=method, maps=torch.cat(maps).float(), raw=torch.cat(raws).float() if raws else None,
        targets=targets, layer=layer_name, convergence_delta=torch.cat(deltas).float() if deltas else None)
