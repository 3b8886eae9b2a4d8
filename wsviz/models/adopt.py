"""Adopt a model wsviz did not build, so every analysis can take it.

wsviz's analyses need three facts about a model that its own models carry in their config:
the input shape, the number of classes, and the named outputs (*taps*: stages, the
penultimate features) that feature maps, Grad-CAM, embeddings and CKA read.
:func:`adopt` records those facts for any ``nn.Module``::

    import torchvision, wsviz
    net = wsviz.adopt(torchvision.models.resnet18(), input_shape=(3, 224, 224))
    wsviz.summarize(net)                       # parameters, FLOPs, the sharing map
    wsviz.list_taps(net)                       # layer1..layer4 ('level'), avgpool ('embedding')

What it does to your module: nothing. The facts are kept in a table keyed weakly by the
module (the record goes when the module goes); the same object is returned, with no new
attributes, submodules, hooks, buffers or parameters, and its ``state_dict`` unchanged.
Analyses read taps with forward hooks that they remove before returning. A copy of the
module (``copy.deepcopy``, pickling) is a new object: adopt it again.

Taps are found by themselves for torchvision and timm ResNets (children ``layer1`` ..
``layer4`` become ``level`` taps; ``avgpool`` / timm's ``global_pool`` the ``embedding``
tap); for any other structure give them by module path: ``taps={"features.3": "level",
"classifier.4": "embedding"}``, or a list of paths (``level`` taps). Without any tap the
summary, kernels, sweeps, Integrated Gradients and saliency still work; Grad-CAM then needs
``layer=``, and embeddings / CKA need ``taps=``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from wsviz.device import model_device
from wsviz.errors import WsvizError
from wsviz.models.hooks import this_thread
from wsviz.models.sharing import TAP_KINDS


@dataclass(frozen=True)
class Adoption:
    """What wsviz knows about an adopted module."""

    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int  # width of the output logits
    taps: tuple[tuple[str, str, str], ...]  # (module path, kind, label), in forward order


_ADOPTED: weakref.WeakKeyDictionary[nn.Module, Adoption] = weakref.WeakKeyDictionary()

_STAGES = ("layer1", "layer2", "layer3", "layer4")
_EMBEDDINGS = ("avgpool", "global_pool")  # torchvision ResNet, timm ResNet


def adoption(module: nn.Module) -> Adoption | None:
    """The record :func:`adopt` made for ``module``, or None."""
    try:
        return _ADOPTED.get(module)
    except TypeError:  # not weak-referenceable: never adopted
        return None


def carry_adoption(source: nn.Module, copy: nn.Module) -> nn.Module:
    """``copy`` (a deep copy of ``source``, same module paths) known to wsviz as ``source`` is, when
    ``source`` was adopted; returns ``copy``."""
    record = adoption(source)
    if record is not None:
        _ADOPTED[copy] = record
    return copy


def find_taps(module: nn.Module) -> dict[str, tuple[str, str]]:
    """{module path: (kind, label)} found from the structure: a torchvision / timm ResNet's
    stages (``level``) and global pooling (``embedding``), also when the ResNet sits inside a
    wrapper (``nn.Sequential(Normalizer(...), resnet)``: ``1.layer1``...); empty for anything
    else, and when the model holds more than one such ResNet (which would be a guess)."""
    found = [(path, sub) for path, sub in module.named_modules()
             if all(name in dict(sub.named_children()) for name in _STAGES)]
    if len(found) != 1:
        return {}
    path, sub = found[0]
    prefix = f"{path}." if path else ""
    children = dict(sub.named_children())
    taps = {prefix + name: ("level", f"stage {i} ({prefix}{name})") for i, name in enumerate(_STAGES, start=1)}
    pool = next((name for name in _EMBEDDINGS if name in children), None)
    if pool is not None:
        taps[prefix + pool] = ("embedding", "penultimate features")
    return taps


def _normalise_taps(module: nn.Module, taps: Mapping[str, object] | Iterable[object]) -> dict[str, tuple[str, str]]:
    """{path: (kind, label)} from the forms ``adopt`` accepts, each path checked."""
    if isinstance(taps, str):
        taps = [taps]
    items: list[tuple[str, object]]
    if isinstance(taps, Mapping):
        items = list(taps.items())
    else:
        items = []
        for t in taps:
            if isinstance(t, str):
                items.append((t, "level"))
            elif isinstance(t, (tuple, list)) and 2 <= len(t) <= 3 and all(isinstance(x, str) for x in t):
                items.append((t[0], tuple(t[1:])))
            else:
                raise WsvizError(f"A tap must be a module path or (path, kind[, label]); got {t!r}.")
    out: dict[str, tuple[str, str]] = {}
    for path, how in items:
        kind, label = (how, path) if isinstance(how, str) else (how[0], how[1] if len(how) > 1 else path)  # type: ignore[index]
        if kind not in TAP_KINDS:
            raise WsvizError(f"Tap {path!r} has kind {kind!r}; choose one of {', '.join(TAP_KINDS)}.")
        try:
            module.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in module.named_children()]
            raise WsvizError(f"The model has no module {path!r} to tap; give module paths as in "
                             f"model.named_modules() (its children: {', '.join(names[:20]) or 'none'}).") from None
        out[path] = (kind, label)
    if sum(kind == "embedding" for kind, _ in out.values()) > 1:
        raise WsvizError("Give at most one 'embedding' tap (the features the classifier reads).")
    return out


def _probe(module: nn.Module, shape: tuple[int, int, int], taps: dict[str, tuple[str, str]]) -> tuple[int, list[str]]:
    """Run one image of zeros: (number of output classes, tap paths in the order they ran)."""
    from wsviz.models.modes import eval_mode

    ran: list[str] = []
    bad: dict[str, str] = {}

    def hook_for(path: str):
        def hook(m, args, out) -> None:
            ran.append(path)
            if not isinstance(out, torch.Tensor) and not isinstance(getattr(out, "tensor", None), torch.Tensor):
                bad[path] = type(out).__name__
        return hook

    handles = [module.get_submodule(p).register_forward_hook(this_thread(hook_for(p))) for p in taps]
    try:
        with eval_mode(module), torch.no_grad():
            out = module(torch.zeros(1, *shape, device=model_device(module)))
    except Exception as exc:  # noqa: BLE001 - any failure means the shape does not fit
        raise WsvizError(f"The model does not run on an input of shape (1, {', '.join(map(str, shape))}) "
                         f"({type(exc).__name__}: {exc}); give the input_shape=(C, H, W) it takes.") from exc
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise WsvizError(f"The model outputs {what}; wsviz's analyses need a classifier that outputs logits "
                         "shaped (N, classes). Wrap it in a module that returns them.")
    once = {p for p in taps if ran.count(p) == 1}
    never = [p for p in taps if p not in ran]
    if never:
        raise WsvizError(f"Tap(s) {', '.join(never)} did not run in a forward pass; choose modules the forward "
                         "pass uses.")
    many = [p for p in taps if p not in once]
    if many:
        raise WsvizError(f"Tap(s) {', '.join(many)} ran more than once in one forward pass, so their output is "
                         "ambiguous; choose modules that run once.")
    if bad:
        raise WsvizError("Tap(s) " + ", ".join(f"{p} (outputs {t})" for p, t in bad.items())
                         + " do not output a tensor; choose modules that output one.")
    return int(out.shape[1]), list(dict.fromkeys(ran))


def adopt(module: nn.Module, input_shape: tuple[int, int, int], taps: Mapping[str, object] | Iterable[object] | None = None,
          num_classes: int | None = None) -> nn.Module:
    """Make ``module`` usable by every wsviz analysis; returns the same module, unchanged.

    ``input_shape`` is (C, H, W) of one image (images of other sizes are fitted to it).
    ``taps``: None finds them (torchvision / timm ResNets); else {path: kind}, {path: (kind,
    label)}, or a list of paths (``level`` taps) or (path, kind[, label]) tuples, with kinds
    from ``rate / stage / iteration / level / embedding``. ``num_classes`` is checked against
    the output (found from it when None). One forward pass of a blank image checks it all;
    the module's training/eval mode is restored afterwards.
    """
    if not isinstance(module, nn.Module):
        raise WsvizError(f"wsviz.adopt takes a torch.nn.Module, got {type(module).__name__}.")
    try:
        shape = tuple(int(d) for d in input_shape)
        ok = len(shape) == 3 and all(d >= 1 and d == s for d, s in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise WsvizError(f"input_shape must be (channels, height, width) of one image, e.g. (3, 224, 224); "
                         f"got {input_shape!r}.")
    if getattr(module, "wsviz_config", None) is not None:
        raise WsvizError("This model was made by wsviz.create_model: wsviz knows it already; no need to adopt it.")
    if shape[1] != shape[2]:
        raise WsvizError(f"wsviz's analyses fit images to square inputs; give a square input_shape, got {shape}.")
    other = sorted({str(t.dtype).removeprefix("torch.") for t in [*module.parameters(), *module.buffers()]
                    if t.is_floating_point() and t.dtype != torch.float32})
    if other:
        raise WsvizError(f"The model holds {', '.join(other)} tensors; wsviz runs float32 models: convert it "
                         "with model.float() (in place), or adopt a float32 copy, copy.deepcopy(model).float().")
    wanted = _normalise_taps(module, find_taps(module) if taps is None else taps)
    classes, order = _probe(module, shape, wanted)  # type: ignore[arg-type]
    if num_classes is not None and num_classes != classes:
        raise WsvizError(f"num_classes={num_classes}, but the model outputs {classes} logits per image.")
    records = tuple((p, *wanted[p]) for p in order if p in wanted)
    _ADOPTED[module] = Adoption(shape, classes, records)  # type: ignore[arg-type]
    from wsviz.models.taps import forget

    forget(module)
    return module
