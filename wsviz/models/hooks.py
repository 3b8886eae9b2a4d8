"""Forward hooks that see only the passes of the thread that set them.

The app keeps one model object per checkpoint for every browser session (``st.cache_resource``),
and Streamlit runs each session's script in a thread of its own. A hook put on that shared object
by one analysis (feature capture, covariances for a least-squares kernel, CKA, FLOPs counting)
would otherwise also fire on another session's forward pass through the same object, or on the
same session's live prediction in a second thread, and record that pass's activations into the
analysis: numbers from images the analysis never chose. Every hook wsviz registers is wrapped by
:func:`this_thread`, so a pass in another thread goes through the model untouched and unrecorded.

Only hooks are made thread-local: anything that changes a model's state (its mode, BatchNorm
statistics, weights) works on a copy (``copy.deepcopy``) and never on a shared object.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

H = TypeVar("H", bound=Callable)


def this_thread(hook: H) -> H:
    """``hook`` acting only in the thread that calls this (where the hook is registered): in any
    other thread it returns None, which leaves the module's input or output as it is."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(*args, **kwargs):
        if threading.get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return guarded  # type: ignore[return-value]


def private_copy(model):
    """A deep copy of ``model`` to change freely (modes, BatchNorm statistics, hooks of other
    libraries such as captum's), known to wsviz as ``model`` is (an adopted model stays adopted).

    Tensors a module caches from its parameters (e2cnn's expanded ``filter`` in eval mode: not
    graph leaves, which ``copy.deepcopy`` refuses) are copied detached: the copy's cache holds the
    same values, and a copy switched to training mode rebuilds it from its own parameters."""
    import copy

    import torch

    from wsviz.models.adopt import carry_adoption

    memo: dict[int, object] = {}
    for m in model.modules():
        for value in (*vars(m).values(), *m._buffers.values()):
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return carry_adoption(model, copy.deepcopy(model, memo))
