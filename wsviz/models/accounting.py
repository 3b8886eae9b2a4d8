"""Parameter, FLOP and sharing accounting for any model.

* unique parameters: ``sum(p.numel() for p in model.parameters())`` — a shared weight is
  one ``nn.Parameter``, so it counts once;
* the sharing report: one forward pass is traced with a ``TorchFunctionMode``; every
  layer op (conv, linear, normalisation, embedding) is recorded with the module it ran in and the
  weight tensors it received, and every matrix product (``@``, matmul, mm, bmm, einsum) and
  attention call with the parameters it received as they are. A weight that is a parameter is a *direct* use; one computed
  from parameters (RepeatNet tiles, e2cnn's basis expansion) is followed back through its
  autograd graph to the parameters it was *derived* from;
* effective parameters ("as if unshared"): the number of weights the network actually
  applies — each use of a weight counted at the size it is applied at — plus parameters
  no layer op uses directly or indirectly (counted once);
* one notion of reuse for every family: each use of a parameter has a *kind* —
  ``direct`` (the parameter itself is applied; several direct uses = the same weight
  applied at several places: msws rates, WSMS stages, ShaRDNet iterations, ShaResNet
  blocks), ``tiled`` (a larger weight assembled from copies of it: RepeatNet, each parent
  element applied k times), ``expanded`` (a basis expansion: e2cnn's few learnable
  coefficients combined into many filter taps), ``derived`` (a same-size or smaller
  transform) or ``modulates`` (a parameter that only shapes a weight carried by another:
  s-RepeatNet's per-tile (alpha, beta), f-RepeatNet's sign latents). Each use carries the
  number of applied weights it accounts for, so the uses of all parameters add up to the
  effective parameter count (``ModelSummary.reuse()``);
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
from wsviz.sharingmap import REUSE_KINDS, ParamReuse, ParamUse, SharingMap

__all__ = ["REUSE_KINDS", "ModelSummary", "ParamReuse", "ParamUse", "SharingMap", "applied_weights", "count_flops",
           "reuse_report", "sharing_report", "summarize"]

# Layer ops and the positions of their weight-like arguments (arg 0 is the input).
_LAYER_OPS = {
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.linear: "linear", F.batch_norm: "batch_norm", F.layer_norm: "layer_norm",
    F.group_norm: "group_norm", F.instance_norm: "instance_norm", F.embedding: "embedding",
}

# Products that apply whatever tensors they get, activations or weights alike (arg 0 may be the
# weight): only a parameter passed as it is counts as a use of it (a derived operand might be an
# activation, whose autograd graph leads back to every earlier parameter). The attention op applies
# its projection weights itself, inside one call the tracer sees as one.
_PRODUCT_OPS = {
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.Tensor.__rmatmul__: "matmul", torch.mm: "matmul", torch.Tensor.mm: "matmul", torch.bmm: "matmul",
    torch.Tensor.bmm: "matmul", torch.addmm: "matmul", torch.baddbmm: "matmul", torch.einsum: "einsum",
    F.multi_head_attention_forward: "multi_head_attention",
}


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
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every parameter's stored shape

    @property
    def float_params(self) -> int:
        """Real-valued parameters: every stored element except f-RepeatNet's sign masks. These are
        what the papers count as a model's parameters (RepeatNet: a mask "stores only single-bit
        information"), so f-RepeatNet has exactly linear RepeatNet's parameters plus its mask bits."""
        return self.unique_params - self.mask_params

    @property
    def mask_bits(self) -> int:
        """f-RepeatNet's sign masks at one bit per entry (trained through real latents, kept as signs)."""
        return self.mask_params

    @property
    def storage_bytes(self) -> int:
        """What the trained model takes to store: float32 parameters plus the masks' bits."""
        return 4 * self.float_params + (self.mask_bits + 7) // 8

    @property
    def compression(self) -> float:
        """effective / float parameters: how many times each stored weight is applied on average
        (as the papers count it: sign masks are bits, not parameters)."""
        return self.effective_params / max(self.float_params, 1)

    @property
    def macs(self) -> int:
        return self.flops // 2

    def uses_by_param(self) -> dict[str, list[ParamUse]]:
        out: dict[str, list[ParamUse]] = defaultdict(list)
        for u in self.uses:
            out[u.param].append(u)
        return dict(out)

    def reuse(self) -> dict[str, ParamReuse]:
        """Every used parameter's reuse, in forward order of first use."""
        return _reuse(self.uses, self.param_shapes)

    def shared_params(self) -> dict[str, list[ParamUse]]:
        """Parameters applied more than once: at several places (msws, WSMS, ShaRDNet,
        ShaResNet) or tiled / basis-expanded into a larger applied weight (RepeatNet, e2cnn)."""
        return {p: list(r.uses) for p, r in self.reuse().items() if r.reused}


