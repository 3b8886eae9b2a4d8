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


def tap_modules(model: nn.Module) -> list[tuple[TapInfo, Tap]]:
    """(info, module) for every tap, in definition order; cached per model (architectures
    do not change after construction), so repeated feature-map calls skip the module walk."""
    found = _CACHE.get(model)
    if found is None:
        found = [(TapInfo(name, m.kind, m.label), m) for name, m in model.named_modules() if isinstance(m, Tap)]
        _CACHE[model] = found
    return found


def list_taps(model: nn.Module, kind: str | None = None) -> list[TapInfo]:
    """Every :class:`Tap` of ``model`` in forward-definition order, optionally of one kind."""
    return [info for info, _ in tap_modules(model) if kind is None or info.kind == kind]
