"""Accounting on hand-built models whose counts are known by construction.

The numbers the app prints (unique and effective parameters, compression, FLOPs, the sharing
map's kinds of reuse) come from wsviz/models/accounting.py. Here each is computed by hand for
a small model where every use is known, and compared field by field.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsviz.models import create_model
from wsviz.models.accounting import (
    ModelSummary,
    ParamUse,
    applied_weights,
    count_flops,
    count_unique,
    reuse_report,
    sharing_report,
    summarize,
)
from wsviz.models.sharing import HardSignSTE, SharedConv2d

SHAPE = (2, 6, 6)


class Toy(nn.Module):
    """One conv applied twice (the second time through a use site at dilation 2), BatchNorm, a
    linear head, a parameter no layer op uses and one used only by an elementwise product."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)  # 36 + 2
        self.again = SharedConv2d(self.conv, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(2)  # 2 + 2
        self.fc = nn.Linear(2 * 6 * 6, 3)  # 216 + 3
        self.unused = nn.Parameter(torch.ones(5))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        y = self.bn(self.again(self.conv(x))) * self.scale
        return self.fc(y.flatten(1))


def _use(param, site, op, shape, applied, detail="", kind="direct", derived=False):
    return ParamUse(param, site, op, shape, derived, detail, kind, applied)


TOY_USES = [
    _use("conv.weight", "conv", "conv2d", (2, 2, 3, 3), 36, "stride=1 padding=1 dilation=1"),
    _use("conv.bias", "conv", "conv2d", (2,), 2, "stride=1 padding=1 dilation=1"),
    _use("conv.weight", "again", "conv2d", (2, 2, 3, 3), 36, "stride=1 padding=2 dilation=2"),
    _use("conv.bias", "again", "conv2d", (2,), 2, "stride=1 padding=2 dilation=2"),
    _use("bn.weight", "bn", "batch_norm", (2,), 2),
    _use("bn.bias", "bn", "batch_norm", (2,), 2),
    _use("fc.weight", "fc", "linear", (3, 72), 216),
    _use("fc.bias", "fc", "linear", (3,), 3),
]


def test_sharing_report_of_a_model_whose_uses_are_known():
    torch.manual_seed(0)
    uses, effective, unused = sharing_report(Toy(), SHAPE)
    assert uses == TOY_USES
    assert unused == ["unused", "scale"]
    # applied weights, each use at its size, plus the parameters no layer op used (once)
    assert effective == 36 + 2 + 36 + 2 + 2 + 2 + 216 + 3 + 5 + 1


def test_summary_of_a_model_whose_counts_are_known():
    torch.manual_seed(0)
    model = Toy()
    s = summarize(model, SHAPE)
    assert s.unique_params == count_unique(model) == 36 + 2 + 2 + 2 + 216 + 3 + 5 + 1
    assert s.effective_params == 305
    assert s.compression == pytest.approx(305 / 267)
    assert s.input_shape == SHAPE
    assert s.uses == TOY_USES and s.unused_params == ["unused", "scale"] and s.mask_params == 0
    assert s.param_shapes == {"unused": (5,), "scale": (1,), "conv.weight": (2, 2, 3, 3), "conv.bias": (2,),
                              "bn.weight": (2,), "bn.bias": (2,), "fc.weight": (3, 72), "fc.bias": (3,)}
    # two 3x3 convs 2->2 on 6x6 (72 outputs x 18 multiply-adds each) and a 72->3 linear; 2 FLOPs per MAC
    assert s.flops == count_flops(model, SHAPE) == 2 * (2 * 72 * 18 + 72 * 3)
    assert s.macs == 2 * 72 * 18 + 72 * 3
    by = s.uses_by_param()
    assert list(by) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"]
    assert [u.site for u in by["conv.weight"]] == ["conv", "again"]
    reuse = s.reuse()
    assert list(reuse) == list(by)
    assert reuse["conv.weight"].param == "conv.weight" and reuse["conv.weight"].shape == (2, 2, 3, 3)
    assert reuse["conv.weight"].applied == 72
    assert reuse["conv.weight"].uses == tuple(by["conv.weight"])
    assert set(s.shared_params()) == {"conv.weight", "conv.bias"}
    assert s.shared_params()["conv.weight"] == by["conv.weight"]
    assert reuse_report(model, SHAPE) == reuse


def test_model_summary_properties():
    s = ModelSummary(unique_params=0, effective_params=0, flops=7, input_shape=(1, 2, 2))
    assert s.compression == 0 and s.macs == 3
    assert s.uses == [] and s.unused_params == [] and s.param_shapes == {} and s.mask_params == 0
    assert ModelSummary(4, 10, 0, (1, 2, 2)).compression == 2.5


class Derived(nn.Module):
    """Weights computed from parameters: tiled, basis-expanded, transformed, sign-masked."""

    def __init__(self) -> None:
        super().__init__()
        self.parent = nn.Parameter(torch.randn(2, 2, 3, 3))  # 36, tiled x2 -> (4, 2, 3, 3)
        self.scale = nn.Parameter(torch.tensor([0.5]))  # scales the tiles: a modulator (a later name, a smaller size)
        self.coeff = nn.Parameter(torch.randn(3))  # basis coefficients -> 72 filter taps
        self.register_buffer("basis", torch.randn(72, 3))
        self.small = nn.Parameter(torch.randn(4, 4, 1, 1))  # a same-size transform of itself
        self.sign_latent = nn.Parameter(torch.randn(4, 4, 3, 3))  # larger than its carrier
        self.tile_a = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.tile_b = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = F.conv2d(x, self.scale * self.parent.repeat(2, 1, 1, 1), padding=1)  # (4, 2, 3, 3)
        y = F.conv2d(y, (self.basis @ self.coeff).view(2, 4, 3, 3), padding=1)  # (2, 4, 3, 3)
        y = F.conv2d(y.repeat(1, 2, 1, 1), self.small.flip(0), None)  # derived, same size
        masked = HardSignSTE.apply(self.sign_latent) * self.parent.repeat(2, 2, 1, 1)
        y = F.conv2d(y, masked, padding=1)
        return F.conv2d(y, (self.tile_a * self.tile_b).repeat(2, 1, 1, 1))


def test_derived_weights_are_credited_to_their_carrier():
    torch.manual_seed(0)
    model = Derived()
    uses, effective, unused = sharing_report(model, SHAPE)
    pad1, pad0 = "stride=1 padding=1 dilation=1", "stride=1 padding=0 dilation=1"
    assert uses == [  # the sources of one applied weight in name order; the largest carries it
        _use("parent", "", "conv2d", (4, 2, 3, 3), 72, pad1, "tiled", True),
        _use("scale", "", "conv2d", (4, 2, 3, 3), 0, pad1, "modulates", True),
        _use("coeff", "", "conv2d", (2, 4, 3, 3), 72, pad1, "expanded", True),  # a matrix product: a basis
        _use("small", "", "conv2d", (4, 4, 1, 1), 16, pad0, "derived", True),
        _use("parent", "", "conv2d", (4, 4, 3, 3), 144, pad1, "tiled", True),
        _use("sign_latent", "", "conv2d", (4, 4, 3, 3), 0, pad1, "modulates", True),  # larger, but a mask
        _use("tile_a", "", "conv2d", (2, 4, 1, 1), 0, pad0, "modulates", True),  # equal sizes: the later name
        _use("tile_b", "", "conv2d", (2, 4, 1, 1), 8, pad0, "tiled", True),
    ]
    assert unused == [] and effective == 72 + 72 + 16 + 144 + 8
    s = summarize(model, SHAPE)
    assert s.mask_params == 4 * 4 * 3 * 3
    assert s.reuse()["parent"].kinds == ["tiled"] and s.reuse()["parent"].applied == 216


class Calls(nn.Module):
    """Convolutions called with positional and keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, 2, 3, 3))
        self.b = nn.Parameter(torch.randn(2, 2, 1, 1))
        self.c = nn.Parameter(torch.randn(2, 2, 3, 3))
        self.d = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x):
        x = F.conv2d(x, self.a, None, (2, 1), (1, 2))  # positional, non-square stride/padding
        x = F.conv2d(x, self.b)  # everything left at torch's defaults
        x = F.conv2d(x, weight=self.c, stride=1, dilation=2, padding=2)  # keywords
        return F.conv2d(x, self.d, None, 1, 1, (1, 3))


class Buffers(nn.Module):
    """Convolutions whose weights are no parameter of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.randn(2, 2, 3, 3))
        self.w = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x):
        free = torch.randn(2, 2, 3, 3, requires_grad=True)  # a leaf, but not the model's
        return F.conv2d(F.conv2d(F.conv2d(x, self.fixed), free * 2), self.w)


