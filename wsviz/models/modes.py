"""Run a model in train or eval mode for a while, then put every module's flag back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def set_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run the body with ``model.train(training)``, then restore every submodule's own flag.

    Flags are restored per module (a model may hold a frozen, eval-mode part) through
    ``Module.train`` so modules that act on a mode change (e2cnn's ``R2Conv`` caches its
    expanded filter in eval mode) stay consistent; this happens even when the body raises.
    """
    flags = [(m, m.training) for m in model.modules()]
    if any(flag != training for _, flag in flags):  # a loaded model is usually in eval mode already
        model.train(training)
    try:
        yield model
    finally:
        if any(m.training != flag for m, flag in flags):
            model.train(flags[0][1])
        for m, flag in flags:  # pre-order: a parent's train() is corrected by its children after
            if m.training != flag:
                m.train(flag)


def eval_mode(model: nn.Module):
    """:func:`set_mode` with ``training=False``."""
    return set_mode(model, False)
