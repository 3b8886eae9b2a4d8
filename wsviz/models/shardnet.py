"""ShaRDNet: one filter set to rule them all (seed 003) — family ``shardnet``.

One ``n``-channel 3x3 convolution (with bias) is applied at every layer of a VGG-16
arrangement (2-2-3-3-3 conv layers, max-pooling after each block); the input is
zero-padded to ``n`` channels. ``E`` is the unshared equivalent (first layer ``in -> n``),
``S`` the shared one, ``SL`` adds four 1x1 blending convolutions without bias before the
first four max-pools. BatchNorm is never shared.

SL-ResNet-34/50 (paper Table 5): a standalone first conv (not shared), then 4 scale levels
of 4 blocks that all use one shared 3x3 conv (basic blocks: both convs of the block) or
one shared bottleneck unit (1x1, 3x3, 1x1); 1x1 blending layers between levels, max-pool
downsampling. ``|W_conv|`` (the paper's count) = conv + blending weights + conv biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsviz.models.registry import register_model
from wsviz.models.sharing import SharedConv2d, Tap

PAPER = "ShaRDNet: One Filter Set to Rule Them All"
KINDS = ("E", "S", "SL")
VGG16_BLOCKS = (2, 2, 3, 3, 3)


class ConvBNReLU(nn.Module):
    def __init__(self, conv: nn.Module, channels: int, tap: Tap | None = None) -> None:
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(channels)
        self.tap = tap if tap is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap(F.relu(self.bn(self.conv(x))))


class ShardVGG(nn.Module):
    """E-, S- or SL-VGGNet of width ``n`` (paper Table 3)."""

    def __init__(self, kind: str, width: int, num_classes: int, in_channels: int,
                 fc_width: int = 512, blocks: tuple[int, ...] = VGG16_BLOCKS, last_pool: bool = True) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind != "E" and in_channels > width:
            raise ValueError(f"a shared layer of width {width} cannot take {in_channels} input channels")
        self.kind, self.width, self.in_channels = kind, width, in_channels
        n = width
        self.shared = nn.Conv2d(n, n, 3, padding=1) if kind != "E" else None
        layers: list[nn.Module] = []
        it = 0
        for b, count in enumerate(blocks, start=1):
            for i in range(count):
                it += 1
                if kind == "E":
                    conv = nn.Conv2d(in_channels if it == 1 else n, n, 3, padding=1)
                    tap = Tap("level", f"block {b} conv {i + 1} (post-ReLU)")
                else:
                    conv = SharedConv2d(self.shared)
                    tap = Tap("iteration", f"iteration {it} (block {b}, post-ReLU)")
                layers.append(ConvBNReLU(conv, n, tap))
            if kind == "SL" and b < len(blocks):
                layers.append(nn.Conv2d(n, n, 1, bias=False))  # blending layer
            if b < len(blocks) or last_pool:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(n, fc_width), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True), nn.Dropout(0.5),
            Tap("embedding", "penultimate features"), nn.Linear(fc_width, num_classes))

    def blending_layers(self) -> list[nn.Conv2d]:
        """The 1x1 blending convolutions, in network order (SL only)."""
        return [m for m in self.features if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]

    def conv_params(self) -> int:
        """``|W_conv|`` as the paper counts it: conv and blending weights plus conv biases."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        return sum(p.numel() for m in convs for p in (m.weight, m.bias) if p is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "E" and x.shape[1] < self.width:
            x = F.pad(x, (0, 0, 0, 0, 0, self.width - x.shape[1]))  # zero channels up to n
        x = self.features(x)
        if x.shape[-1] > 1:  # inputs larger than 32x32: pool what is left to 1x1
            x = F.adaptive_max_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


@register_model(
    "shardnet_vgg", family="shardnet", paper=PAPER,
    description="E-, S- or SL-VGGNet with one n-channel 3x3 conv (VGG-16 layout); kind='E' is unshared.",
    num_classes=10, in_channels=3, input_size=32, choices={"kind": KINDS}, kind="S", width=64, fc_width=512,
)
def shardnet_vgg(kind: str, width: int, fc_width: int, num_classes: int, in_channels: int) -> nn.Module:
    return ShardVGG(kind, width, num_classes, in_channels, fc_width)


