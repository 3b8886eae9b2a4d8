"""Tying keeps every member's geometry: a tied convolution computes what the member did with the same
kernel (stride, padding, dilation as pairs, 'same'/'valid' padding, every padding mode), and the
least-squares kernel is fitted on the inputs the member really multiplies its weight with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsviz.analysis.opportunities import candidate_groups, find_opportunities
from wsviz.models.sharing import SharedConv2d
from wsviz.models.tie import _input_covariances, apply_ties, tie

GEOMETRIES = [
    dict(padding=1),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular"),
    dict(padding=(2, 1), padding_mode="replicate"),
    dict(padding=(1, 0)),
    dict(padding=1, stride=(1, 2)),
    dict(padding=(1, 2), dilation=(1, 2)),
    dict(padding="same"),
    dict(padding="same", dilation=(2, 1), padding_mode="reflect"),
    dict(padding="valid"),
]


class Block(nn.Module):
    def __init__(self, **geometry):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, bias=False, **geometry)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Net(nn.Module):
    def __init__(self, *geometries):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(*(Block(**g) for g in geometries))
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for b in self.blocks[1:]:
                b.conv.weight.copy_(self.blocks[0].conv.weight)  # identical kernels: tying must change nothing

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


X = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_a_tied_layer_computes_what_the_member_did(geometry):
    net = Net(geometry, geometry).eval()
    assert candidate_groups(net) == [("blocks.0.conv", "blocks.1.conv")]
    for init in ("mean", "lstsq"):
        tied = tie(net, [["blocks.0.conv", "blocks.1.conv"]], init, images=X).eval()
        site = tied.get_submodule("blocks.1.conv")
        assert isinstance(site, SharedConv2d)
        with torch.no_grad():
            x = net.blocks[0](X)
            assert torch.allclose(site(x), net.blocks[1].conv(x), atol=1e-5), init
            assert torch.allclose(tied(X), net(X), atol=1e-5), init


def test_members_of_different_geometries_each_keep_their_own():
    a, b = dict(padding=1, padding_mode="reflect"), dict(padding=(1, 1), dilation=1, padding_mode="zeros")
    net = Net(a, b, dict(padding="same", padding_mode="circular")).eval()
    assert candidate_groups(net) == []  # not one geometry: not offered, but a user may tie them
    tied = tie(net, [["blocks.0.conv", "blocks.1.conv", "blocks.2.conv"]], "mean").eval()
    with torch.no_grad():
        assert torch.allclose(tied(X), net(X), atol=1e-6)
    rebuilt = apply_ties(Net(a, b, dict(padding="same", padding_mode="circular")),
                         [["blocks.0.conv", "blocks.1.conv", "blocks.2.conv"]])  # as a tied checkpoint is loaded
    rebuilt.load_state_dict(tied.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(X), tied(X))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_input_covariances_are_of_the_inputs_the_conv_multiplies(geometry):
    net = Net(geometry, geometry).eval()
    conv = net.blocks[1].conv
    (cov,) = _input_covariances(net, [conv], X)
    with torch.no_grad():
        out = conv(net.blocks[0](X)).double()
    w = conv.weight.detach().flatten(1).double()
    # sum over output channels of w_o C w_o^T is the squared norm of the (bias-free) outputs
    assert float(torch.einsum("od,de,oe->", w, cov, w)) == pytest.approx(float(out.pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("geometry", [dict(padding="same"), dict(padding=1, padding_mode="circular")], ids=str)
def test_identical_members_cost_nothing_to_tie(geometry):
    net = Net(geometry, geometry).eval()
    y = torch.arange(len(X)) % 3
    row = find_opportunities(net, X, y, held_out=(X, y)).rows[0]
    assert row.weight_similarity == pytest.approx(1.0)
    assert row.measured_kl < 1e-9 and row.measured_drop == 0


def test_a_shared_use_site_of_a_conv_is_that_conv():
    torch.manual_seed(0)
    for geometry in GEOMETRIES:
        conv = nn.Conv2d(4, 6, 3, **geometry)
        with torch.no_grad():
            assert torch.equal(SharedConv2d(conv)(X), conv(X)), geometry
