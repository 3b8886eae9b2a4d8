"""The sharing layers one by one, against references written out by hand.

Every family is built from these four layers (wsviz/models/sharing.py); a bug in one of them
would change what every shared model computes while the parameter counts still look right.
Each test compares a layer with a direct computation (plain ``F.conv2d`` calls, a loop over
output/input channels for RepeatNet's tiling) or with ``nn.Conv2d`` itself.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsviz.models.sharing import (
    TAP_KINDS,
    HardSignSTE,
    MultiRateConv2d,
    RepeatConv2d,
    SharedConv2d,
    Tap,
    tied_copy,
)


# --------------------------------------------------------------------------------- Tap
def test_tap_keeps_its_kind_and_label_and_refuses_unknown_kinds():
    tap = Tap("rate", "rate 2")
    assert (tap.kind, tap.label) == ("rate", "rate 2")
    x = torch.randn(2, 3)
    assert tap(x) is x
    with pytest.raises(ValueError) as err:
        Tap("scale", "s")
    assert str(err.value) == f"unknown tap kind 'scale'; expected one of {TAP_KINDS}"


# ------------------------------------------------------------------------ SharedConv2d
def test_shared_conv_applies_the_source_with_its_own_geometry():
    """A use site computes exactly ``F.conv2d`` with the source's weight, bias and groups, at the
    source's stride/padding/dilation unless the use site sets its own."""
    torch.manual_seed(0)
    src = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    x = torch.randn(2, 4, 11, 11)
    same = SharedConv2d(src)
    assert (same.in_channels, same.out_channels, same.kernel_size) == (4, 6, (3, 3))
    assert (same.stride, same.padding, same.dilation) == ((2, 2), (1, 1), (1, 1))
    torch.testing.assert_close(same(x), src(x), rtol=0, atol=0)
    other = SharedConv2d(src, stride=1, padding=2, dilation=2)
    assert (other.stride, other.padding, other.dilation) == ((1, 1), (2, 2), (2, 2))
    expected = F.conv2d(x, src.weight, src.bias, 1, 2, 2, 2)
    torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    assert other.weight is src.weight and other.bias is src.bias
    assert list(other.parameters()) == []  # the weight is the source's, registered there only


def test_shared_conv_refuses_anything_but_a_conv2d():
    with pytest.raises(TypeError) as err:
        SharedConv2d(nn.Linear(3, 3))
    assert str(err.value) == "SharedConv2d shares an nn.Conv2d, got Linear"


def test_tied_copy_shares_the_chosen_convolutions_and_reinitialises_the_untied_twin():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    tied = tied_copy(net)  # the default: every conv tied
    assert [type(m).__name__ for m in tied] == ["SharedConv2d", "BatchNorm2d", "SharedConv2d"]
    assert tied[0].weight is net[0].weight and tied[2].weight is net[2].weight
    by_name = tied_copy(net, lambda name, m: name == "2")  # the choice may use the module's name
    assert isinstance(by_name[0], nn.Conv2d) and isinstance(by_name[2], SharedConv2d)
    assert by_name[0].weight is not net[0].weight
    twin = tied_copy(net, tied=False)
    for a, b in ((twin[0], net[0]), (twin[2], net[2])):
        assert isinstance(a, nn.Conv2d) and a.weight is not b.weight
        assert not torch.equal(a.weight, b.weight), "the unshared twin must start from a fresh init"
        assert not torch.equal(a.bias, b.bias)


