"""Tie a trained network's convolutions so that each group applies one stored weight.

This is a sharing *mechanism*, the same one the papers' shared models are built from: the
first member of a group keeps an ``nn.Conv2d`` that owns the tied weight, every other member
becomes a :class:`~wsviz.models.sharing.SharedConv2d` use site of it (with its own stride,
padding and dilation). So the accounting, the sharing map, the kernel views and every page
see a tied model exactly as they see ShaResNet. Everything else — BatchNorm above all — stays
per block; :func:`reestimate_batchnorm` refreshes its statistics for the tied weights.

The tied weight starts from the trained members' weights (``init``):

* ``mean``: their average;
* ``medoid``: the member closest (Frobenius) to all the others;
* ``lstsq``: the kernel that best reproduces every member's outputs on calibration inputs,
  ``argmin_w sum_m ||X_m w - X_m w_m||^2`` with ``X_m`` the unfolded inputs member ``m`` sees:
  ``w = (sum_m C_m)^-1 sum_m C_m w_m`` with ``C_m = X_m^T X_m``, one solve for all output
  channels (they share the input covariances).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsviz.errors import WsvizError
from wsviz.models.sharing import SharedConv2d, set_submodule

INITS = ("mean", "medoid", "lstsq")


def _conv(model: nn.Module, path: str, group: Sequence[str], lenders: dict[int, list[str]] | None = None) -> nn.Conv2d:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        raise WsvizError(f"Group {list(group)}: the model has no layer {path!r}.") from None
    if isinstance(mod, SharedConv2d):
        raise WsvizError(f"Group {list(group)}: {path!r} already shares another layer's weight; tie the layer that "
                         "owns it instead.")
    if not isinstance(mod, nn.Conv2d):
        raise WsvizError(f"Group {list(group)}: {path!r} is a {type(mod).__name__}, not a convolution.")
    users = (lenders or {}).get(id(mod))
    if users:
        raise WsvizError(f"Group {list(group)}: {path!r} already lends its weight to {', '.join(users[:3])}; a layer "
                         "shares one weight at most, so leave it out.")
    return mod


def _lenders(model: nn.Module) -> dict[int, list[str]]:
    """{id of a conv whose weight other layers use: the paths of those use sites}."""
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, SharedConv2d):
            out.setdefault(id(m.source), []).append(name)
    return out


def check_groups(model: nn.Module, groups: Sequence[Sequence[str]]) -> list[list[nn.Conv2d]]:
    """The member convolutions of every group, or a one-line error naming the group and why."""
    if not groups:
        raise WsvizError("No groups to tie: give lists of two or more conv layer paths with the same weight shape.")
    seen: dict[str, int] = {}
    lenders = _lenders(model)
    out = []
    for g, group in enumerate(groups):
        group = list(group)
        if len(group) < 2:
            raise WsvizError(f"Group {group}: a group needs two or more layers.")
        for path in group:
            if path in seen:
                raise WsvizError(f"Group {group}: {path!r} is already in group {seen[path] + 1}.")
            seen[path] = g
        convs = [_conv(model, p, group, lenders) for p in group]
        shapes = {tuple(c.weight.shape) for c in convs}
        if len(shapes) > 1:
            raise WsvizError(f"Group {group}: the layers' weights differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                             "only same-shape convolutions can share one weight.")
        if len({c.groups for c in convs}) > 1 or len({c.bias is None for c in convs}) > 1:
            raise WsvizError(f"Group {group}: the layers differ in groups or bias, so one weight cannot serve them all.")
        out.append(convs)
    return out


@torch.no_grad()
def _input_covariances(model: nn.Module, convs: list[nn.Conv2d], images, batch_size: int = 64) -> list[torch.Tensor]:
    """C_m = X_m^T X_m for each conv (X_m: its unfolded inputs on ``images``), accumulated in float64.

    One pass over ``images`` serves every conv (hooks on all of them). ``images``: a tensor (run in
    chunks of ``batch_size``) or an iterable of batches (tensors, or (images, labels) pairs).
    """
    found: dict[int, torch.Tensor] = {}
    handles = [conv.register_forward_pre_hook(_input_covariance_hook(found, i)) for i, conv in enumerate(convs)]
    was = model.training
    model.eval()
    try:
        for batch in calibration_batches(images, batch_size):
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [found[i] for i in range(len(convs))]


def _input_covariance_hook(covs: dict, key, chunk: int = 8):
    """A forward pre-hook that adds its conv's X^T X (unfolded inputs) to ``covs[key]``: in float32 per
    chunk of ``chunk`` images (fast, bounded memory), accumulated in float64."""
    @torch.no_grad()
    def hook(mod, args):
        x = args[0].detach()
        for start in range(0, len(x), chunk):
            cols = F.unfold(x[start:start + chunk], mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).float().cpu()
            c = (cols.T @ cols).double()
            covs[key] = covs[key] + c if key in covs else c
    return hook


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


def _need_images(images) -> None:
    if not _has_images(images):
        raise WsvizError("init='lstsq' needs calibration images (a batch of inputs the model was trained on).")


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
            _need_images(images)
            if model is None:
                raise WsvizError("init='lstsq' needs the model, to run the calibration images through it.")
            covs = _input_covariances(model, convs, images)
        total = sum(covs)
        total += torch.eye(len(total), dtype=total.dtype) * (1e-6 * total.diagonal().mean().clamp_min(1e-12))
        rhs = sum(c @ w.flatten(1).double().T for c, w in zip(covs, ws))  # (d, out)
        w = torch.linalg.solve(total, rhs).T.reshape(ws.shape[1:]).to(ws.dtype)
        return w, None if bs is None else bs.mean(0)
    raise WsvizError(f"Unknown init {init!r}; choose one of {', '.join(INITS)}.")


def apply_ties(model: nn.Module, groups: Sequence[Sequence[str]]) -> nn.Module:
    """Make every group of ``model`` (in place) apply its first member's stored weight: the other
    members become :class:`SharedConv2d` use sites of it. No weight changes: this is the structure
    only, what :func:`tie` builds and what a tied checkpoint is rebuilt with before its weights are
    loaded. ``model.wsviz_tie["groups"]`` lists every group tied so far. Returns ``model``."""
    member_groups = check_groups(model, groups)
    for group, convs in zip(groups, member_groups):
        owner = convs[0]
        for path, conv in zip(list(group)[1:], convs[1:]):
            set_submodule(model, path, SharedConv2d(owner, stride=conv.stride[0], padding=conv.padding[0],
                                                    dilation=conv.dilation[0]))
    record = dict(getattr(model, "wsviz_tie", None) or {})
    record["groups"] = [list(g) for g in record.get("groups", [])] + [list(g) for g in groups]
    model.wsviz_tie = record
    return model


def tie(model: nn.Module, groups: Sequence[Sequence[str]], init: str = "lstsq", images=None, *,
        covariances: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` in which every group of same-shape convolutions applies one stored weight.

    ``groups``: lists of module paths. ``images``: calibration inputs, a tensor or an iterable of
    batches (needed by ``lstsq``; also what :func:`reestimate_batchnorm` should then be given). The
    original model is untouched. The copy records the ties in ``wsviz_tie`` (every tied group and
    the init), which a checkpoint card keeps so that loading it rebuilds the ties. ``covariances``:
    the members' input covariances by layer path, when already computed (then no images are needed).
    """
    if init not in INITS:
        raise WsvizError(f"Unknown init {init!r}; choose one of {', '.join(INITS)}.")
    member_groups = check_groups(model, groups)
    covs: list = [None] * len(member_groups)
    if init == "lstsq" and covariances is not None:
        covs = [[covariances[n] for n in g] for g in groups]
    elif init == "lstsq":
        _need_images(images)
        flat = _input_covariances(model, [c for convs in member_groups for c in convs], images)  # one pass, all groups
        it = iter(flat)
        covs = [[next(it) for _ in convs] for convs in member_groups]
    starts = [initial_weight(convs, init, model, images, cov) for convs, cov in zip(member_groups, covs)]
    tied = copy.deepcopy(model)
    for group, (w, b) in zip(groups, starts):
        owner = tied.get_submodule(group[0])
        with torch.no_grad():
            owner.weight.copy_(w)
            if b is not None:
                owner.bias.copy_(b)
    apply_ties(tied, groups)
    tied.wsviz_tie["init"] = init
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
    by class (batches of one class underestimate it: the shipped ShaResNet twin lost 2.6 points
    re-estimated on its class-sorted training split, none shuffled). An iterable's batches are
    taken as they come, so shuffle them (a DataLoader with ``shuffle=True``)."""
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