_MATMUL_NODES = ("MmBackward", "BmmBackward", "AddmmBackward", "MvBackward", "MatmulBackward", "EinsumBackward",
                 "TensordotBackward")


def _reuse(uses: list[ParamUse], shapes: dict[str, tuple[int, ...]]) -> dict[str, ParamReuse]:
    by: dict[str, list[ParamUse]] = defaultdict(list)
    for u in uses:
        by[u.param].append(u)
    return {p: ParamReuse(p, shapes.get(p, (0,)), tuple(us), sum(u.applied for u in us)) for p, us in by.items()}


def reuse_report(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> dict[str, ParamReuse]:
    """Every used parameter's reuse in one forward pass (the sharing map without FLOPs)."""
    uses, _, _ = sharing_report(model, input_shape)
    return _reuse(uses, {n: tuple(p.shape) for n, p in model.named_parameters()})


def _leaf_params(t: torch.Tensor, cache: dict) -> tuple[set[int], bool]:
    """(ids of the leaf tensors (parameters) ``t`` was computed from, whether a matrix product
    combined them on the way — the mark of a basis expansion rather than a tiling)."""
    fn = t.grad_fn
    if fn is None:
        return set(), False
    if fn in cache:
        return cache[fn]
    found: set[int] = set()
    matmul = False
    stack, seen = [fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        matmul = matmul or type(node).__name__.startswith(_MATMUL_NODES)
        var = getattr(node, "variable", None)
        if var is not None:
            found.add(id(var))
        for nxt, _ in getattr(node, "next_functions", ()):
            stack.append(nxt)
    cache[fn] = (found, matmul)
    return found, matmul


def _is_mask(name: str) -> bool:
    """f-RepeatNet's sign latents: they choose a sign per applied weight, they carry no weight."""
    return name.endswith("sign_latent")


def _derived_uses(t: torch.Tensor, sources: list[str], numel: dict[str, int], matmul: bool, site: str, op: str,
                  detail: str) -> list[ParamUse]:
    """The uses one derived weight makes of its source parameters.

    The *carrier* is the largest source that is not a sign mask: the applied weight's values
    are copies (tiling) or linear combinations (basis expansion) of its elements, so it is
    credited with all ``t.numel()`` applied weights. Every other source only modulates.
    """
    carriers = [n for n in sources if not _is_mask(n)] or sources
    carrier = max(carriers, key=lambda n: (numel[n], n))
    size = t.numel()
    if size > numel[carrier]:
        kind = "expanded" if matmul else "tiled"
    else:
        kind = "derived"
    shape = tuple(t.shape)
    return [ParamUse(n, site, op, shape, True, detail, kind if n == carrier else "modulates",
                     size if n == carrier else 0) for n in sources]


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
    def __init__(self, names: dict[int, str], stack: list[str], numel: dict[str, int]) -> None:
        super().__init__()
        self.names, self.stack, self.numel = names, stack, numel
        self.uses: list[ParamUse] = []
        self.applied = 0  # weights applied by layer ops, each use counted at its applied size
        self.products: set[int] = set()  # indices in ``uses`` of parameters given to a matrix product
        self._cache: dict = {}

    def result(self) -> tuple[list[ParamUse], int]:
        """(uses in forward order, weights applied). A parameter a layer op applies (directly, or as
        the source of a weight built from it: e2cnn's basis expansion is an einsum of its
        coefficients) keeps only those uses; one only products apply (``h @ W``, attention's
        projections) keeps its product uses."""
        layered = {u.param for i, u in enumerate(self.uses) if i not in self.products}
        kept = [u for i, u in enumerate(self.uses) if i not in self.products or u.param not in layered]
        return kept, self.applied + sum(u.applied for i, u in enumerate(self.uses)
                                        if i in self.products and u.param not in layered)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _LAYER_OPS.get(func)
        product = _PRODUCT_OPS.get(func) if op is None else None
        if product is not None:
            site = self.stack[-1] if self.stack else ""
            operands = [a for x in [*args, *kwargs.values()] for a in (x if isinstance(x, (list, tuple)) else [x])]
            for t in operands:
                if isinstance(t, torch.Tensor) and id(t) in self.names:
                    self.products.add(len(self.uses))
                    self.uses.append(ParamUse(self.names[id(t)], site, product, tuple(t.shape), False, "", "direct",
                                              t.numel()))
        if op is not None:
            site = self.stack[-1] if self.stack else ""
            detail = _conv_detail(op, args, kwargs)
            for t in list(args[1:]) + list(kwargs.values()):
                if not isinstance(t, torch.Tensor):
                    continue
                t = getattr(t, "_wsviz_source", t)  # a parameter passed through a gradient scaling is itself
                if id(t) in self.names:
                    self.uses.append(ParamUse(self.names[id(t)], site, op, tuple(t.shape), False, detail, "direct",
                                              t.numel()))
                    self.applied += t.numel()
                elif t.requires_grad:
                    leaves, matmul = _leaf_params(t, self._cache)
                    sources = sorted(self.names[i] for i in leaves if i in self.names)
                    if sources:
                        self.uses.extend(_derived_uses(t, sources, self.numel, matmul, site, op, detail))
                        self.applied += t.numel()
        return func(*args, **kwargs)


def _resolve_shape(model: nn.Module, shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    return tuple(shape) if shape is not None else _registered_input_shape(model)  # type: ignore[return-value]


def _traced_forward(model: nn.Module, shape: tuple[int, int, int], make_tracer) -> TorchFunctionMode:
    """Run one forward of two random images under the tracer ``make_tracer(names, stack, numel)``.

    Training mode (so e2cnn expands its filters from the basis coefficients on the fly),
    gradients on for every parameter (so derived weights can be followed back to them), hooks on
    every module: all on a private deep copy, so ``model`` (its BatchNorm running statistics,
    ``requires_grad`` flags and modes) is never touched, even while other threads run it.
    """
    from wsviz.models.hooks import private_copy  # the app shares one model object per checkpoint among threads

    model = private_copy(model)
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
    device = next(iter(params.values())).device if params else torch.device("cpu")
    try:
        for p in params.values():
            p.requires_grad_(True)
        x = torch.randn(2, *shape, device=device)
        tracer = make_tracer(names, stack, {n: p.numel() for n, p in params.items()})
        with set_mode(model, True), torch.enable_grad(), tracer:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return tracer


def sharing_report(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> tuple[list[ParamUse], int, list[str]]:
    """Trace one forward pass: (uses, effective parameter count, parameters no op used).

    Runs in training mode on a batch of two random images; BatchNorm running statistics and
    the model's mode are restored afterwards.
    """
    shape = _resolve_shape(model, input_shape)
    tracer = _traced_forward(model, shape, _UseTracer)
    params = dict(model.named_parameters())
    uses, applied = tracer.result()
    used = {u.param for u in uses}
    unused = [n for n in params if n not in used]
    effective = applied + sum(params[n].numel() for n in unused)
    return uses, effective, unused


class _WeightCapture(_UseTracer):
    """A use tracer that also keeps the conv weights applied at one site."""

    def __init__(self, names, stack, numel, site: str) -> None:
        super().__init__(names, stack, numel)
        self.site = site
        self.weights: list[tuple[torch.Tensor, str]] = []  # (applied weight, carrier parameter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv1d, F.conv2d, F.conv3d) and self.stack and self.stack[-1] == self.site:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, torch.Tensor):
                n_before = len(self.uses)
                out = super().__torch_function__(func, types, args, kwargs)
                carriers = [u.param for u in self.uses[n_before:] if u.applied and u.applied_shape == tuple(w.shape)]
                self.weights.append((w.detach().clone(), carriers[0] if carriers else ""))
                return out
        return super().__torch_function__(func, types, args, kwargs)


def applied_weights(model: nn.Module, site: str, input_shape: tuple[int, int, int] | None = None
                    ) -> list[tuple[torch.Tensor, str]]:
    """The convolution weights one forward pass applies at module ``site``, in order, each with
    the parameter that carries it: a weight applied several times there (msws rates) appears
    once per application; a derived weight (RepeatNet tile, e2cnn filter) as realised."""
    shape = _resolve_shape(model, input_shape)
    tracer = _traced_forward(model, shape, lambda n, s, k: _WeightCapture(n, s, k, site))
    return tracer.weights


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
    return ModelSummary(count_unique(model), effective, count_flops(model, shape), shape, uses, unused, masks,
                        {n: tuple(p.shape) for n, p in model.named_parameters()})
