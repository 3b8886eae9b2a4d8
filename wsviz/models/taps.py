"""Named intermediate outputs: one uniform way for every model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from wsviz.models.sharing import Tap


@dataclass(frozen=True)
class TapInfo:
    """One named output: its module path, kind (rate/stage/iteration/level/embedding) and label."""

    name: str
    kind: str
    label: str


def list_taps(model: nn.Module, kind: str | None = None) -> list[TapInfo]:
    """Every :class:`Tap` of ``model`` in forward-definition order, optionally of one kind."""
    return [TapInfo(name, m.kind, m.label) for name, m in model.named_modules()
            if isinstance(m, Tap) and (kind is None or m.kind == kind)]
