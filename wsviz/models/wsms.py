"""Weight-shared multi-stage networks (Takahashi et al., seed 001) — family ``wsms``.

``S`` stages run in parallel; stage ``s`` sees the input average-pooled by ``2^(s-1)`` and
runs the first ``t-s+1`` blocks of the same CNN, so every stage ends at the same spatial
size. Convolution weights of a block are shared by all stages (one parameter, several use
sites); BatchNorm is not. The stage outputs are concatenated, go through the integration
layer (none, 1x1 or 3x3 conv to ``c`` channels, + BN + ReLU), global pooling and the
classifier. ``shared=False`` gives MS-Net: the same layout with separate weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsviz.models.registry import register_model
from wsviz.models.resnets import (
    ClassifierHead,
    ResNetTrunk,
    cifar_resnet,
    imagenet_resnet,
    init_resnet,
    plain_conv,
    strided_by_pooling,
)
from wsviz.models.sharing import Tap, tied_copy

PAPER = "Takahashi et al. — Scale-Invariant Recognition by Weight-Shared CNNs in Parallel (WSMS-Net)"
INTEGRATIONS = ("none", "1x1", "3x3")


class MultiStageNet(nn.Module):
    """WSMS-Net (``shared=True``) or MS-Net (``shared=False``) around a ResNet trunk."""

    def __init__(self, trunk: ResNetTrunk, num_stages: int, shared: bool, integration: str,
                 integration_channels: int, num_classes: int) -> None:
        super().__init__()
        t = len(trunk.stages)
        if not 1 <= num_stages <= t:
            raise ValueError(f"num_stages must be between 1 and {t} for this trunk, got {num_stages}")
        if integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
        self.num_stages, self.shared, self.integration_kind = num_stages, shared, integration
        branches: list[nn.Module] = [nn.Sequential(trunk.stem, *trunk.stages)]
        channels = [trunk.stage_channels[t - 1]]
        for s in range(2, num_stages + 1):
            depth = t - s + 1
            prefix = nn.Sequential(trunk.stem, *trunk.stages[:depth])
            branch = tied_copy(prefix, tied=shared)
            for m in branch.modules():
                if isinstance(m, Tap):
                    m.label = f"branch {s} · {m.label}"
            branches.append(branch)
            channels.append(trunk.stage_channels[depth - 1])
        self.branches = nn.ModuleList(branches)
        self.stage_taps = nn.ModuleList(
            Tap("stage", f"stage {s} (input /{2 ** (s - 1)})") for s in range(1, num_stages + 1))
        total = sum(channels)
        if integration == "none":
            self.integration = nn.Identity()
            out = total
        else:
            k = 1 if integration == "1x1" else 3
            self.integration = nn.Sequential(
                nn.Conv2d(total, integration_channels, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(integration_channels), nn.ReLU(inplace=True))
            out = integration_channels
        # The integrated features: every stage's output, after the integration layer. Grad-CAM
        # explains the whole model here (a stage tap would explain one scale only).
        self.integrated = Tap("level", "integrated features (all stages)")
        self.head = ClassifierHead(out, num_classes)
        if not shared:
            init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for s, (branch, tap) in enumerate(zip(self.branches, self.stage_taps)):
            xs = x if s == 0 else F.avg_pool2d(x, 2**s)
            feats.append(tap(branch(xs)))
        return self.head(self.integrated(self.integration(torch.cat(feats, dim=1))))


def _wsms(trunk: ResNetTrunk, num_stages: int, shared: bool, integration: str, c: int,
          num_classes: int) -> nn.Module:
    model = MultiStageNet(trunk, num_stages, shared, integration, c, num_classes)
    init_resnet(model.integration)
    return model


@register_model(
    "resnet110", family="wsms", paper=PAPER,
    description="Baseline: He et al.'s CIFAR ResNet-110 (3x18 basic blocks, option-A shortcuts).",
    num_classes=10, in_channels=3, input_size=32,
)
def resnet110(num_classes: int, in_channels: int) -> nn.Module:
    return cifar_resnet(110, num_classes=num_classes, in_channels=in_channels)


@register_model(
    "wsms_resnet110", family="wsms", paper=PAPER,
    description="WSMS-ResNet (or MS-ResNet with shared=False) on CIFAR ResNet-110, 3 stages.",
    num_classes=10, in_channels=3, input_size=32,
    choices={"integration": INTEGRATIONS, "shared": (True, False)},
    integration="1x1", shared=True, num_stages=3, integration_channels=128,
)
def wsms_resnet110(integration: str, shared: bool, num_stages: int, integration_channels: int,
                   num_classes: int, in_channels: int) -> nn.Module:
    trunk = cifar_resnet(110, in_channels=in_channels).trunk
    return _wsms(trunk, num_stages, shared, integration, integration_channels, num_classes)


def _register_imagenet(depth: int) -> None:
    @register_model(
        f"wsms_resnet{depth}", family="wsms", paper=PAPER,
        description=(f"WSMS-ResNet-{depth} for ImageNet: 3 stages, 1x1 integration 3584->2048, "
                     "stride-1 convs + 2x2 average pooling for downsampling."),
        num_classes=1000, in_channels=3, input_size=224,
        choices={"integration": INTEGRATIONS, "shared": (True, False)},
        integration="1x1", shared=True, num_stages=3, integration_channels=2048,
    )
    def build(integration: str, shared: bool, num_stages: int, integration_channels: int,
              num_classes: int, in_channels: int) -> nn.Module:
        trunk = imagenet_resnet(depth, strided_by_pooling(plain_conv), in_channels=in_channels).trunk
        return _wsms(trunk, num_stages, shared, integration, integration_channels, num_classes)


for _depth in (50, 101, 152):
    _register_imagenet(_depth)


@register_model(
    "wsms_resnet_digits", family="wsms", paper=PAPER,
    description="Small WSMS-ResNet (CIFAR-style ResNet-20 trunk) for 28x28 digits; shared=False is MS-Net.",
    num_classes=10, in_channels=1, input_size=28,
    choices={"integration": INTEGRATIONS, "shared": (True, False)},
    integration="1x1", shared=True, num_stages=3, integration_channels=64, depth=20, base_width=16,
)
def wsms_resnet_digits(integration: str, shared: bool, num_stages: int, integration_channels: int,
                       depth: int, base_width: int, num_classes: int, in_channels: int) -> nn.Module:
    widths = (base_width, 2 * base_width, 4 * base_width)
    trunk = cifar_resnet(depth, in_channels=in_channels, widths=widths).trunk
    return _wsms(trunk, num_stages, shared, integration, integration_channels, num_classes)


@register_model(
    "resnet_digits", family="wsms", paper=PAPER,
    description="Baseline for the digit zoo: the plain CIFAR-style ResNet-20 that wsms_resnet_digits wraps.",
    num_classes=10, in_channels=1, input_size=28, depth=20, base_width=16,
)
def resnet_digits(depth: int, base_width: int, num_classes: int, in_channels: int) -> nn.Module:
    widths = (base_width, 2 * base_width, 4 * base_width)
    return cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels, widths=widths)