# ------------------------------------------------------------------------------ SL-ResNet
class SharedBasicBlock(nn.Module):
    """Basic block whose two 3x3 convs are the same shared conv; own BatchNorms."""

    def __init__(self, shared: nn.Conv2d, n: int, label: str) -> None:
        super().__init__()
        self.conv1, self.conv2 = SharedConv2d(shared), SharedConv2d(shared)
        self.bn1, self.bn2 = nn.BatchNorm2d(n), nn.BatchNorm2d(n)
        self.tap1 = Tap("iteration", f"{label} conv 1 (post-ReLU)")
        self.tap2 = Tap("iteration", f"{label} conv 2 (post-BN, pre-ReLU)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tap1(F.relu(self.bn1(self.conv1(x))))
        out = self.tap2(self.bn2(self.conv2(out)))
        return F.relu(out + x)


class SharedBottleneck(nn.Module):
    """Bottleneck block that uses a shared (1x1, 3x3, 1x1) unit; own BatchNorms."""

    def __init__(self, unit: nn.ModuleDict, n: int, label: str) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (SharedConv2d(unit[k]) for k in ("reduce", "spatial", "expand"))
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(n), nn.BatchNorm2d(n), nn.BatchNorm2d(4 * n)
        self.tap = Tap("iteration", f"{label} (post-BN, pre-ReLU)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.tap(self.bn3(self.conv3(out)))
        return F.relu(out + x)


class SLResNet(nn.Module):
    """SL-ResNet-34 (``bottleneck=False``) or SL-ResNet-50 of width ``n`` (paper Table 5)."""

    def __init__(self, width: int, bottleneck: bool, num_classes: int, in_channels: int,
                 stem: str = "3x3", blocks_per_level: int = 4, levels: int = 4) -> None:
        super().__init__()
        n = width
        c = 4 * n if bottleneck else n
        if stem == "3x3":  # Tiny ImageNet: no striding, first max-pool suppressed
            self.stem = nn.Sequential(nn.Conv2d(in_channels, n, 3, padding=1), nn.BatchNorm2d(n), nn.ReLU(inplace=True))
        elif stem == "7x7":  # ImageNet
            self.stem = nn.Sequential(nn.Conv2d(in_channels, n, 7, 2, 3), nn.BatchNorm2d(n), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(2))
        else:
            raise ValueError(f"stem must be '3x3' or '7x7', got {stem!r}")
        self.expand = nn.Conv2d(n, c, 1, bias=False) if bottleneck else nn.Identity()
        if bottleneck:
            self.shared = nn.ModuleDict({"reduce": nn.Conv2d(c, n, 1), "spatial": nn.Conv2d(n, n, 3, padding=1),
                                         "expand": nn.Conv2d(n, c, 1)})
        else:
            self.shared = nn.Conv2d(n, n, 3, padding=1)
        lv = []
        for level in range(1, levels + 1):
            mods: list[nn.Module] = []
            for b in range(1, blocks_per_level + 1):
                label = f"level {level} block {b}"
                mods.append(SharedBottleneck(self.shared, n, label) if bottleneck
                            else SharedBasicBlock(self.shared, n, label))
            mods.append(Tap("level", f"level {level} (post-ReLU)"))
            if level < levels:
                mods += [nn.Conv2d(c, c, 1, bias=False), nn.MaxPool2d(2)]
            lv.append(nn.Sequential(*mods))
        self.levels = nn.ModuleList(lv)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = Tap("embedding", "penultimate features")
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def blending_layers(self) -> list[nn.Conv2d]:
        return [m for lvl in self.levels for m in lvl if isinstance(m, nn.Conv2d)]

    def conv_params(self) -> int:
        """``|W_conv|`` as the paper counts it: conv and blending weights plus conv biases."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        return sum(p.numel() for m in convs for p in (m.weight, m.bias) if p is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(self.stem(x))
        for level in self.levels:
            x = level(x)
        return self.fc(self.embedding(torch.flatten(self.pool(x), 1)))


def _register_slresnet(depth: int, bottleneck: bool) -> None:
    @register_model(
        f"sl_resnet{depth}", family="shardnet", paper=PAPER,
        description=(f"SL-ResNet-{depth}: one shared {'bottleneck unit' if bottleneck else '3x3 conv'} for all 16 blocks, "
                     "1x1 blending between levels (Tiny ImageNet layout; stem='7x7' for ImageNet)."),
        num_classes=200, in_channels=3, input_size=56, choices={"stem": ("3x3", "7x7")}, width=512, stem="3x3",
    )
    def build(width: int, stem: str, num_classes: int, in_channels: int) -> nn.Module:
        return SLResNet(width, bottleneck, num_classes, in_channels, stem)


_register_slresnet(34, False)
_register_slresnet(50, True)
