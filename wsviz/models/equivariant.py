"""Rotation-equivariant steerable CNNs from e2cnn — family ``equivariant``.

* ``steerable_rotmnist``: the RE-CNN of RepeatNet's Table 4 comparison (authors' code, after
  Weiler & Cesa): six R2Conv layers of regular fields ``round(k * (16, 24, 32, 32, 48, 64))``
  with ``k = 1, sqrt(2)/2, 1/2`` for C4 / C8 / C16, InnerBatchNorm + ELU, point-wise max
  pooling after layers 2 and 4, adaptive average pooling, group pooling, FC 64->64->10.
* ``e2cnn_c8_tutorial``: e2cnn's own C8 model from its tutorial (fields 24,48,48,96,96,64,
  antialiased average pooling, group pooling, FC 64->64->10) on 29x29 inputs.

Both are invariant to rotations of the input by multiples of 360/N degrees (up to the
interpolation-free 90-degree case: exact for N divisible by 4 on an odd-sized input, or
on an even-sized one where pooling and padding are symmetric).
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import torch
from torch import nn

from wsviz.models.registry import register_model
from wsviz.models.sharing import Tap

PAPER_RE = "Chavan et al. (RepeatNet) Table 4 / Weiler & Cesa — General E(2)-Equivariant Steerable CNNs"
PAPER_E2 = "Weiler & Cesa — General E(2)-Equivariant Steerable CNNs (e2cnn tutorial model)"
WIDTH_FACTOR = {4: 1.0, 8: 0.5 * math.sqrt(2), 16: 0.5}


class _Lazy(SimpleNamespace):
    """e2cnn takes ~1 s to import: load it when a steerable model is first built."""

    def __init__(self, module: str) -> None:
        super().__init__()
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name: str):
        return getattr(importlib.import_module(object.__getattribute__(self, "_module")), name)


gspaces = _Lazy("e2cnn.gspaces")
enn = _Lazy("e2cnn.nn")


def _conv_opts(first: bool) -> dict:
    # Basis settings of the authors' code: rings and cut-offs per kernel size.
    if first:
        return dict(sigma=[0.6, 0.6, 0.6, 0.4], rings=[0, 1, 2, 3],
                    frequencies_cutoff=lambda r: 0 if r == 0 else (3 if r == 2 else 2))
    return dict(sigma=[0.6, 0.6, 0.4], rings=[0, 1, 2], frequencies_cutoff=lambda r: 0 if r == 0 else 2)


class _SteerableCNN(nn.Module):
    """Shared tail of both models: six blocks (each with a ``level`` tap), optional spatial
    pooling, group pooling, an ``embedding`` tap and the FC 64 -> classes head."""

    def _finish(self, blocks: list[nn.Module], out_type, pool: nn.Module, num_classes: int, label: str) -> None:
        self.blocks = nn.ModuleList(blocks)
        self.taps = nn.ModuleList(Tap("level", f"{label}{i}") for i in range(1, len(blocks) + 1))
        self.pool = pool
        self.gpool = enn.GroupPooling(out_type)
        self.embedding = Tap("embedding", "penultimate features (group-pooled)")
        self.fully_net = nn.Sequential(nn.Linear(self.gpool.out_type.size, 64), nn.BatchNorm1d(64),
                                       nn.ELU(inplace=True), nn.Linear(64, num_classes))

    def prepare(self, g: enn.GeometricTensor) -> enn.GeometricTensor:
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.prepare(enn.GeometricTensor(x, self.input_type))
        for block, tap in zip(self.blocks, self.taps):
            g = block(g)
            tap(g.tensor)
        g = self.gpool(self.pool(g))
        return self.fully_net(self.embedding(g.tensor.reshape(g.tensor.shape[0], -1)))


class SteerableRotMNIST(_SteerableCNN):
    """C_N steerable CNN of RepeatNet's Rot-MNIST comparison."""

    def __init__(self, N: int, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if not 0 < width <= 4:
            raise ValueError(f"width must be in (0, 4], got {width!r}")
        k = WIDTH_FACTOR[N] * width
        self.r2_act = gspaces.Rot2dOnR2(N=N)
        in_type = enn.FieldType(self.r2_act, in_channels * [self.r2_act.trivial_repr])
        self.input_type = in_type
        blocks: list[nn.Module] = []
        fields = (16, 24, 32, 32, 48, 64)
        for i, f in enumerate(fields, start=1):
            out_type = enn.FieldType(self.r2_act, max(1, round(k * f)) * [self.r2_act.regular_repr])
            ks, pad = (7, 1) if i == 1 else (5, 0 if i == 6 else 2)
            mods = [enn.R2Conv(in_type, out_type, kernel_size=ks, padding=pad, bias=False, **_conv_opts(i == 1)),
                    enn.InnerBatchNorm(out_type), enn.ELU(out_type, inplace=True)]
            if i in (2, 4):
                mods.append(enn.PointwiseMaxPool(out_type, kernel_size=2, stride=2))
            blocks.append(enn.SequentialModule(*mods))
            in_type = out_type
        self._finish(blocks, in_type, enn.PointwiseAdaptiveAvgPool(in_type, 1), num_classes, "conv")


@register_model(
    "steerable_rotmnist", family="equivariant", paper=PAPER_RE,
    description="e2cnn C_N steerable CNN (regular fields) of RepeatNet's Rot-MNIST comparison; N=4, 8 or 16.",
    num_classes=10, in_channels=1, input_size=28, choices={"N": (4, 8, 16)}, N=8, width=1.0,
)
def steerable_rotmnist(N: int, width: float, num_classes: int, in_channels: int) -> nn.Module:
    return SteerableRotMNIST(N, num_classes, in_channels, width)


class C8Tutorial(_SteerableCNN):
    """e2cnn's tutorial C8 steerable CNN (examples/model.ipynb)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, N: int = 8) -> None:
        super().__init__()
        self.r2_act = gspaces.Rot2dOnR2(N=N)
        in_type = enn.FieldType(self.r2_act, in_channels * [self.r2_act.trivial_repr])
        self.input_type = in_type
        self.mask = enn.MaskModule(in_type, 29, margin=1)
        # e2cnn stores the fixed disc mask as a non-trainable Parameter; it is no weight.
        fixed = self.mask.mask.detach().clone()
        del self.mask.mask
        self.mask.register_buffer("mask", fixed)
        blocks: list[nn.Module] = []
        fields = (24, 48, 48, 96, 96, 64)
        for i, f in enumerate(fields, start=1):
            out_type = enn.FieldType(self.r2_act, f * [self.r2_act.regular_repr])
            ks, pad = (7, 1) if i == 1 else (5, 1 if i == 6 else 2)
            mods = [enn.R2Conv(in_type, out_type, kernel_size=ks, padding=pad, bias=False),
                    enn.InnerBatchNorm(out_type), enn.ReLU(out_type, inplace=True)]
            if i in (2, 4):
                mods.append(enn.PointwiseAvgPoolAntialiased(out_type, sigma=0.66, stride=2))
            if i == 6:
                mods.append(enn.PointwiseAvgPoolAntialiased(out_type, sigma=0.66, stride=1, padding=0))
            blocks.append(enn.SequentialModule(*mods))
            in_type = out_type
        self._finish(blocks, in_type, nn.Identity(), num_classes, "block")

    def prepare(self, g: enn.GeometricTensor) -> enn.GeometricTensor:
        return self.mask(g)


@register_model(
    "e2cnn_c8_tutorial", family="equivariant", paper=PAPER_E2,
    description="e2cnn's tutorial C8 steerable CNN on 29x29 inputs (2,067,434 params).",
    num_classes=10, in_channels=1, input_size=29,
)
def e2cnn_c8_tutorial(num_classes: int, in_channels: int) -> nn.Module:
    return C8Tutorial(num_classes, in_channels)
