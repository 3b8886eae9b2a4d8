"""Tie a trained network's convolutions so that each group applies one stored weight.

This is a sharing *mechanism*, the same one the papers' shared models are built from: the
first member of a group keeps an ``nn.Conv2d`` that owns the tied weight, every other member
becomes a :class:`~wsviz.models.sharing.SharedConv2d` use site of it with its own geometry (stride,
padding, dilation and padding mode, exactly as the member had them: with identical kernels the tied
model computes what the untied one did). So the accounting, the sharing map, the kernel views and every page
see a tied model exactly as they see ShaResNet. Everything else — BatchNorm above all — stays
per block; :func:`reestimate_batchnorm` refreshes its statistics for the tied weights.

The tied weight starts from the trained members' weights (``init``):

* ``mean``: their average;
* ``medoid``: the member closest (Frobenius) to all the others;
* ``lstsq``: the kernel that best reproduces every member's outputs on calibration inputs,
  ``argmin_w sum_m ||X_m w - X_m w_m||^2`` with ``X_m`` the unfolded inputs member ``m`` sees:
  ``w = (sum_m C_m)^-1 sum_m C_m w_m`` with ``C_m = X_m^T X_m``, one solve for all output
  channels (they share the input covariances).
* ``lstsq-bn``: ``lstsq`` where every member may also rescale its input channels, the scales
  folded into the BatchNorm whose output (through a ReLU, or directly) is that member's only
  input: ``relu(bn(x)) * a = relu(a*bn(x))`` for ``a > 0``, so the BN's weight and bias times ``a``
  compute exactly that. Members of one group often differ mostly by such per-channel gains, which
  one shared kernel cannot absorb and a BN per block can. The kernel ``W`` and the scales ``a_m``
  are fitted by alternating least squares, ``argmin sum_m ||X_m diag(a_m) W - X_m w_m||^2``
  (each step closed-form; 20 steps). A member whose input is not such a BN's own (found by
  matching activations and checked by rescaling: the network's outputs must not change) keeps
  scale 1; with none, this is ``lstsq``. Tied by ShaResNet's rule (3 seeds), it keeps more right
  after tying: 89.7% on val against lstsq's 88.4% on the Fashion-MNIST twin, 95.1% against 92.1%
  on the mnist5k twin; after fine-tuning no difference was shown (+0.03 points, 95%
  interval [-0.24, +0.31], on the Fashion twin's val half; -0.00 [-0.19, +0.18] on all 10,000 test
  images of a second Fashion twin, a check planned before it ran), so the fine-tuning recipe keeps ``lstsq``
  (``benchmarks/bench_tie_init.py``, ``benchmarks/results/tie-init-*.md``). Those fine-tunes ran
  before commit 8f162bf changed wsviz's fine-tuning recipe and were not repeated after it: they used
  the recipe of then (the untied model's predictions alone as the loss, no labels, no feature
  distillation), so what lstsq-bn changes after today's fine-tune is not measured.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsviz.errors import WsvizError
from wsviz.models.adopt import carry_adoption
from wsviz.models.hooks import this_thread
from wsviz.models.sharing import SharedConv2d, explicit_padding, set_submodule

INITS = ("mean", "medoid", "lstsq", "lstsq-bn")
ALS_STEPS = 20  # alternating steps of lstsq-bn (on the Fashion twin its loss fell 2.5x by 20; 5 gave 2/3 of that)


def _conv(model: nn.Module, path: str, group: Sequence[str], lenders: dict[int, list[str]] | None = None,
          aliased: dict[str, tuple[str, list[str]]] | None = None) -> nn.Conv2d:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        raise WsvizError(f"Group {list(group)}: the model has no layer {path!r}.") from None
    if isinstance(mod, SharedConv2d):
        owner = next((n for n, m in model.named_modules() if m is mod.source), "another layer")
        raise WsvizError(f"Group {list(group)}: {path!r} already shares the weight of {owner!r}; a layer shares one "
                         "weight at most, so leave it out.")
    if not isinstance(mod, nn.Conv2d):
        raise WsvizError(f"Group {list(group)}: {path!r} is a {type(mod).__name__}, not a convolution.")
    users = (lenders or {}).get(id(mod))
    if users:
        raise WsvizError(f"Group {list(group)}: {path!r} already lends its weight to {', '.join(users[:3])}; a layer "
                         "shares one weight at most, so leave it out.")
    if path in (aliased or {}):
        what, others = aliased[path]
        raise WsvizError(f"Group {list(group)}: {path!r} already shares its {what} with {', '.join(map(repr, others[:3]))} "
                         "(one tensor held by both); a layer shares one weight at most, so leave it out.")
    return mod


def _lenders(model: nn.Module) -> dict[int, list[str]]:
    """{id of a conv whose weight other layers use: the paths of those use sites}."""
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, SharedConv2d):
            out.setdefault(id(m.source), []).append(name)
    return out


def tie_signature(conv: nn.Conv2d) -> tuple:
    """What the members of a group must have in common for one stored weight (and bias) to serve them
    all: weight shape, groups, and whether they have a bias. (Geometry may differ: each use site keeps
    its own.)"""
    return tuple(conv.weight.shape), conv.groups, conv.bias is not None


def aliased_convs(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Convolutions already sharing a parameter without :class:`SharedConv2d`: a conv whose weight or
    bias ``nn.Parameter`` is also another module's (``b.conv.weight = a.conv.weight``), or one module
    reachable at two paths. {path: (what it shares: "weight", "bias" or "weight and bias", the other
    paths holding it)}, for every such path. Tying one of them would not stop storing what it shares,
    so what a tie saves would not be what it claims: they are refused, as shared layers are."""
    holders: dict[int, list[str]] = {}
    modules = list(model.named_modules(remove_duplicate=False))
    for name, m in modules:
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    out: dict[str, tuple[str, list[str]]] = {}
    for name, m in modules:
        if not isinstance(m, nn.Conv2d):
            continue
        shared = {}
        for what in ("weight", "bias"):
            p = getattr(m, what, None)
            others = [h for h in holders.get(id(p), []) if h != name] if isinstance(p, nn.Parameter) else []
            if others:
                shared[what] = others
        if shared:
            others = list(dict.fromkeys(h for hs in shared.values() for h in hs))
            out[name] = (" and ".join(shared), others)
    return out


