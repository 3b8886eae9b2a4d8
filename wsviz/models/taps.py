"""Named intermediate outputs: one uniform way for every model."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

from wsviz.models.sharing import Tap


@dataclass(frozen=True)
class TapInfo:
    """One named output: its module path, kind (rate/stage/iteration/level/embedding) and label."""

    name: str
    kind: str
    label: str


_CACHE: weakref.WeakKeyDictionary[nn.Module, list[tuple[TapInfo, Tap]]] = weakref.WeakKeyDictionary()


def tap_modules(model: nn.Module) -> list[tuple[TapInfo, nn.Module]]:
    """(info, module) for every tap, in definition order; cached per model (architectures
    do not change after construction), so repeated feature-map calls skip the module walk.

    A wsviz model's taps are its :class:`Tap` modules; an adopted model's (:func:`wsviz.adopt`)
    are the modules at the paths it was adopted with, in the order they run.
    """
    found = _CACHE.get(model)
    if found is None:
        from wsviz.models.adopt import adoption

        adopted = adoption(model)
        if adopted is not None:
            found = [(TapInfo(path, kind, label), model.get_submodule(path)) for path, kind, label in adopted.taps]
        else:
            found = [(TapInfo(name, m.kind, m.label), m) for name, m in model.named_modules() if isinstance(m, Tap)]
        _CACHE[model] = found
    return found


def forget(model: nn.Module) -> None:
    """Drop the cached taps of ``model`` (it was just adopted with new ones)."""
    _CACHE.pop(model, None)


def list_taps(model: nn.Module, kind: str | None = None) -> list[TapInfo]:
    """Every tap of ``model`` (see :func:`tap_modules`) in order, optionally of one kind."""
    return [info for info, _ in tap_modules(model) if kind is None or info.kind == kind]