# --------------------------------------------------------------------- MultiRateConv2d
def _multirate_reference(m: MultiRateConv2d, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for i, r in enumerate(m.rates):
        w = m.weight if m.shared else m.weights[i]
        b = m.bias if m.shared else (m.biases[i] if m.biases is not None else None)
        pad = m.padding + (r - 1) * (m.kernel_size - 1) // 2
        outs.append(F.conv2d(x, w, b, m.stride, pad, r))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_multirate_conv_is_one_dilated_conv_per_rate(shared, bias):
    torch.manual_seed(0)
    m = MultiRateConv2d(3, 6, 3, stride=2, padding=1, rates=(1, 2, 3), shared=shared, bias=bias)
    if bias:  # make every bias visibly non-zero
        for b in m._bias_list():
            with torch.no_grad():
                b.normal_()
    x = torch.randn(2, 3, 13, 13)
    out = m(x)
    assert out.shape == (2, 6, 7, 7)
    torch.testing.assert_close(out, _multirate_reference(m, x), rtol=1e-5, atol=1e-6)
    assert [t.label for t in m.taps] == ["rate 1 (conv, pre-BN)", "rate 2 (conv, pre-BN)", "rate 3 (conv, pre-BN)"]
    assert all(t.kind == "rate" for t in m.taps)


def test_multirate_conv_with_one_rate_is_a_plain_conv():
    torch.manual_seed(0)
    m = MultiRateConv2d(3, 4, 3, padding=1, rates=(1,), bias=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 1, 1, 1), rtol=0, atol=0)


def test_multirate_conv_defaults():
    m = MultiRateConv2d(3, 4, 3)
    assert (m.stride, m.padding, m.rates, m.shared, m.rate_grad) == (1, 0, (1, 2), True, "mean")
    assert m.bias is None and m(torch.randn(1, 3, 7, 7)).shape == (1, 4, 5, 5)