def check_groups(model: nn.Module, groups: Sequence[Sequence[str]]) -> list[list[nn.Conv2d]]:
    """The member convolutions of every group, or a one-line error naming the group and why."""
    if not groups:
        raise WsvizError("No groups to tie: give lists of two or more conv layer paths with the same weight shape.")
    seen: dict[str, int] = {}
    lenders = _lenders(model)
    aliased = aliased_convs(model)
    out = []
    for g, group in enumerate(groups):
        group = list(group)
        if len(group) < 2:
            raise WsvizError(f"Group {group}: a group needs two or more layers.")
        for path in group:
            if path in seen:
                where = "twice in this group" if seen[path] == g else f"already in group {seen[path] + 1}"
                raise WsvizError(f"Group {group}: {path!r} is {where}; a layer shares one weight at most.")
            seen[path] = g
        convs = [_conv(model, p, group, lenders, aliased) for p in group]
        shapes = {tuple(c.weight.shape) for c in convs}
        if len(shapes) > 1:
            raise WsvizError(f"Group {group}: the layers' weights differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                             "only same-shape convolutions can share one weight.")
        if len({tie_signature(c) for c in convs}) > 1:
            raise WsvizError(f"Group {group}: the layers differ in groups or bias, so one weight cannot serve them all.")
        out.append(convs)
    return out


@torch.no_grad()
def _input_covariances(model: nn.Module, convs: list[nn.Conv2d], images, batch_size: int = 64) -> list[torch.Tensor]:
    """C_m = X_m^T X_m for each conv (X_m: its unfolded inputs on ``images``), accumulated in float64.

    One pass over ``images`` serves every conv (hooks on all of them). ``images``: a tensor (run in
    chunks of ``batch_size``) or an iterable of batches (tensors, or (images, labels) pairs).

    ``model`` is not changed: in eval mode it is run as it is, else an eval-mode copy is (a model the
    app caches is shared by every session's thread), and the hooks act in this thread only
    (:func:`wsviz.models.hooks.this_thread`): another thread's pass meanwhile is not counted.
    """
    found: dict[int, torch.Tensor] = {}
    if any(m.training for m in model.modules()):
        index = {id(m): n for n, m in model.named_modules()}
        paths = [index[id(c)] for c in convs]
        model = copy.deepcopy(model).eval()
        convs = [model.get_submodule(p) for p in paths]
    handles = [conv.register_forward_pre_hook(this_thread(_input_covariance_hook(found, i)))
               for i, conv in enumerate(convs)]
    try:
        for batch in calibration_batches(images, batch_size):
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return [found[i] for i in range(len(convs))]


def _input_covariance_hook(covs: dict, key, chunk: int = 8):
    """A forward pre-hook that adds its conv's X^T X (unfolded inputs) to ``covs[key]``: in float32 per
    chunk of ``chunk`` images (fast, bounded memory), accumulated in float64."""
    @torch.no_grad()
    def hook(mod, args):
        x = args[0].detach()
        for start in range(0, len(x), chunk):
            cols = unfold_inputs(mod, x[start:start + chunk])
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).float().cpu()
            c = (cols.T @ cols).double()
            covs[key] = covs[key] + c if key in covs else c
    return hook