def test_conv_detail_from_positional_and_keyword_arguments():
    uses, _, _ = sharing_report(Calls(), (2, 12, 12))
    assert [(u.param, u.detail) for u in uses] == [
        ("a", "stride=2x1 padding=1x2 dilation=1"),
        ("b", "stride=1 padding=0 dilation=1"),
        ("c", "stride=1 padding=2 dilation=2"),
        ("d", "stride=1 padding=1 dilation=1x3"),
    ]


def test_tensors_that_are_not_parameters_are_not_counted():
    uses, effective, unused = sharing_report(Buffers(), (2, 9, 9))
    assert [(u.param, u.applied) for u in uses] == [("w", 36)] and effective == 36 and unused == []
    assert sharing_report(nn.ReLU(), (2, 3, 3)) == ([], 0, [])


def test_tracing_leaves_the_model_as_it_was_even_when_the_forward_fails():
    torch.manual_seed(0)
    model = Toy().eval()
    model.fc.weight.requires_grad_(False)
    stats = {k: v.clone() for k, v in model.named_buffers()}
    summarize(model, SHAPE)
    assert not model.training and not model.bn.training
    assert not model.fc.weight.requires_grad and model.conv.weight.requires_grad
    for k, v in model.named_buffers():
        assert torch.equal(v, stats[k]), f"{k} changed"

    class Broken(Toy):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("broken")

    broken = Broken().eval()
    broken.fc.weight.requires_grad_(False)
    stats = {k: v.clone() for k, v in broken.named_buffers()}
    with pytest.raises(RuntimeError, match="broken"):
        sharing_report(broken, SHAPE)
    assert not broken.fc.weight.requires_grad and not broken.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in broken.modules())
    for k, v in broken.named_buffers():
        assert torch.equal(v, stats[k]), f"{k} changed"


