"""Feature maps through the models' uniform named outputs (taps).

Per dilation rate (msws), per WSMS stage, per ShaRDNet iteration and per ResNet stage /
CNN level: whatever :class:`~wsviz.models.sharing.Tap` modules a model has. No per-family
code: a page asks for kinds and gets maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from wsviz.data.datasets import fit_to
from wsviz.errors import WsvizError
from wsviz.models.hooks import private_copy, this_thread
from wsviz.models.modes import eval_mode
from wsviz.models.registry import input_shape
from wsviz.models.taps import TapInfo, list_taps, tap_modules


@dataclass
class FeatureMap:
    name: str  # module path of the tap
    kind: str
    label: str
    maps: torch.Tensor  # (C, H, W) for one image (or (D,) for an embedding)

    def mean_activation(self) -> torch.Tensor:
        """(H, W) mean over channels: the one-glance picture of a layer."""
        return self.maps.mean(0) if self.maps.ndim == 3 else self.maps


@contextmanager
def capture(model: nn.Module, taps: Iterable[TapInfo]):
    """The outputs of ``taps`` in this thread's passes during the ``with`` block (another thread's pass
    through the same object goes unrecorded: the app shares one model object between sessions); the
    hooks are removed even on error."""
    got: dict[str, torch.Tensor] = {}
    modules = {info.name: m for info, m in tap_modules(model)}
    handles = []
    try:
        for t in taps:
            mod = modules.get(t.name) or model.get_submodule(t.name)

            def hook(mod, args, out, _n=t.name):
                got[_n] = out.detach()
            handles.append(mod.register_forward_hook(this_thread(hook)))
        yield got
    finally:
        for h in handles:
            h.remove()


def select_taps(model: nn.Module, kinds: Iterable[str] | None = None, names: Iterable[str] | None = None) -> list[TapInfo]:
    taps = list_taps(model)
    if names is not None:
        wanted = list(names)
        known = {t.name for t in taps}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise WsvizError(f"No tap {missing[0]!r} in this model; it has: {', '.join(sorted(known))[:400]}")
        return [t for t in taps if t.name in wanted]
    if kinds is not None:
        kinds = set(kinds)
        return [t for t in taps if t.kind in kinds]
    return taps


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor, kinds: Iterable[str] | None = None,
                 names: Iterable[str] | None = None) -> list[FeatureMap]:
    """The maps of one image (C, H, W) at the chosen taps, in forward order.

    The maps are the eval-mode ones. A model with any module in training mode is run as a private
    copy in eval mode (:mod:`wsviz.models.hooks`' policy: the object given, which the app shares
    between sessions, never changes mode, not even for the length of the pass); a model in eval
    mode throughout (the usual case) runs as it is. Hooks are removed even on error.
    """
    taps = select_taps(model, kinds, names)
    c, h, _ = input_shape(model)
    x = fit_to(image.unsqueeze(0) if image.ndim == 3 else image[:1], c, h)
    x = x.to(next(model.parameters()).device)
    if any(m.training for m in model.modules()):
        model = private_copy(model)
    with eval_mode(model), capture(model, taps) as got:
        model(x)
    return [FeatureMap(t.name, t.kind, t.label, got[t.name][0].cpu()) for t in taps if t.name in got]
