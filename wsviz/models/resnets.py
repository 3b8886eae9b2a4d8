"""ResNet skeletons shared by every family (torchvision ``resnet.py`` style).

A family changes *which convolution sits where* by passing a ``conv`` factory that gets
a :class:`ConvSite` (stage, block, role, shape) and returns a module: a plain
``nn.Conv2d``, a :class:`~wsviz.models.sharing.MultiRateConv2d`, a
:class:`~wsviz.models.sharing.SharedConv2d` use site, a
:class:`~wsviz.models.sharing.RepeatConv2d`... The skeletons themselves never change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from wsviz.models.sharing import MultiRateConv2d, Tap


@dataclass(frozen=True)
class ConvSite:
    """Where a convolution sits: stage (1-based; 0 = stem), block (0-based), role and shape."""

    stage: int
    block: int
    role: str  # "stem", "conv1", "conv2", "conv3", "shortcut"
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    bias: bool = False


ConvFactory = Callable[[ConvSite], nn.Module]


def plain_conv(site: ConvSite) -> nn.Module:
    return nn.Conv2d(site.in_channels, site.out_channels, site.kernel_size, site.stride,
                     site.padding, bias=site.bias)


def strided_by_pooling(conv: ConvFactory) -> ConvFactory:
    """WSMS-ResNet downsampling: a stride-1 conv followed by 2x2 average pooling."""

    def make(site: ConvSite) -> nn.Module:
        if site.stride == 1:
            return conv(site)
        return nn.Sequential(conv(replace(site, stride=1)), nn.AvgPool2d(site.stride))

    return make


def init_resnet(model: nn.Module, zero_init_residual: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, MultiRateConv2d):
            # The fan-out of the whole layer (all rates' outputs), as vanilla's conv: computed on one
            # rate's kernel set it would be n times smaller, and the kernels sqrt(n) times larger.
            std = math.sqrt(2.0 / (m.out_channels * m.kernel_size**2))
            for w in m._weight_list():
                nn.init.normal_(w, 0.0, std)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


# ------------------------------------------------------------------ post-activation blocks
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, stage: int, index: int,
                 conv: ConvFactory, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv(ConvSite(stage, index, "conv1", inplanes, planes, 3, stride, 1))
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(ConvSite(stage, index, "conv2", planes, planes, 3, 1, 1))
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, stage: int, index: int,
                 conv: ConvFactory, shortcut: nn.Module | None) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv(ConvSite(stage, index, "conv1", inplanes, width, 1))
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(ConvSite(stage, index, "conv2", width, width, 3, stride, 1))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv(ConvSite(stage, index, "conv3", width, planes * 4, 1))
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class PadShortcut(nn.Module):
    """CIFAR ResNet "option A" shortcut: subsample and zero-pad channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


def projection(conv: ConvFactory, stage: int, inplanes: int, outplanes: int, stride: int,
               with_bn: bool = True) -> nn.Module:
    c = conv(ConvSite(stage, 0, "shortcut", inplanes, outplanes, 1, stride, 0))
    return nn.Sequential(c, nn.BatchNorm2d(outplanes)) if with_bn else c


class ResNetTrunk(nn.Module):
    """Stem + stages of blocks, each stage ending in a ``level`` tap.

    ``stem="imagenet"``: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. ``stem="cifar"``: 3x3 conv,
    BN, ReLU. ``shortcut="projection"``: 1x1 conv + BN when the shape changes;
    ``"option_a"``: parameter-free zero padding.
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int], widths: Sequence[int],
                 conv: ConvFactory = plain_conv, in_channels: int = 3, stem: str = "imagenet",
                 stem_width: int | None = None, shortcut: str = "projection") -> None:
        super().__init__()
        stem_width = widths[0] if stem_width is None else stem_width
        if stem == "imagenet":
            stem_conv = conv(ConvSite(0, 0, "stem", in_channels, stem_width, 7, 2, 3))
            self.stem = nn.Sequential(stem_conv, nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            stem_conv = conv(ConvSite(0, 0, "stem", in_channels, stem_width, 3, 1, 1))
            self.stem = nn.Sequential(stem_conv, nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"unknown stem {stem!r}")
        inplanes = stem_width
        stages = []
        for i, (n, planes) in enumerate(zip(layers, widths), start=1):
            stride = 1 if i == 1 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                out = planes * block.expansion
                sc = None
                if s != 1 or inplanes != out:
                    if shortcut == "projection":
                        sc = projection(conv, i, inplanes, out, s)
                    else:
                        sc = PadShortcut(s, out - inplanes)
                blocks.append(block(inplanes, planes, s, i, j, conv, sc))
                inplanes = out
            blocks.append(Tap("level", f"stage {i} (post-ReLU)"))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = inplanes
        self.stage_channels = [w * block.expansion for w in widths]

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages[:upto]:
            x = stage(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pooling, an ``embedding`` tap, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = Tap("embedding", "penultimate features")
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(torch.flatten(self.pool(x), 1)))


class ResNet(nn.Module):
    """A trunk plus a classifier head."""

    def __init__(self, trunk: ResNetTrunk, num_classes: int, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ClassifierHead(trunk.out_channels, num_classes)
        init_resnet(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


IMAGENET_LAYERS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                   50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                   152: (Bottleneck, (3, 8, 36, 3))}
IMAGENET_WIDTHS = (64, 128, 256, 512)


def imagenet_resnet(depth: int, conv: ConvFactory = plain_conv, num_classes: int = 1000,
                    in_channels: int = 3, widths: Sequence[int] = IMAGENET_WIDTHS,
                    stem: str = "imagenet") -> ResNet:
    block, layers = IMAGENET_LAYERS[depth]
    return ResNet(ResNetTrunk(block, layers, widths, conv, in_channels, stem), num_classes)


def cifar_resnet(depth: int, conv: ConvFactory = plain_conv, num_classes: int = 10,
                 in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)) -> ResNet:
    """He et al.'s CIFAR ResNet (6n+2 layers, option-A shortcuts)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    trunk = ResNetTrunk(BasicBlock, (n,) * len(widths), widths, conv, in_channels, "cifar",
                        shortcut="option_a")
    return ResNet(trunk, num_classes)