def test_multirate_conv_initialises_like_nn_conv2d():
    """'Same init as nn.Conv2d': with one rate the draws are those of nn.Conv2d, bit for bit; with
    several unshared rates every kernel set and every bias is drawn (none left at zero), within
    nn.Conv2d's bound 1 / sqrt(fan_in)."""
    torch.manual_seed(3)
    m = MultiRateConv2d(5, 8, 3, rates=(1,), bias=True)
    torch.manual_seed(3)
    ref = nn.Conv2d(5, 8, 3, bias=True)
    torch.testing.assert_close(m.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(m.bias, ref.bias, rtol=0, atol=0)
    u = MultiRateConv2d(5, 300, 3, rates=(1, 2, 3), shared=False, bias=True)
    bound = 1 / math.sqrt(5 * 9)
    for w, b in zip(u.weights, u.biases):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert b.abs().max() <= bound and b.abs().max() > 0.9 * bound
        assert b.min() < 0 < b.max()


def test_multirate_shared_bias_gradient_is_the_mean_over_rates():
    """Aich et al.'s mean over rates holds for the shared bias as for the kernels."""
    torch.manual_seed(0)
    shared = MultiRateConv2d(3, 6, 3, padding=1, rates=(1, 2, 3), shared=True, bias=True)
    unshared = MultiRateConv2d(3, 6, 3, padding=1, rates=(1, 2, 3), shared=False, bias=True)
    with torch.no_grad():
        shared.bias.normal_()
        for w, b in zip(unshared.weights, unshared.biases):
            w.copy_(shared.weight)
            b.copy_(shared.bias)
    x, target = torch.randn(2, 3, 7, 7), torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(shared(x), unshared(x))
    ((shared(x) - target) ** 2).sum().backward()
    ((unshared(x) - target) ** 2).sum().backward()
    torch.testing.assert_close(shared.bias.grad, sum(b.grad for b in unshared.biases) / 3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared.weight.grad, sum(w.grad for w in unshared.weights) / 3, rtol=1e-4, atol=1e-5)


def test_multirate_conv_messages():
    cases = [
        (dict(rate_grad="max"), "rate_grad must be one of ('mean', 'sum'), got 'max'"),
        (dict(rates=()), "rates must be positive integers, got ()"),
        (dict(rates=(1, 0)), "rates must be positive integers, got (1, 0)"),
        (dict(rates=(0, 1)), "rates must be positive integers, got (0, 1)"),
        (dict(rates=(1, 2, 3)), "4 output channels cannot be split over 3 rates"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            MultiRateConv2d(3, 4, 3, **kwargs)
        assert str(err.value) == message


# ----------------------------------------------------------------------- RepeatConv2d
def _swish(x, a, b):
    return a * x / (1 + torch.exp(b * x))


def _repeat_reference(m: RepeatConv2d) -> torch.Tensor:
    """The realised block, one (output, input) channel pair at a time: tile (o // po, i // pi)
    holds F_p[o % po, i % pi] through that tile's transform; leftover rows repeat the first rows
    (through the row strip's own transform), leftover columns the first columns (likewise)."""
    w = m.parent().detach()
    po, pi = w.shape[:2]
    out, inp = m.out_channels, m.in_channels
    r0, r1 = out // po, inp // pi
    swish = m.mode == "swish" and m.repeats
    strip_col = 1 if out % po else 0  # the column strip's pair comes after the row strip's
    realised = torch.zeros(out, inp, *w.shape[2:])
    for o in range(out):
        for i in range(inp):
            if i >= r1 * pi:  # leftover column: a copy of column i - r1*pi (already realised)
                v = realised[o, i - r1 * pi]
                if swish:
                    v = _swish(v, m.edge_alphas[strip_col].detach(), m.edge_betas[strip_col].detach())
            else:
                row = o if o < r0 * po else o - r0 * po
                t = (row // po) * r1 + i // pi
                v = w[row % po, i % pi]
                if swish:
                    v = _swish(v, m.alphas[0, t].detach(), m.betas[0, t].detach())
                if o >= r0 * po and swish:
                    v = _swish(v, m.edge_alphas[0].detach(), m.edge_betas[0].detach())
            realised[o, i] = v
    if m.mode == "bireal" and m.repeats:
        realised = realised * torch.where(m.sign_latent.detach() >= 0, 1.0, -1.0)
    return realised


@pytest.mark.parametrize("mode", ["linear", "swish", "bireal"])
@pytest.mark.parametrize("out,inp,po,pi", [(7, 5, 3, 2), (6, 4, 3, 2), (7, 4, 3, 2), (6, 5, 3, 2), (3, 2, 3, 2)])
def test_repeat_conv_realises_the_tiled_block(mode, out, inp, po, pi):
    torch.manual_seed(0)
    m = RepeatConv2d(inp, out, 3, parent_in=pi, parent_out=po, mode=mode, stride=2, padding=1)
    with torch.no_grad():  # transforms and signs away from their init, so every one matters
        for name, p in m.named_parameters():
            if name != "weight":
                p.normal_()
    realised = m.realised_weight()
    assert realised.shape == (out, inp, 3, 3)
    torch.testing.assert_close(realised, _repeat_reference(m), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, inp, 9, 9)
    torch.testing.assert_close(m(x), F.conv2d(x, realised, m.bias, 2, 1), rtol=1e-5, atol=1e-6)


def test_repeat_conv_parameters_per_mode():
    """Which parameters each mode trains: transforms only where the block repeats, an edge pair
    per leftover strip, a sign latent the size of the realised block."""
    def names(**kw):
        return {n: tuple(p.shape) for n, p in RepeatConv2d(5, 7, 3, parent_in=2, parent_out=3, **kw).named_parameters()}

    assert names(mode="linear") == {"weight": (3, 2, 3, 3), "bias": (7,)}
    assert names(mode="linear", bias=False) == {"weight": (3, 2, 3, 3)}
    assert names(mode="swish") == {"weight": (3, 2, 3, 3), "bias": (7,), "alphas": (1, 4), "betas": (1, 4),
                                   "edge_alphas": (2,), "edge_betas": (2,)}
    assert names(mode="bireal") == {"weight": (3, 2, 3, 3), "bias": (7,), "sign_latent": (7, 5, 3, 3)}
    for out, inp, edges in ((7, 4, 1), (6, 5, 1)):  # one leftover strip: rows only, columns only
        m = RepeatConv2d(inp, out, 3, parent_in=2, parent_out=3, mode="swish")
        assert m.edge_alphas.shape == m.edge_betas.shape == (edges,)
    exact = RepeatConv2d(4, 6, 3, parent_in=2, parent_out=3, mode="swish")
    assert exact.edge_alphas is None and exact.edge_betas is None
    plain = RepeatConv2d(4, 6, 3, mode="swish")  # nothing repeats: no transform to learn
    assert {n for n, _ in plain.named_parameters()} == {"weight", "bias"}
    assert {n for n, _ in RepeatConv2d(4, 6, 3, mode="linear").named_parameters()} == {"weight", "bias"}


def test_repeat_conv_initial_values():
    """Bias starts at zero, edge pairs in [0, 1), sign latents small and positive (so f-RepeatNet
    starts as the linear tiling)."""
    torch.manual_seed(0)
    m = RepeatConv2d(5, 7, 3, parent_in=2, parent_out=3, mode="swish")
    assert torch.equal(m.bias, torch.zeros(7))
    assert 0 <= m.edge_alphas.min() and m.edge_alphas.max() < 1 and 0 <= m.edge_betas.min() and m.edge_betas.max() < 1
    b = RepeatConv2d(5, 7, 3, parent_in=2, parent_out=3, mode="bireal")
    assert 0 <= b.sign_latent.min() and b.sign_latent.max() < 1e-3
    linear = RepeatConv2d(5, 7, 3, parent_in=2, parent_out=3, mode="linear")
    with torch.no_grad():
        linear.weight.copy_(b.weight)
    torch.testing.assert_close(b.realised_weight(), linear.realised_weight(), rtol=0, atol=0)


def test_repeat_conv_defaults_and_shared_parent():
    d = RepeatConv2d(4, 6, 3)
    assert (d.mode, d.stride, d.padding, d.parent_shape, d.repeats) == ("linear", 1, 0, (6, 4), False)
    assert d.bias is not None and d(torch.randn(1, 4, 7, 7)).shape == (1, 6, 5, 5)
    wide = RepeatConv2d(4, 6, 3, parent_out=3)  # only the output side repeats
    assert wide.parent_shape == (3, 4)
    tall = RepeatConv2d(4, 6, 3, parent_in=2)  # only the input side repeats
    assert tall.parent_shape == (6, 2)
    torch.manual_seed(0)
    parent = RepeatConv2d(4, 6, 3, parent_in=2, parent_out=3)
    child = RepeatConv2d(4, 6, 3, source=parent, padding=1)  # depth scaling: another layer's parent
    assert {n for n, _ in child.named_parameters()} == {"bias"}
    assert child.parent() is parent.weight and child.parent_shape == (3, 2)
    torch.testing.assert_close(child.realised_weight(), parent.realised_weight(), rtol=0, atol=0)


def test_repeat_conv_messages():
    cases = [
        (dict(mode="tile"), f"unknown repeat mode 'tile'; expected one of {('none', 'linear', 'swish', 'bireal')}"),
        (dict(parent_out=8), "parent block 8x4 is larger than the target 6x4"),
        (dict(parent_in=5), "parent block 6x5 is larger than the target 6x4"),
        (dict(parent_in=2, mode="none"), "mode='none' needs the parent and target shapes to be equal"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            RepeatConv2d(4, 6, 3, **kwargs)
    assert RepeatConv2d(4, 6, 3, mode="none").realised_weight().shape == (6, 4, 3, 3)


def test_repeat_conv_describes_itself():
    parent = RepeatConv2d(4, 6, 3, parent_in=2, parent_out=3, mode="swish", stride=2, padding=1)
    assert parent.extra_repr() == "4, 6, kernel_size=3, parent=3x2, mode='swish', stride=2, padding=1"
    child = RepeatConv2d(4, 6, 3, source=parent)
    assert child.extra_repr() == "4, 6, kernel_size=3, parent=3x2, parent shared, mode='linear', stride=1, padding=0"


def test_hard_sign_is_sign_forward_with_a_clipped_straight_through_gradient():
    latent = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    out = HardSignSTE.apply(latent)
    assert out.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    grad = torch.arange(1.0, 8.0)
    out.backward(grad)
    assert latent.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]
    assert latent.grad.dtype == torch.float32
