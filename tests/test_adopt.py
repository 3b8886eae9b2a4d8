"""wsviz.adopt: a model wsviz did not build (torchvision's ResNet-18) goes through every analysis.

Each analysis is checked against what the model itself computes (its stages, its pooled
features, its predictions), and the module is shown to come back unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import wsviz
from wsviz.analysis.attribution import attribute, cam_candidates, default_cam_layer
from wsviz.analysis.embeddings import penultimate_features
from wsviz.analysis.features import feature_maps
from wsviz.analysis.kernels import default_layers, kernel_layers, layer_weight, top_k_kernels
from wsviz.analysis.similarity import cka_matrix
from wsviz.analysis.sweeps import scale_sweep
from wsviz.errors import WsvizError
from wsviz.models import list_taps, summarize

SHAPE = (3, 64, 64)  # small images keep the test fast; torchvision's ResNet is fully convolutional


def _hooks(m: nn.Module) -> int:
    return sum(len(getattr(x, d)) for x in m.modules()
               for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    for mod in m.modules():  # BatchNorm statistics that are not the identity, so the checks mean something
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(12, *SHAPE)


def test_adopt_returns_the_same_module_unchanged(resnet18):
    before_attrs = set(vars(resnet18))
    before_state = {k: v.clone() for k, v in resnet18.state_dict().items()}
    before_modules = [n for n, _ in resnet18.named_modules()]
    assert wsviz.adopt(resnet18, input_shape=SHAPE) is resnet18
    assert set(vars(resnet18)) == before_attrs  # no attribute added
    assert [n for n, _ in resnet18.named_modules()] == before_modules  # no submodule added
    assert resnet18.state_dict().keys() == before_state.keys()
    assert all(torch.equal(v, before_state[k]) for k, v in resnet18.state_dict().items())
    assert _hooks(resnet18) == 0 and not resnet18.training  # its eval mode kept
    assert wsviz.input_shape(resnet18) == SHAPE and wsviz.num_classes(resnet18) == 10


def test_adopted_resnet18_goes_through_every_analysis(resnet18, images):
    wsviz.adopt(resnet18, input_shape=SHAPE)
    m = resnet18
    # taps found by themselves: the four stages and the pooled features
    assert [(t.name, t.kind) for t in list_taps(m)] == [("layer1", "level"), ("layer2", "level"), ("layer3", "level"),
                                                        ("layer4", "level"), ("avgpool", "embedding")]

    # summary and sharing map: nothing shared, every weight applied once
    s = summarize(m)
    assert s.unique_params == sum(p.numel() for p in m.parameters()) == 11_181_642
    assert s.effective_params == s.unique_params and s.compression == 1
    assert not s.shared_params()
    assert sum(r.applied for r in s.reuse().values()) == s.effective_params
    assert s.input_shape == SHAPE and s.flops > 0

    # feature maps: exactly the stage outputs the model computes
    x = images[:1]
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        stages = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(m, name)(h)
            stages[name] = h[0]
    maps = {f.name: f for f in feature_maps(m, x[0], kinds=["level"])}
    assert list(maps) == list(stages)
    for name, want in stages.items():
        torch.testing.assert_close(maps[name].maps, want)

    # kernels: every 3x3+ conv of ResNet-18 (16 3x3 and the 7x7 stem), none shared; top-k of a real weight
    layers = kernel_layers(m)
    assert len(layers) == 17 and layers[0].name == "conv1" and not any(k.shared for k in layers)
    assert default_layers({"r18": m}) == {"r18": "layer4.1.conv2"}
    top = top_k_kernels(layer_weight(m, "layer4.1.conv2"), 16)
    w = m.layer4[1].conv2.weight.detach()
    assert top.magnitude[0] == pytest.approx(float(w.abs().sum((2, 3)).max()))

    # scale sweep: at scale 1 the predictions are the model's own
    labels = torch.arange(len(images)) % 10
    res = scale_sweep({"r18": m}, images, labels, (0.5, 1.0))
    with torch.no_grad():
        own = m(images).argmax(1).numpy()
    np.testing.assert_array_equal(res.predictions["r18"][1], own)
    assert res.agreement["r18"][1] == 1.0
    assert res.accuracy["r18"][1] == pytest.approx(float((own == labels.numpy()).mean()))

    # Grad-CAM by default on the last stage (the deepest spatial map the classifier reads)
    assert default_cam_layer(m) == "layer4"
    assert [c[0] for c in cam_candidates(m)] == ["layer1", "layer2", "layer3", "layer4"]
    cam = attribute(m, images[:2], "grad_cam")
    assert cam.layer == "layer4" and cam.maps.shape == (2, 64, 64) and (cam.maps >= 0).all()
    assert cam.targets.tolist() == own[:2].tolist()
    ig = attribute(m, images[:1], "integrated_gradients", ig_steps=8)
    assert ig.raw.shape == (1, *SHAPE)

    # embeddings: the pooled 512-d features the classifier reads
    feats = penultimate_features(m, images)
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        want = torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(h))))), 1)
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.fc(torch.from_numpy(feats)), m(images))

    # CKA: a layer against itself is 1
    cka = cka_matrix(m, m, images)
    assert cka.taps_a == ["layer1", "layer2", "layer3", "layer4", "avgpool"]
    np.testing.assert_allclose(np.diag(cka.matrix), 1.0, atol=1e-6)

    assert _hooks(m) == 0 and not m.training  # every analysis removed its hooks and restored the mode


def test_taps_by_module_path_on_any_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(WsvizError, match=r"wsviz.adopt\(model, input_shape"):
        summarize(net)  # not adopted: the analyses say what to do
    wsviz.adopt(net, (1, 16, 16), taps={"1": "level", "3": ("level", "second conv"), "5": "embedding"})
    assert [(t.name, t.kind, t.label) for t in list_taps(net)] == [
        ("1", "level", "1"), ("3", "level", "second conv"), ("5", "embedding", "5")]
    x = torch.rand(5, 1, 16, 16)
    fm = feature_maps(net, x[0])
    assert [f.name for f in fm] == ["1", "3", "5"] and fm[1].maps.shape == (8, 16, 16)
    feats = penultimate_features(net, x)
    with torch.no_grad():
        np.testing.assert_allclose(feats, net[:6](x).numpy(), rtol=1e-5, atol=1e-6)
    assert default_cam_layer(net) == "3"
    assert summarize(net).unique_params == sum(p.numel() for p in net.parameters())
    # a list of paths: level taps
    wsviz.adopt(net, (1, 16, 16), taps=["1"])
    assert [(t.name, t.kind) for t in list_taps(net)] == [("1", "level")]


def test_adopt_refuses_what_it_cannot_use():
    m = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(WsvizError, match="input_shape must be"):
        wsviz.adopt(m, input_shape=(64, 64))
    with pytest.raises(WsvizError, match=r"does not run on an input of shape \(1, 1, 64, 64\)"):
        wsviz.adopt(m, input_shape=(1, 64, 64))  # the stem wants 3 channels
    with pytest.raises(WsvizError, match="no module 'layer9'.*layer1"):
        wsviz.adopt(m, (3, 64, 64), taps={"layer9": "level"})
    with pytest.raises(WsvizError, match="kind 'stages'"):
        wsviz.adopt(m, (3, 64, 64), taps={"layer1": "stages"})
    with pytest.raises(WsvizError, match="num_classes=1000, but the model outputs 10"):
        wsviz.adopt(m, (3, 64, 64), num_classes=1000)
    relu = nn.ReLU()  # one module used twice: its output would be ambiguous
    twice = nn.Sequential(nn.Conv2d(1, 2, 3), relu, nn.Conv2d(2, 2, 3), relu, nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(WsvizError, match="ran more than once"):
        wsviz.adopt(twice, (1, 8, 8), taps=["1"])
    with pytest.raises(WsvizError, match="already"):
        wsviz.adopt(wsviz.create_model("resnet_digits"), (1, 28, 28))
    with pytest.raises(WsvizError, match="Adopt it first"):  # nothing was recorded by the refused calls
        wsviz.input_shape(m)


class _TimmLikeResNet(nn.Module):
    """timm's ResNet layout: stages layer1..layer4, pooling (with flatten) in ``global_pool``."""

    def __init__(self) -> None:
        super().__init__()
        tv = torchvision.models.resnet18(num_classes=4)
        self.conv1, self.bn1, self.act1, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = tv.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.global_pool(x))


