"""Multi-scale atrous weight sharing (Aich et al., seed 000) — family ``msws``.

A shared layer with ``k_o`` outputs holds ``k_o/n`` kernels and applies them at dilation
rates ``1..n`` (padding grows with the rate so every rate keeps the output size); the
outputs are concatenated and go through one BatchNorm. ``unshared`` keeps the rates but
gives each its own ``k_o/n`` kernels; ``vanilla`` is the plain network.

Which layers (reference.md section 1, derived from Table 2): every 3x3 conv of a bottleneck
ResNet (strided ones included); only the second 3x3 conv of a basic block; all five conv
layers of AlexNet, biases included.
"""

from __future__ import annotations

from torch import nn

from wsviz.models.registry import register_model
from wsviz.models.resnets import ConvFactory, ConvSite, cifar_resnet, imagenet_resnet, plain_conv
from wsviz.models.sharing import MultiRateConv2d, Tap

PAPER = "Aich et al. — Multi-Scale Weight Sharing Network for Image Recognition"
SHARING = ("vanilla", "unshared", "shared")


def _check(sharing: str, n_rates: int) -> None:
    if sharing not in SHARING:
        raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
    if not isinstance(n_rates, int) or n_rates < 1:
        raise ValueError(f"n_rates must be a positive integer, got {n_rates!r}")


def multirate_conv(sharing: str, n_rates: int, site: ConvSite) -> nn.Module:
    """The conv for ``site`` under a sharing scheme: plain for vanilla, else multi-rate."""
    if sharing == "vanilla":
        return plain_conv(site)
    return MultiRateConv2d(site.in_channels, site.out_channels, site.kernel_size, site.stride,
                           site.padding, rates=range(1, n_rates + 1), shared=sharing == "shared",
                           bias=site.bias)


def resnet_factory(sharing: str, n_rates: int) -> ConvFactory:
    """Multi-rate for the 3x3 ``conv2`` of every block: in a bottleneck that is every 3x3
    conv (strided ones included), in a basic block only the second one."""

    def make(site: ConvSite) -> nn.Module:
        if site.role == "conv2":
            return multirate_conv(sharing, n_rates, site)
        return plain_conv(site)

    return make


def _imagenet(depth: int, sharing: str, n_rates: int, num_classes: int, in_channels: int) -> nn.Module:
    _check(sharing, n_rates)
    return imagenet_resnet(depth, resnet_factory(sharing, n_rates),
                           num_classes=num_classes, in_channels=in_channels)


def _register_resnet(depth: int) -> None:
    block = "bottleneck: every 3x3 conv" if depth >= 50 else "basic blocks: second 3x3 conv of each block"
    register_model(
        f"msws_resnet{depth}", family="msws", paper=PAPER,
        description=f"ImageNet ResNet-{depth} with multi-rate weight sharing ({block}).",
        num_classes=1000, in_channels=3, input_size=224, choices={"sharing": SHARING},
        sharing="shared", n_rates=2,
    )(lambda sharing, n_rates, num_classes, in_channels, _d=depth: _imagenet(_d, sharing, n_rates, num_classes, in_channels))


for _depth in (18, 34, 50, 101, 152):
    _register_resnet(_depth)


class AlexNet(nn.Module):
    """torchvision's AlexNet layout with a pluggable conv factory."""

    def __init__(self, conv: ConvFactory, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        specs = [(in_channels, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1),
                 (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
        layers: list[nn.Module] = []
        for i, (cin, cout, k, s, p) in enumerate(specs, start=1):
            layers += [conv(ConvSite(i, 0, "conv", cin, cout, k, s, p, bias=True)), nn.ReLU(inplace=True)]
            if i in (1, 2, 5):
                layers.append(nn.MaxPool2d(3, 2))
            layers.append(Tap("level", f"conv{i}"))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            Tap("embedding", "penultimate features"), nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


@register_model(
    "msws_alexnet", family="msws", paper=PAPER,
    description="AlexNet with all five conv layers (weights and biases) shared over rates.",
    num_classes=1000, in_channels=3, input_size=224, choices={"sharing": SHARING},
    sharing="shared", n_rates=2,
)
def msws_alexnet(sharing: str, n_rates: int, num_classes: int, in_channels: int) -> nn.Module:
    _check(sharing, n_rates)
    return AlexNet(lambda site: multirate_conv(sharing, n_rates, site), num_classes, in_channels)


@register_model(
    "msws_resnet_digits", family="msws", paper=PAPER,
    description="Small CIFAR-style basic-block ResNet for 28x28 digits; second 3x3 of each block multi-rate.",
    num_classes=10, in_channels=1, input_size=28, choices={"sharing": SHARING},
    sharing="shared", n_rates=2, depth=14, base_width=16,
)
def msws_resnet_digits(sharing: str, n_rates: int, depth: int, base_width: int,
                       num_classes: int, in_channels: int) -> nn.Module:
    _check(sharing, n_rates)
    widths = (base_width, 2 * base_width, 4 * base_width)
    return cifar_resnet(depth, resnet_factory(sharing, n_rates), num_classes, in_channels, widths)
