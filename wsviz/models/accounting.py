"""Parameter, FLOP and sharing accounting for any model.

* unique parameters: ``sum(p.numel() for p in model.parameters())`` — a shared weight is
  one ``nn.Parameter``, so it counts once;
* the sharing report: one forward pass is traced with a ``TorchFunctionMode``; every
  layer op (conv, linear, normalisation) is recorded with the module it ran in and the
  weight tensors it received. A weight that is a parameter is a *direct* use; one computed
  from parameters (RepeatNet tiles, e2cnn's basis expansion) is followed back through its
  autograd graph to the parameters it was *derived* from;
* effective parameters ("as if unshared"): the number of weights the network actually
  applies — each use of a weight counted at the size it is applied at — plus parameters
  no layer op uses directly or indirectly (counted once);
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one image in eval mode (a
  multiply-add is 2 FLOPs, as torch counts).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from wsviz.models.modes import eval_mode, set_mode
from wsviz.models.registry import input_shape as _registered_input_shape

# Layer ops and the positions of their weight-like arguments (arg 0 is the input).
_LAYER_OPS = {
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.linear: "linear", F.batch_norm: "batch_norm", F.layer_norm: "layer_norm",
    F.group_norm: "group_norm", F.instance_norm: "instance_norm", F.embedding: "embedding",
}


@dataclass(frozen=True)
class ParamUse:
    """One use of a unique parameter in one forward pass."""

    param: str  # the parameter's name in ``model.named_parameters()``
    site: str  # module path where the layer op ran ('' = the model itself)
    op: str  # conv2d, linear, batch_norm, ...
    applied_shape: tuple[int, ...]  # shape of the weight as applied at this site
    derived: bool  # False: the parameter itself; True: a tensor computed from it
    detail: str = ""  # e.g. "stride=1 dilation=2" for a convolution


@dataclass
class ModelSummary:
    """Accounting for one model at one input shape."""

    unique_params: int
    effective_params: int
    flops: int  # per image, torch's count (2 per multiply-add)
    input_shape: tuple[int, int, int]
    uses: list[ParamUse] = field(default_factory=list)
    unused_params: list[str] = field(default_factory=list)
    mask_params: int = 0  # f-RepeatNet sign latents: trained as reals, stored as 1 bit each

    @property
    def compression(self) -> float:
        """effective / unique: how many times each stored weight is applied on average."""
        return self.effective_params / max(self.unique_params, 1)

    @property
    def macs(self) -> int:
        return self.flops // 2

    def uses_by_param(self) -> dict[str, list[ParamUse]]:
        out: dict[str, list[ParamUse]] = defaultdict(list)
        for u in self.uses:
            out[u.param].append(u)
        return dict(out)

    def shared_params(self) -> dict[str, list[ParamUse]]:
        """Parameters applied at more than one place."""
        return {k: v for k, v in self.uses_by_param().items() if len(v) > 1}


def _leaf_params(t: torch.Tensor, cache: dict) -> set[int]:
    """ids of the leaf tensors (parameters) ``t`` was computed from."""
    fn = t.grad_fn
    if fn is None:
        return set()
    if fn in cache:
        return cache[fn]
    found: set[int] = set()
    stack, seen = [fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            found.add(id(var))
        for nxt, _ in getattr(node, "next_functions", ()):
            stack.append(nxt)
    cache[fn] = found
    return found


def _conv_detail(op: str, args: tuple, kwargs: dict) -> str:
    if not op.startswith("conv"):
        return ""
    names = ("stride", "padding", "dilation")
    vals = {n: kwargs.get(n, args[3 + i] if len(args) > 3 + i else 1 if n != "padding" else 0)
            for i, n in enumerate(names)}

    def fmt(v) -> str:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

    return " ".join(f"{n}={fmt(v)}" for n, v in vals.items())


class _UseTracer(TorchFunctionMode):
    def __init__(self, names: dict[int, str], stack: list[str]) -> None:
        super().__init__()
        self.names, self.stack = names, stack
        self.uses: list[ParamUse] = []
        self.applied = 0  # weights applied, each use counted at its applied size
        self._cache: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _LAYER_OPS.get(func)
        if op is not None:
            site = self.stack[-1] if self.stack else ""
            detail = _conv_detail(op, args, kwargs)
            for t in list(args[1:]) + list(kwargs.values()):
                if not isinstance(t, torch.Tensor):
                    continue
                if id(t) in self.names:
                    self.uses.append(ParamUse(self.names[id(t)], site, op, tuple(t.shape), False, detail))
                    self.applied += t.numel()
                elif t.requires_grad:
                    sources = sorted(self.names[i] for i in _leaf_params(t, self._cache) if i in self.names)
                    self.uses.extend(ParamUse(n, site, op, tuple(t.shape), True, detail) for n in sources)
                    self.applied += t.numel() if sources else 0
        return func(*args, **kwargs)


def _resolve_shape(model: nn.Module, shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    return tuple(shape) if shape is not None else _registered_input_shape(model)  # type: ignore[return-value]


def sharing_report(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> tuple[list[ParamUse], int, list[str]]:
    """Trace one forward pass: (uses, effective parameter count, parameters no op used).

    Runs in training mode (so e2cnn expands its filters from the basis coefficients on the
    fly) on a batch of two random images; BatchNorm running statistics and the model's
    mode are restored afterwards.
    """
    shape = _resolve_shape(model, input_shape)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(name)))
        handles.append(mod.register_forward_hook(leave, always_call=True))
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grad_flags = {n: p.requires_grad for n, p in params.items()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    try:
        for p in params.values():
            p.requires_grad_(True)
        x = torch.randn(2, *shape, device=device)
        tracer = _UseTracer(names, stack)
        with set_mode(model, True), torch.enable_grad(), tracer:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(grad_flags[n])
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    used = {u.param for u in tracer.uses}
    unused = [n for n in params if n not in used]
    effective = tracer.applied + sum(params[n].numel() for n in unused)
    return tracer.uses, effective, unused


def count_flops(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> int:
    """FLOPs of one forward pass on one image (eval mode, no grad)."""
    shape = _resolve_shape(model, input_shape)
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(torch.zeros(1, *shape, device=device))
    return int(counter.get_total_flops())


def count_unique(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarize(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> ModelSummary:
    """Unique and effective parameters, FLOPs and the sharing report of ``model``."""
    shape = _resolve_shape(model, input_shape)
    uses, effective, unused = sharing_report(model, shape)
    masks = sum(p.numel() for n, p in model.named_parameters() if n.endswith("sign_latent"))
    return ModelSummary(count_unique(model), effective, count_flops(model, shape), shape, uses, unused, masks)