def test_timm_style_resnet_taps_are_found():
    m = wsviz.adopt(_TimmLikeResNet().eval(), (3, 32, 32))
    assert [(t.name, t.kind) for t in list_taps(m)] == [("layer1", "level"), ("layer2", "level"), ("layer3", "level"),
                                                        ("layer4", "level"), ("global_pool", "embedding")]
    assert wsviz.num_classes(m) == 4
    assert penultimate_features(m, torch.rand(3, 3, 32, 32)).shape == (3, 512)


class _Normalizer(nn.Module):
    """The wrapper README recommends for a model trained on Normalize(mean, std) inputs."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def test_a_resnet_inside_a_normalisation_wrapper_has_its_taps_found_under_the_wrappers_path(resnet18):
    net = nn.Sequential(_Normalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), resnet18)
    m = wsviz.adopt(net, SHAPE)
    assert [(t.name, t.kind) for t in list_taps(m)] == [("1.layer1", "level"), ("1.layer2", "level"),
                                                        ("1.layer3", "level"), ("1.layer4", "level"),
                                                        ("1.avgpool", "embedding")]
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():  # the pooled features of the normalised input, what the classifier reads
        want = torch.flatten(resnet18.avgpool(resnet18.layer4(resnet18.layer3(resnet18.layer2(resnet18.layer1(
            resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(net[0](x)))))))))), 1)
    assert np.allclose(penultimate_features(m, x), want.numpy(), atol=1e-5)


def test_two_resnets_in_one_model_are_not_guessed_between(resnet18):
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = resnet18, torchvision.models.resnet18(num_classes=10).eval()

        def forward(self, x):
            return self.a(x) + self.b(x)

    assert list_taps(wsviz.adopt(Pair(), SHAPE)) == []  # which one's stages are "the" stages? name them


def test_a_model_in_another_float_type_is_told_to_convert_not_to_change_its_input_shape():
    """A float64 model failed inside the probe pass and was told to 'give the input_shape it takes'."""
    from torch import nn

    from wsviz import adopt
    from wsviz.errors import WsvizError

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    with pytest.raises(WsvizError) as err:
        adopt(net, (3, 16, 16), taps=[])
    said = str(err.value)
    assert "float32" in said and "model.float()" in said and "input_shape" not in said
    adopt(net.float(), (3, 16, 16), taps=[])  # converted, it is adopted


def test_weights_applied_by_matrix_products_and_attention_are_seen_and_their_sharing_counted():
    """A weight applied with @ (twice) or one nn.MultiheadAttention applied twice was listed as unused
    and counted once: the sharing map now sees direct parameter uses in matmul/einsum/attention."""
    import torch
    from torch import nn

    from wsviz import adopt, summarize

    class MatmulTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.W = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            h = self.c(x).mean((2, 3))
            return torch.relu(h @ self.W) @ self.W

    s = summarize(adopt(MatmulTwice(), (3, 8, 8), taps=[]))
    assert s.unused_params == [] and "W" in s.shared_params()
    assert s.effective_params == s.unique_params + 16  # W applied twice: 16 more weights applied

    class AttentionTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 16, 3, padding=1)
            self.att = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            h = self.c(x).flatten(2).transpose(1, 2)
            h = self.att(h, h, h)[0]
            h = self.att(h, h, h)[0]
            return self.fc(h.mean(1))

    m = AttentionTwice()
    s = summarize(adopt(m, (3, 8, 8), taps=[]))
    att = sum(p.numel() for p in m.att.parameters())
    assert s.unused_params == [] and s.effective_params == s.unique_params + att
    assert {"att.in_proj_weight", "att.out_proj.weight"} <= set(s.shared_params())