def test_tracing_runs_in_training_mode_on_two_images():
    seen = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 2, 1, 1))

        def forward(self, x):
            seen.append((self.training, tuple(x.shape), torch.is_grad_enabled()))
            return F.conv2d(x, self.w)

    with torch.no_grad():
        sharing_report(Spy().eval(), (2, 4, 5))
    assert seen == [(True, (2, 2, 4, 5), True)]


def test_applied_weights_at_one_site():
    torch.manual_seed(0)
    toy = Toy()
    got = applied_weights(toy, "again", SHAPE)
    assert len(got) == 1 and got[0][1] == "conv.weight"
    torch.testing.assert_close(got[0][0], toy.conv.weight.detach(), rtol=0, atol=0)
    msws = create_model("msws_resnet_digits", sharing="shared", n_rates=3, base_width=24)
    site = next(n for n, m in msws.named_modules() if type(m).__name__ == "MultiRateConv2d")
    weights = applied_weights(msws, site)  # the registered input shape
    param = f"{site}.weight"
    assert [c for _, c in weights] == [param] * 3
    assert all(torch.equal(w, msws.get_parameter(param).detach()) for w, _ in weights)
    derived = applied_weights(Derived(), "", SHAPE)  # the model's own convs: realised weights
    assert [(tuple(w.shape), c) for w, c in derived] == [((4, 2, 3, 3), "parent"), ((2, 4, 3, 3), "coeff"),
                                                         ((4, 4, 1, 1), "small"), ((4, 4, 3, 3), "parent"),
                                                         ((2, 4, 1, 1), "tile_b")]
    assert applied_weights(toy, "fc", SHAPE) == []  # a linear layer is no convolution
    calls = Calls()  # four convs at one site, one weight passed by keyword: each with its own carrier
    assert [c for _, c in applied_weights(calls, "", (2, 12, 12))] == ["a", "b", "c", "d"]
    assert torch.equal(applied_weights(calls, "", (2, 12, 12))[2][0], calls.c.detach())
    buffers = applied_weights(Buffers(), "", (2, 9, 9))  # a buffer, a tensor of no parameter: no carrier
    assert [c for _, c in buffers] == ["", "", "w"]


def test_shape_defaults_to_the_registered_input():
    model = create_model("resnet_digits", base_width=8, depth=8)
    s = summarize(model)
    assert s.input_shape == (1, 28, 28)
    assert count_flops(model) == count_flops(model, (1, 28, 28)) < count_flops(model, (1, 56, 56))
    assert sharing_report(model)[1] == s.effective_params


def test_norm_layers_whose_weight_follows_a_shape_argument_are_counted():
    """layer_norm and group_norm take a shape / group count before their weight: the weight still counts."""
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4 * 36))
    uses, effective, unused = sharing_report(model, SHAPE)
    assert [(u.param, u.op, u.applied) for u in uses] == [
        ("0.weight", "conv2d", 8), ("1.weight", "group_norm", 4), ("1.bias", "group_norm", 4),
        ("3.weight", "layer_norm", 144), ("3.bias", "layer_norm", 144)]
    assert effective == 8 + 8 + 288 and unused == []


def test_a_derived_weight_applied_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(1, 2, 3, 3))

        def forward(self, x):
            w = self.p.repeat(2, 1, 1, 1)  # one computed tensor, applied at two convolutions
            return F.conv2d(F.conv2d(x, w, padding=1), w, padding=1)

    uses, effective, _ = sharing_report(Twice(), SHAPE)
    assert [(u.param, u.kind, u.applied) for u in uses] == [("p", "tiled", 36), ("p", "tiled", 36)]
    assert effective == 72


def test_a_submodule_failure_caught_by_its_parent_does_not_shift_the_sites():
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("no")

    class Catches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fails = Fails()
            self.w = nn.Parameter(torch.randn(2, 2, 1, 1))

        def forward(self, x):
            try:
                self.fails(x)
            except RuntimeError:
                pass
            return F.conv2d(x, self.w)  # applied by the model itself, site ""

    uses, _, _ = sharing_report(Catches(), SHAPE)
    assert [(u.param, u.site) for u in uses] == [("w", "")]


def test_a_model_on_another_device_is_traced_there():
    """The random input is made on the model's device (meta here: no memory, no GPU needed)."""
    torch.manual_seed(0)
    cpu = Toy()
    meta = Toy().to("meta")
    uses, effective, unused = sharing_report(meta, SHAPE)
    assert (uses, effective, unused) == sharing_report(cpu, SHAPE)
    assert count_flops(meta, SHAPE) == count_flops(cpu, SHAPE)
