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


def _conv(model: nn.Module, path: str, group: Sequence[str]) -> nn.Conv2d:
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        raise WsvizError(f"Group {list(group)}: the model has no layer {path!r}.") from None
    if isinstance(mod, SharedConv2d):
        raise WsvizError(f"Group {list(group)}: {path!r} already shares another layer's weight; tie the layer that "
                         "owns it instead.")
    if not isinstance(mod, nn.Conv2d):
        raise WsvizError(f"Group {list(group)}: {path!r} is a {type(mod).__name__}, not a convolution.")
    return mod


def check_groups(model: nn.Module, groups: Sequence[Sequence[str]]) -> list[list[nn.Conv2d]]:
    """The member convolutions of every group, or a one-line error naming the group and why."""
    if not groups:
        raise WsvizError("No groups to tie: give lists of two or more conv layer paths with the same weight shape.")
    seen: dict[str, int] = {}
    out = []
    for g, group in enumerate(groups):
        group = list(group)
        if len(group) < 2:
            raise WsvizError(f"Group {group}: a group needs two or more layers.")
        for path in group:
            if path in seen:
                raise WsvizError(f"Group {group}: {path!r} is already in group {seen[path] + 1}.")
            seen[path] = g
        convs = [_conv(model, p, group) for p in group]
        shapes = {tuple(c.weight.shape) for c in convs}
        if len(shapes) > 1:
            raise WsvizError(f"Group {group}: the layers' weights differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                             "only same-shape convolutions can share one weight.")
        if len({c.groups for c in convs}) > 1 or len({c.bias is None for c in convs}) > 1:
            raise WsvizError(f"Group {group}: the layers differ in groups or bias, so one weight cannot serve them all.")
        out.append(convs)
    return out


@torch.no_grad()
def _input_covariances(model: nn.Module, convs: list[nn.Conv2d], images: torch.Tensor,
                       batch_size: int = 64) -> list[torch.Tensor]:
    """C_m = X_m^T X_m for each conv (X_m: its unfolded inputs on ``images``), in float64."""
    d = convs[0].weight[0].numel()
    covs = [torch.zeros(d, d, dtype=torch.float64) for _ in convs]
    handles = []
    for i, conv in enumerate(convs):
        def hook(mod, args, i=i):
            x = args[0]
            cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, d, L)
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double().cpu()
            covs[i] += cols.T @ cols
        handles.append(conv.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return covs


def initial_weight(convs: list[nn.Conv2d], init: str, model: nn.Module | None = None,
                   images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) one group starts from; see the module docstring for the three inits."""
    ws = torch.stack([c.weight.detach() for c in convs])
    bs = None if convs[0].bias is None else torch.stack([c.bias.detach() for c in convs])
    if init == "mean":
        return ws.mean(0), None if bs is None else bs.mean(0)
    if init == "medoid":
        flat = ws.flatten(1)
        k = int(torch.cdist(flat, flat).sum(1).argmin())
        return ws[k].clone(), None if bs is None else bs[k].clone()
    if init == "lstsq":
        if model is None or images is None or len(images) == 0:
            raise WsvizError("init='lstsq' needs calibration images (a batch of inputs the model was trained on).")
        covs = _input_covariances(model, convs, images)
        total = sum(covs)
        total += torch.eye(len(total), dtype=total.dtype) * (1e-6 * total.diagonal().mean().clamp_min(1e-12))
        rhs = sum(c @ w.flatten(1).double().T for c, w in zip(covs, ws))  # (d, out)
        w = torch.linalg.solve(total, rhs).T.reshape(ws.shape[1:]).to(ws.dtype)
        return w, None if bs is None else bs.mean(0)
    raise WsvizError(f"Unknown init {init!r}; choose one of {', '.join(INITS)}.")


def tie(model: nn.Module, groups: Sequence[Sequence[str]], init: str = "lstsq",
        images: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` in which every group of same-shape convolutions applies one stored weight.

    ``groups``: lists of module paths. ``images``: calibration inputs (needed by ``lstsq``; also
    what :func:`reestimate_batchnorm` should then be given). The original model is untouched.
    """
    if init not in INITS:
        raise WsvizError(f"Unknown init {init!r}; choose one of {', '.join(INITS)}.")
    tied = copy.deepcopy(model)
    member_groups = check_groups(tied, groups)
    starts = [initial_weight(convs, init, model, images) for convs in check_groups(model, groups)]
    for group, convs, (w, b) in zip(groups, member_groups, starts):
        owner = convs[0]
        with torch.no_grad():
            owner.weight.copy_(w)
            if b is not None:
                owner.bias.copy_(b)
        for path, conv in zip(list(group)[1:], convs[1:]):
            set_submodule(tied, path, SharedConv2d(owner, stride=conv.stride[0], padding=conv.padding[0],
                                                   dilation=conv.dilation[0]))
    for attr in ("wsviz_name", "wsviz_config"):
        if hasattr(model, attr):
            setattr(tied, attr, copy.deepcopy(getattr(model, attr)))
    tied.wsviz_tied = [list(g) for g in groups]
    return tied


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``images`` (a cumulative average over the
    batches, as if the model had been trained with these weights); weights are not touched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        model.train(was)
    return model