def unfold_inputs(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The columns ``conv`` multiplies its weight with on input ``x``, (n, in*kh*kw, positions): padded
    as the conv pads (its ``padding_mode``, and ``"same"``/``"valid"`` as well as pairs), so that
    ``weight.flatten(1) @ columns`` is its output without bias."""
    pad = explicit_padding(conv.kernel_size, conv.padding, conv.dilation)
    mode = getattr(conv, "padding_mode", "zeros")
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    return F.unfold(x, conv.kernel_size, conv.dilation, 0, conv.stride)


def calibration_batches(images, batch_size: int = 64):
    """Batches of calibration inputs: ``images`` is a tensor (cut into ``batch_size`` chunks) or an
    iterable of batches (tensors, or (images, labels) pairs as a DataLoader yields them)."""
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _has_images(images) -> bool:
    return images is not None and not (isinstance(images, torch.Tensor) and len(images) == 0)


def _need_images(images, init: str = "lstsq") -> None:
    if not _has_images(images):
        raise WsvizError(f"init={init!r} needs calibration images (a batch of inputs the model was trained on).")


def initial_weight(convs: list[nn.Conv2d], init: str, model: nn.Module | None = None, images=None,
                   covs: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) one group starts from; see the module docstring for the three inits.
    ``covs``: the members' input covariances, when already computed (lstsq)."""
    ws = torch.stack([c.weight.detach() for c in convs])
    bs = None if convs[0].bias is None else torch.stack([c.bias.detach() for c in convs])
    if init == "mean":
        return ws.mean(0), None if bs is None else bs.mean(0)
    if init == "medoid":
        flat = ws.flatten(1)
        k = int(torch.cdist(flat, flat).sum(1).argmin())
        return ws[k].clone(), None if bs is None else bs[k].clone()
    if init == "lstsq":
        if covs is None:
            _need_images(images, init)
            if model is None:
                raise WsvizError(f"init={init!r} needs the model, to run the calibration images through it.")
            covs = _input_covariances(model, convs, images)
        return _least_squares_start(convs, covs, [False] * len(convs))[:2]
    if init == "lstsq-bn":
        raise WsvizError("init='lstsq-bn' also rescales the members' BatchNorms, so it needs the whole model: "
                         "use tie(model, groups, init='lstsq-bn', images=...).")
    raise WsvizError(f"Unknown init {init!r}; choose one of {', '.join(INITS)}.")


def _least_squares_start(convs: list[nn.Conv2d], covs: list[torch.Tensor], free: list[bool]
                         ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """(weight, bias, each member's input-channel scales) a least-squares group starts from: the kernel
    of :func:`_scaled_lstsq` in the members' shape and dtype, their mean bias (the input scales do not
    touch it)."""
    ws = torch.stack([c.weight.detach() for c in convs])
    w, scales = _scaled_lstsq(ws, covs, free)
    bias = None if convs[0].bias is None else torch.stack([c.bias.detach() for c in convs]).mean(0)
    return w.reshape(ws.shape[1:]).to(ws.dtype), bias, scales


def _scaled_lstsq(ws: torch.Tensor, covs: list[torch.Tensor], free: list[bool], steps: int = ALS_STEPS
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The shared kernel ``W`` (out, in*kh*kw) and per-member input-channel scales ``a_m`` (in,)
    minimising ``sum_m tr((W D_m - W_m) C_m (W D_m - W_m)^T)``, ``D_m = diag(a_m)`` over each input
    channel's kh*kw taps; members not ``free`` keep ``a_m = 1`` (so with none free this is the plain
    least-squares kernel, in one solve). Alternating exact solves: ``W`` given the scales, then each
    member's scales given ``W`` (clamped to >= 0.05: a BN can absorb a positive scale only).
    Returns (W, scales) in float64."""
    n_out, n_in = ws.shape[1:3]  # ws: the members' stacked (out, in, kh, kw) weights
    taps = ws[0].numel() // (n_out * n_in)
    flat = [w.flatten(1).double() for w in ws]  # (out, d) each
    d = flat[0].shape[1]
    scales = [torch.ones(n_in, dtype=torch.float64) for _ in flat]
    expand = torch.zeros(d, n_in, dtype=torch.float64)
    expand[torch.arange(d), torch.arange(d) // taps] = 1  # input channel of each unfolded column

    def kernel():
        full = [s.repeat_interleave(taps) for s in scales]
        a = sum(f[:, None] * c * f[None, :] for f, c in zip(full, covs))
        a = a + torch.eye(d, dtype=a.dtype) * (1e-6 * a.diagonal().mean().clamp_min(1e-12))
        rhs = sum((w @ c * f[None, :]).T for w, c, f in zip(flat, covs, full))  # (d, out)
        return torch.linalg.solve(a, rhs).T

    w = kernel()
    if not any(free):
        return w, scales
    for _ in range(steps):
        gram = w.T @ w
        for m, (wm, c) in enumerate(zip(flat, covs)):
            if not free[m]:
                continue
            g = expand.T @ (c * gram) @ expand
            b = expand.T @ torch.diagonal(w.T @ wm @ c)
            ridge = 1e-6 * g.diagonal().mean().clamp_min(1e-12)  # a channel that never fires keeps scale 1
            scales[m] = torch.linalg.solve(g + ridge * torch.eye(n_in, dtype=g.dtype),
                                           b + ridge).clamp_min(0.05)
        if all(free):  # W and the scales trade a common factor: keep the scales' mean at 1 per channel
            mean = torch.stack(scales).mean(0)
            scales = [s / mean for s in scales]
        w = kernel()
    return w, scales


@torch.no_grad()
def absorbing_norms(model: nn.Module, convs: list[nn.Conv2d], images) -> list[str | None]:
    """For each conv: the path of the BatchNorm2d whose output, through a ReLU or as it is, is that
    conv's input and nothing else's (ungrouped convs only), so that scaling the BN's weight and bias by ``a > 0`` per channel
    and the conv's input channels by ``1/a`` leaves the network's function unchanged; else None.

    Found on a few calibration images: the conv's input must equal ``relu(bn_out)`` (or ``bn_out``)
    of exactly one BN, and a trial rescaling by random positive factors must leave the outputs
    unchanged (a BN that also feeds a shortcut or another conv fails it); the trial is undone, but it
    changes ``model``'s weights and mode while it runs, so give it a copy no other thread uses (as
    :func:`tie` does: its own copy). Its hooks act in this thread only."""
    batch = next(calibration_batches(images, 8))
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}
    outs: dict[str, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(this_thread(lambda mod, a, out, n=n: outs.__setitem__(n, out.detach().clone())))
               for n, m in bns.items()]
    handles += [c.register_forward_pre_hook(this_thread(lambda mod, a, i=i: ins.__setitem__(i, a[0].detach().clone())))
                for i, c in enumerate(convs)]
    was = model.training
    model.eval()
    try:
        reference = model(batch)
    finally:
        for h in handles:
            h.remove()
    found: list[str | None] = []
    try:
        for i, conv in enumerate(convs):
            x = ins.get(i)
            match = [n for n, y in outs.items() if x is not None and y.shape == x.shape
                     and (torch.equal(F.relu(y), x) or torch.equal(y, x))]
            name = match[0] if len(match) == 1 and match[0] not in found and conv.groups == 1 else None
            if name is not None and not _rescaling_preserves(model, bns[name], conv, batch, reference):
                name = None
            found.append(name)
    finally:
        model.train(was)
    return found


def _rescaling_preserves(model, bn: nn.BatchNorm2d, conv: nn.Conv2d, batch, reference) -> bool:
    scale = torch.empty(bn.num_features).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    saved = bn.weight.detach().clone(), bn.bias.detach().clone(), conv.weight.detach().clone()
    try:
        bn.weight.mul_(scale.to(bn.weight))
        bn.bias.mul_(scale.to(bn.bias))
        conv.weight.div_(scale.to(conv.weight).view(1, -1, 1, 1))
        out = model(batch)
    finally:
        bn.weight.copy_(saved[0])
        bn.bias.copy_(saved[1])
        conv.weight.copy_(saved[2])
    tol = 1e-4 * float(reference.abs().max().clamp_min(1e-6))
    return isinstance(out, torch.Tensor) and out.shape == reference.shape and bool((out - reference).abs().max() <= tol)


def apply_ties(model: nn.Module, groups: Sequence[Sequence[str]]) -> nn.Module:
    """Make every group of ``model`` (in place) apply its first member's stored weight: the other
    members become :class:`SharedConv2d` use sites of it. No weight changes: this is the structure
    only, what :func:`tie` builds and what a tied checkpoint is rebuilt with before its weights are
    loaded. ``model.wsviz_tie["groups"]`` lists every group tied so far. Returns ``model``."""
    member_groups = check_groups(model, groups)
    for group, convs in zip(groups, member_groups):
        owner = convs[0]
        for path, conv in zip(list(group)[1:], convs[1:]):
            set_submodule(model, path, SharedConv2d(owner, stride=conv.stride, padding=conv.padding,
                                                    dilation=conv.dilation, padding_mode=conv.padding_mode))
    record = dict(getattr(model, "wsviz_tie", None) or {})
    record["groups"] = [list(g) for g in record.get("groups", [])] + [list(g) for g in groups]
    model.wsviz_tie = record
    return model


def tie(model: nn.Module, groups: Sequence[Sequence[str]], init: str = "lstsq", images=None, *,
        covariances: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` in which every group of same-shape convolutions applies one stored weight.

    ``groups``: lists of module paths. ``images``: calibration inputs, a tensor or an iterable of
    batches (needed by ``lstsq`` and ``lstsq-bn``; also what :func:`reestimate_batchnorm` should then be given). The
    original model is untouched. The copy records the ties in ``wsviz_tie`` (every tied group and
    the init), which a checkpoint card keeps so that loading it rebuilds the ties. ``covariances``:
    the members' input covariances by layer path, when already computed (then no images are needed).
    """
    if init not in INITS:
        raise WsvizError(f"Unknown init {init!r}; choose one of {', '.join(INITS)}.")
    member_groups = check_groups(model, groups)
    least_squares = init in ("lstsq", "lstsq-bn")
    covs: list = [None] * len(member_groups)
    if least_squares and covariances is not None:
        covs = [[covariances[n] for n in g] for g in groups]
    elif least_squares:
        _need_images(images, init)
        flat = _input_covariances(model, [c for convs in member_groups for c in convs], images)  # one pass, all groups
        it = iter(flat)
        covs = [[next(it) for _ in convs] for convs in member_groups]
    tied = carry_adoption(model, copy.deepcopy(model))  # an adopted model's copy stays adopted (input, taps)
    if init == "lstsq-bn":
        _need_images(images, init)  # the BNs are found by running images
        norms = absorbing_norms(tied, [tied.get_submodule(p) for g in groups for p in g], images)
        it = iter(norms)
        norms = [[next(it) for _ in g] for g in groups]
        starts, rescale = [], []
        for convs, cov, names in zip(member_groups, covs, norms):
            w, bias, scales = _least_squares_start(convs, cov, [n is not None for n in names])
            starts.append((w, bias))
            rescale += [(n, a) for n, a in zip(names, scales) if n is not None]
        with torch.no_grad():
            for name, a in rescale:
                bn = tied.get_submodule(name)
                bn.weight.mul_(a.to(bn.weight))
                bn.bias.mul_(a.to(bn.bias))
    else:
        starts = [initial_weight(convs, init, model, images, cov) for convs, cov in zip(member_groups, covs)]
    for group, (w, b) in zip(groups, starts):
        owner = tied.get_submodule(group[0])
        with torch.no_grad():
            owner.weight.copy_(w)
            if b is not None:
                owner.bias.copy_(b)
    apply_ties(tied, groups)
    tied.wsviz_tie["init"] = init
    if init == "lstsq-bn":
        tied.wsviz_tie["rescaled_norms"] = [n for n, _ in rescale]
    return tied


def shuffled(images: torch.Tensor) -> torch.Tensor:
    """``images`` in the fixed shuffled order :func:`reestimate_batchnorm` batches a tensor in."""
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images, batch_size: int = 128) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``images`` (a tensor or an iterable of
    batches; a cumulative average over the batches, as if the model had been trained with these
    weights); weights are not touched.

    A tensor is batched in a fixed shuffled order: the average of per-batch variances is only the
    variance training saw when every batch mixes the classes, and calibration sets are often sorted
    by class (batches of one class underestimate it: the shipped ShaResNet twin, scale-sharesnet-unshared
    at 96.4% on its 1,000 test images, kept 94.4% re-estimated on its class-sorted 4,000-image training
    split in batches of 128, 2.0 points lost, and 96.0% on the same images shuffled, 0.4 points lost).
    An iterable's batches are taken as they come, so shuffle them (a DataLoader with ``shuffle=True``)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    if isinstance(images, torch.Tensor):
        images = shuffled(images)
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    try:
        for batch in calibration_batches(images, batch_size):
            model(batch)
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        model.train(was)
    return model
