"""RepeatNet: learnable repetition of network parameters (Chavan et al., seed 002) — family ``repeatnet``.

A parent filter block is tiled to fill a larger one and each tile passes through a
learnable transform (:class:`~wsviz.models.sharing.RepeatConv2d`): ``linear`` (the tile is
the parent), ``swish`` (s-RepeatNet) or ``bireal`` (f-RepeatNet, learned sign flips).

* width scaling: every conv of a ResNet-18 is ``scale`` times wider but realised from a
  parent block of the base width;
* depth scaling: a VGG-k base (k = 4..8) grows to the 10-conv VGG-11 layout; the extra layers
  reuse the base's convs after the first block, in turn, as parents;
* the Rot-MNIST CNN (authors' code) and its repeated versions, sized by the paper's repetition
  factors (2*sqrt(2), 4, 4*sqrt(2)) to the FLOPs of the steerable C4 / C8 / C16 models; at a
  reduced ``width`` rounding moves them apart (zoo width 0.25: C8 6.4% fewer, C4 and C16 within 0.03%).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsviz.models.registry import register_model
from wsviz.models.resnets import BasicBlock, ConvSite, ResNet, ResNetTrunk
from wsviz.models.sharing import REPEAT_MODES, RepeatConv2d, Tap

PAPER = "Chavan et al. — Rescaling CNN through Learnable Repetition of Network Parameters (RepeatNet)"
MATCHES = {"c4": 2 * math.sqrt(2), "c8": 4.0, "c16": 4 * math.sqrt(2)}

# Rot-MNIST CNN of the authors' code: widths int(w / sqrt(2)) for w in 32,48,64,64,96,128.
_ROT_BASE = (32, 48, 64, 64, 96, 128)
_ROT_KERNELS = ((7, 1), (5, 2), (5, 2), (5, 2), (5, 2), (5, 0))


class RotMNISTCNN(nn.Module):
    """Six conv+BN+ELU layers, max-pool after conv2 and conv4, adaptive average pool, FC 90->64->10.

    ``mode='none'`` is the plain CNN (convs without bias). Otherwise every conv is a
    :class:`RepeatConv2d` realising a ``rep_fact`` times wider layer (own bias and
    BatchNorm) from the plain CNN's filter block.
    """

    def __init__(self, mode: str = "none", rep_fact: float = 1.0, num_classes: int = 10, in_channels: int = 1,
                 width: float = 1.0) -> None:
        super().__init__()
        if mode not in REPEAT_MODES:
            raise ValueError(f"mode must be one of {REPEAT_MODES}, got {mode!r}")
        if not 0 < width <= 4:
            raise ValueError(f"width must be in (0, 4], got {width!r}")
        k = 1 / math.sqrt(2)
        # Same float expressions as the authors' code, so at width=1 the widths (and counts)
        # match exactly; `width` scales every layer (zoo models that train on a CPU).
        base = [max(1, int(w * k * width)) for w in _ROT_BASE]
        wide = base if mode == "none" else [max(1, int(w * k * rep_fact * width)) for w in _ROT_BASE]
        layers: list[nn.Module] = []
        cin_base, cin = in_channels, in_channels
        for i, ((ks, pad), cb, cw) in enumerate(zip(_ROT_KERNELS, base, wide), start=1):
            if mode == "none":
                conv: nn.Module = nn.Conv2d(cin, cw, ks, padding=pad, bias=False)
            else:
                conv = RepeatConv2d(cin, cw, ks, parent_in=cin_base, parent_out=cb, mode=mode, padding=pad)
            layers += [conv, nn.BatchNorm2d(cw), nn.ELU()]
            if i in (2, 4):
                layers.append(nn.MaxPool2d(2))
            layers.append(Tap("level", f"conv{i}"))
            cin_base, cin = cb, cw
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = Tap("embedding", "penultimate features")
        self.fully_net = nn.Sequential(nn.Linear(cin, 64), nn.BatchNorm1d(64), nn.ELU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fully_net(self.embedding(x))


@register_model(
    "repeatnet_rotmnist_cnn", family="repeatnet", paper=PAPER,
    description=("Rot-MNIST CNN (mode='none', 340,309 params) and its RepeatNet versions sized to the FLOPs "
                 "of steerable C4/C8/C16 (match=...)."),
    num_classes=10, in_channels=1, input_size=28,
    choices={"mode": REPEAT_MODES, "match": tuple(MATCHES)}, mode="swish", match="c8", width=1.0,
)
def repeatnet_rotmnist_cnn(mode: str, match: str, width: float, num_classes: int, in_channels: int) -> nn.Module:
    return RotMNISTCNN(mode, MATCHES[match], num_classes, in_channels, width)


# ------------------------------------------------------------------------- width scaling
@register_model(
    "repeatnet_resnet18", family="repeatnet", paper=PAPER,
    description=("ResNet-18 (CIFAR stem) made `scale` times wider by repetition of base-width parent blocks; "
                 "mode='none' is the dense model of the same width."),
    num_classes=10, in_channels=3, input_size=32, choices={"mode": REPEAT_MODES}, mode="bireal", scale=2,
    base_width=64,
)
def repeatnet_resnet18(mode: str, scale: int, base_width: int, num_classes: int, in_channels: int) -> nn.Module:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    stem_width = base_width

    def conv(site: ConvSite) -> nn.Module:
        if site.role == "stem":
            return nn.Conv2d(site.in_channels, site.out_channels, site.kernel_size, site.stride, site.padding, bias=False)
        if mode == "none":
            return RepeatConv2d(site.in_channels, site.out_channels, site.kernel_size, mode="none",
                                stride=site.stride, padding=site.padding)
        from_stem = site.stage == 1 and site.block == 0 and site.role in ("conv1", "shortcut")
        parent_in = site.in_channels if from_stem else max(1, site.in_channels // scale)
        return RepeatConv2d(site.in_channels, site.out_channels, site.kernel_size, mode=mode,
                            parent_in=parent_in, parent_out=max(1, site.out_channels // scale),
                            stride=site.stride, padding=site.padding)

    widths = tuple(base_width * m * scale for m in (1, 2, 4, 8))
    trunk = ResNetTrunk(BasicBlock, (2, 2, 2, 2), widths, conv, in_channels, "cifar", stem_width=stem_width)
    return ResNet(trunk, num_classes)


# ------------------------------------------------------------------------- depth scaling
VGG_CFG = {
    "VGG11": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG8": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, "M"],
    "VGG7": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
    "VGG6": [64, 64, "M", 128, 128, "M", 256, "M"],
    "VGG5": [64, 64, "M", 128, 128, "M"],
    "VGG4": [64, 64, "M", 128, "M"],
}
BASES = ("VGG4", "VGG5", "VGG6", "VGG7", "VGG8")


class RepeatVGG(nn.Module):
    """Plain VGG-k (``mode='none'``) or VGG-k depth-scaled to the VGG-11 layout by repetition."""

    def __init__(self, base: str, mode: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        cfg = VGG_CFG[base] if mode == "none" else VGG_CFG["VGG11"]
        n_own = sum(1 for c in VGG_CFG[base] if c != "M")
        layers: list[nn.Module] = []
        own: list[nn.Conv2d] = []
        cin, idx, block = in_channels, 0, 1
        for c in cfg:
            if c == "M":
                layers += [nn.MaxPool2d(2, ceil_mode=True), Tap("level", f"block {block}")]
                block += 1
                continue
            if idx < n_own:
                conv: nn.Module = nn.Conv2d(cin, c, 3, padding=1)
                own.append(conv)
            else:
                parents = own[2:] or own  # the base's convs after the first block, in turn
                parent = parents[(idx - n_own) % len(parents)]
                conv = RepeatConv2d(cin, c, 3, source=parent, mode=mode, padding=1)
            layers += [conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin, idx = c, idx + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = Tap("embedding", "penultimate features")
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(torch.flatten(self.pool(self.features(x)), 1)))


@register_model(
    "repeatnet_vgg", family="repeatnet", paper=PAPER,
    description="VGG-k base depth-scaled to VGG-11 by repeating its own convs; mode='none' is the plain VGG-k.",
    num_classes=10, in_channels=3, input_size=32, choices={"mode": REPEAT_MODES, "base": BASES},
    mode="swish", base="VGG4",
)
def repeatnet_vgg(mode: str, base: str, num_classes: int, in_channels: int) -> nn.Module:
    return RepeatVGG(base, mode, num_classes, in_channels)
