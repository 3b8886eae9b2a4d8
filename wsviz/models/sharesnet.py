"""ShaResNet (Boulch, seed 004) — family ``sharesnet``.

Residual blocks at the same spatial scale share a 3x3 convolution (one parameter, used by
every block of the stage). Rules (reference.md section 5, authors' code):

* ImageNet: one stride-1 3x3 per stage; basic blocks share ``conv2`` in every block
  (``conv1`` never); bottleneck blocks share the 3x3 unless it is strided (so the first
  block of stages 2-4 keeps its own). BatchNorm never shared, no conv biases, 1x1+BN
  projection shortcuts.
* CIFAR (pre-activation WRN / ResNet-164): the first block of each stage is unshared;
  blocks 2..n share the second 3x3 (WRN) or the bottleneck 3x3; 1x1 projections without BN.

``shared=False`` builds the unshared twin (identical layout, every conv its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsviz.models.registry import register_model
from wsviz.models.resnets import (
    IMAGENET_LAYERS,
    IMAGENET_WIDTHS,
    ConvFactory,
    ConvSite,
    ResNet,
    ResNetTrunk,
    init_resnet,
    plain_conv,
)
from wsviz.models.sharing import SharedConv2d, Tap

PAPER = "Boulch — ShaResNet: reducing residual network parameter number by sharing weights"


def stage_sharing(selected) -> ConvFactory:
    """A conv factory where every site ``selected(site)`` of a stage uses one convolution.

    The first selected site of a stage owns the weight (a plain ``nn.Conv2d``); every later
    selected site of that stage is a :class:`SharedConv2d` use site of it.
    """
    owners: dict[int, nn.Conv2d] = {}

    def make(site: ConvSite) -> nn.Module:
        if not selected(site):
            return plain_conv(site)
        owner = owners.get(site.stage)
        if owner is None:
            owners[site.stage] = owner = plain_conv(site)
            return owner
        if (owner.in_channels, owner.out_channels, owner.kernel_size[0]) != (
                site.in_channels, site.out_channels, site.kernel_size):
            raise ValueError(f"cannot share {site} with a {owner}")
        return SharedConv2d(owner)

    return make


def _imagenet_rule(site: ConvSite) -> bool:
    return site.role == "conv2" and site.stride == 1 and site.kernel_size == 3


def _register_imagenet(depth: int) -> None:
    @register_model(
        f"sharesnet{depth}", family="sharesnet", paper=PAPER,
        description=f"ShaResNet-{depth} (ImageNet): one shared stride-1 3x3 conv per stage; shared=False is ResNet-{depth}.",
        num_classes=1000, in_channels=3, input_size=224, choices={"shared": (True, False)}, shared=True,
    )
    def build(shared: bool, num_classes: int, in_channels: int) -> nn.Module:
        block, layers = IMAGENET_LAYERS[depth]
        conv = stage_sharing(_imagenet_rule) if shared else plain_conv
        return ResNet(ResNetTrunk(block, layers, IMAGENET_WIDTHS, conv, in_channels), num_classes)


for _d in (34, 50, 101, 152):
    _register_imagenet(_d)


# --------------------------------------------------------------------- CIFAR, pre-activation
class PreActBasic(nn.Module):
    """Wide-ResNet block: BN-ReLU-conv3x3-BN-ReLU-conv3x3; 1x1 projection (no BN) when needed."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, stage: int, index: int,
                 conv: ConvFactory) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv(ConvSite(stage, index, "conv1", inplanes, planes, 3, stride, 1))
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv(ConvSite(stage, index, "conv2", planes, planes, 3, 1, 1))
        self.shortcut = (conv(ConvSite(stage, index, "shortcut", inplanes, planes, 1, stride, 0))
                         if stride != 1 or inplanes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + identity


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (ResNet-164): 1x1, 3x3 (strided), 1x1 x4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, stage: int, index: int,
                 conv: ConvFactory) -> None:
        super().__init__()
        out = planes * 4
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv(ConvSite(stage, index, "conv1", inplanes, planes, 1))
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv(ConvSite(stage, index, "conv2", planes, planes, 3, stride, 1))
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv(ConvSite(stage, index, "conv3", planes, out, 1))
        self.shortcut = (conv(ConvSite(stage, index, "shortcut", inplanes, out, 1, stride, 0))
                         if stride != 1 or inplanes != out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + identity


class PreActResNet(nn.Module):
    def __init__(self, block: type[nn.Module], n: int, widths: tuple[int, ...], conv: ConvFactory,
                 num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = conv(ConvSite(0, 0, "stem", in_channels, 16, 3, 1, 1))
        inplanes = 16
        stages = []
        for i, planes in enumerate(widths, start=1):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(block(inplanes, planes, stride, i, j, conv))
                inplanes = planes * block.expansion
            blocks.append(Tap("level", f"stage {i} (pre-activation sum)"))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(inplanes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = Tap("embedding", "penultimate features")
        self.fc = nn.Linear(inplanes, num_classes)
        init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = F.relu(self.bn(x))
        return self.fc(self.embedding(torch.flatten(self.pool(x), 1)))


def _cifar_rule(site: ConvSite) -> bool:
    # blocks 2..n of a stage share the (second / bottleneck) 3x3
    return site.block >= 1 and site.role == "conv2"


def wide_resnet(depth: int, widen: int, shared: bool, num_classes: int, in_channels: int) -> nn.Module:
    if (depth - 4) % 6:
        raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    conv = stage_sharing(_cifar_rule) if shared else plain_conv
    return PreActResNet(PreActBasic, n, (16 * widen, 32 * widen, 64 * widen), conv, num_classes, in_channels)


def preact_bottleneck_resnet(depth: int, shared: bool, num_classes: int, in_channels: int) -> nn.Module:
    if (depth - 2) % 9:
        raise ValueError(f"bottleneck ResNet depth must be 9n+2, got {depth}")
    conv = stage_sharing(_cifar_rule) if shared else plain_conv
    return PreActResNet(PreActBottleneck, (depth - 2) // 9, (16, 32, 64), conv, num_classes, in_channels)


_CHOICES = {"shared": (True, False)}


@register_model("sharesnet_wrn40_4", family="sharesnet", paper=PAPER,
                description="ShaResNet on Wide-ResNet-40-4 (CIFAR-10); shared=False is WRN-40-4.",
                num_classes=10, in_channels=3, input_size=32, choices=_CHOICES, shared=True)
def sharesnet_wrn40_4(shared: bool, num_classes: int, in_channels: int) -> nn.Module:
    return wide_resnet(40, 4, shared, num_classes, in_channels)


@register_model("sharesnet_wrn28_10", family="sharesnet", paper=PAPER,
                description="ShaResNet on Wide-ResNet-28-10 (CIFAR-100); shared=False is WRN-28-10.",
                num_classes=100, in_channels=3, input_size=32, choices=_CHOICES, shared=True)
def sharesnet_wrn28_10(shared: bool, num_classes: int, in_channels: int) -> nn.Module:
    return wide_resnet(28, 10, shared, num_classes, in_channels)


@register_model("sharesnet_resnet164", family="sharesnet", paper=PAPER,
                description="ShaResNet on pre-activation ResNet-164 (CIFAR-10); shared=False is ResNet-164.",
                num_classes=10, in_channels=3, input_size=32, choices=_CHOICES, shared=True)
def sharesnet_resnet164(shared: bool, num_classes: int, in_channels: int) -> nn.Module:
    return preact_bottleneck_resnet(164, shared, num_classes, in_channels)


@register_model("sharesnet_wrn_digits", family="sharesnet", paper=PAPER,
                description="Small ShaResNet (Wide-ResNet, CIFAR rule) for 28x28 digits; shared=False is its twin.",
                num_classes=10, in_channels=1, input_size=28, choices=_CHOICES, shared=True, depth=22, widen=1)
def sharesnet_wrn_digits(shared: bool, depth: int, widen: int, num_classes: int, in_channels: int) -> nn.Module:
    return wide_resnet(depth, widen, shared, num_classes, in_channels)
