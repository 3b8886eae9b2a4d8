"""Kernels, feature maps and sweeps: checks of meaning on real small models and data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsviz import WsvizError
from wsviz.analysis.features import feature_maps
from wsviz.analysis.kernels import (
    blending_extremes,
    blending_pruning_curve,
    blending_weights,
    kernel_layers,
    kernel_set_similarity,
    layer_weight,
    random_kernel_similarity,
    top_k_kernels,
)
from wsviz.analysis.sweeps import (
    layer_scale_invariance,
    predict,
    rotation_sweep,
    scale_sweep,
    single_image_stability,
)
from wsviz.data.datasets import load_split
from wsviz.data.resample import rescale, rotate
from wsviz.models import create_model
from wsviz.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    te = load_split("mnist5k", "test")  # in file order the digits are sorted by class:
    return te.images[::5], te.labels[::5]  # every 5th gives 200 images, 20 per class


@pytest.fixture(scope="module")
def trained_resnet():
    """A small ResNet trained for one epoch: well above chance, quick to make."""
    torch.manual_seed(0)
    m = create_model("resnet_digits", base_width=8, depth=8)
    tr, te = load_split("mnist5k", "train"), load_split("mnist5k", "test")
    train(m, (tr.images, tr.labels), (te.images[:64], te.labels[:64]), TrainConfig(epochs=2, batch_size=32, lr=0.05))
    return m.eval()


# ------------------------------------------------------------------------------ kernels
def test_top_k_kernels_are_the_k_largest():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    top = top_k_kernels(w, 10)
    mags = w.abs().sum((2, 3)).flatten()
    expected = torch.sort(mags, descending=True).values[:10].numpy()
    np.testing.assert_allclose(top.magnitude, expected, rtol=1e-6)
    assert (np.diff(top.magnitude) <= 0).all()
    for j in range(10):  # each returned kernel is the one its indices name
        np.testing.assert_array_equal(top.kernels[j], w[top.out_index[j], top.in_index[j]].numpy())
    assert top_k_kernels(w, 10_000).kernels.shape == (128, 3, 3)


def test_kernel_layers_are_places_with_their_reuse():
    s_vgg = kernel_layers(create_model("shardnet_vgg", kind="S", width=16))
    assert len(s_vgg) == 13  # ShaRDNet S: one conv applied at 13 places, each listed with that count
    assert all(k.params == ("shared.weight",) and k.uses == 13 and k.shared for k in s_vgg)
    assert len({k.name for k in s_vgg}) == 13
    e_vgg = kernel_layers(create_model("shardnet_vgg", kind="E", width=16))
    assert [k.name for k in e_vgg] == [k.name for k in s_vgg] and not any(k.shared for k in e_vgg)
    shared = create_model("msws_resnet_digits", sharing="shared")
    msws = {k.name: k for k in kernel_layers(shared)}
    assert msws["trunk.stages.0.0.conv2"].uses == 2 and msws["trunk.stages.0.0.conv2"].shape == (8, 16, 3, 3)
    assert msws["trunk.stages.0.0.conv2"].variations == ("padding=1 dilation=1", "padding=2 dilation=2")
    assert torch.equal(layer_weight(shared, "trunk.stages.0.0.conv2"), shared.trunk.stages[0][0].conv2.weight.detach())
    # unshared rates: the place shows both rates' kernels (as many as vanilla), not one half
    unshared = create_model("msws_resnet_digits", sharing="unshared")
    layer = {k.name: k for k in kernel_layers(unshared)}["trunk.stages.0.0.conv2"]
    assert layer.shape == (16, 16, 3, 3) and not layer.shared
    ws = unshared.trunk.stages[0][0].conv2.weights
    assert torch.equal(layer_weight(unshared, layer.name), torch.cat([ws[0], ws[1]]).detach())
    rep = kernel_layers(create_model("repeatnet_rotmnist_cnn", mode="swish", match="c4", width=0.25))
    assert rep[0].derived and rep[0].shape[:2] == (16, 1)
    w = layer_weight(create_model("repeatnet_rotmnist_cnn", mode="swish", match="c4", width=0.25), rep[0].name)
    assert tuple(w.shape) == rep[0].shape


def test_kernel_layers_of_steerable_model_are_expanded_filters():
    m = create_model("steerable_rotmnist", N=4, width=0.25)
    layers = kernel_layers(m)
    assert len(layers) == 6 and all(k.derived and k.kind == "expanded" and k.factor > 1 for k in layers)
    w = layer_weight(m, layers[1].name)
    assert tuple(w.shape) == layers[1].shape
    # C4-steerable: rotating a filter by 90 degrees permutes the filter bank, so the bank of
    # rotated kernels is the same set -> similarity 1.
    k = w.reshape(-1, *w.shape[2:])
    assert kernel_set_similarity(k.numpy(), torch.rot90(k, 1, (1, 2)).numpy()) > 0.999


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(WsvizError, match="not a conv layer"):
        layer_weight(create_model("resnet_digits"), "nope.weight")


def test_kernel_set_similarity_meaning():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 3, 3))
    perm = rng.permutation(64)
    signs = rng.choice([-1.0, 1.0], size=(64, 1, 1))
    assert kernel_set_similarity(a, a) == pytest.approx(1.0)
    assert kernel_set_similarity(a, (a * signs)[perm] * 3.0) == pytest.approx(1.0)  # sign, order, scale
    unrelated = random_kernel_similarity(64, 3, 3)
    assert 0.3 < unrelated < 0.9
    noisy = a + 0.3 * rng.standard_normal(a.shape)
    assert unrelated < kernel_set_similarity(a, noisy) < 1.0


def test_blending_weights_and_extremes():
    m = create_model("shardnet_vgg", kind="SL", width=64)
    ws = blending_weights(m)
    assert len(ws) == 4 and all(w.shape == (64, 64) for w in ws)
    marks = blending_extremes(ws[0], 8)
    assert ((marks == 1).sum(1) == 8).all() and ((marks == -1).sum(1) == 8).all()
    row = np.abs(ws[0][0])
    assert row[marks[0] == 1].min() >= row[marks[0] == 0].max() >= row[marks[0] == -1].max()
    with pytest.raises(WsvizError, match="blending"):
        blending_weights(create_model("shardnet_vgg", kind="S", width=16))


def test_blending_pruning_curve_restores_weights(digits):
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.loop import evaluate

    m, _ = load_checkpoint(ROOT / "checkpoints" / "scale-shardnet-SL")  # trained: pruning has something to lose
    m.eval()
    before = [layer.weight.detach().clone() for layer in m.blending_layers()]
    x, y = digits
    curve = blending_pruning_curve(m, x, y, (0.0, 0.5, 1.0))
    after = [layer.weight for layer in m.blending_layers()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    total = sum(w.numel() for w in before)
    assert curve.pruned_weights.tolist() == [0, total // 2, total]
    _, acc0, _ = evaluate(m, x, y)
    assert curve.accuracy[0] == pytest.approx(acc0) and acc0 > 0.5
    # half pruned, by hand: the smallest half of all blending weights (pooled over layers) set to zero
    allw = torch.cat([w.abs().flatten() for w in before])
    thresh = torch.kthvalue(allw, total // 2).values
    with torch.no_grad():
        for layer, w in zip(m.blending_layers(), before):
            layer.weight.copy_(torch.where(w.abs() <= thresh, torch.zeros_like(w), w))
        _, acc_half, _ = evaluate(m, x, y)
        for layer, w in zip(m.blending_layers(), before):
            layer.weight.copy_(w)
    assert curve.accuracy[1] == pytest.approx(acc_half) and acc_half != acc0
    # everything pruned: the network sees zeros after the first blend -> one constant prediction,
    # right exactly on the images of that one class (the sample holds 20 of each of 10 classes)
    assert y.bincount().tolist() == [20] * 10
    assert curve.accuracy[-1] == pytest.approx(0.1, abs=1e-12)


# --------------------------------------------------------------------------- feature maps
@pytest.mark.parametrize("name,kw,kind,n", [
    ("msws_resnet_digits", {}, "rate", 12), ("wsms_resnet_digits", {}, "stage", 3),
    ("shardnet_vgg", {"kind": "S", "width": 16, "in_channels": 1, "input_size": 28}, "iteration", 13),
    ("resnet_digits", {}, "level", 3), ("steerable_rotmnist", {"N": 4, "width": 0.25}, "level", 6),
])
def test_feature_maps_by_kind(name, kw, kind, n, digits):
    m = create_model(name, **kw)
    assert m.training
    modes = []
    hook = m.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    maps = feature_maps(m, digits[0][0], kinds=[kind])
    hook.remove()
    assert len(maps) == n and all(f.kind == kind and f.maps.ndim == 3 for f in maps)
    assert modes == [False] and m.training  # one forward pass in eval mode, then the mode is restored
    if kind == "stage":  # WSMS: all stages end at the same spatial size
        assert len({tuple(f.maps.shape[1:]) for f in maps}) == 1
    if kind == "rate":  # the two rates of one layer see the same input with different dilation
        a, b = maps[0].maps, maps[1].maps
        assert a.shape == b.shape and not torch.allclose(a, b)


def test_rate_maps_match_a_manual_dilated_conv(digits):
    """The rate-2 map is exactly the shared kernels applied with dilation 2."""
    m = create_model("msws_resnet_digits", sharing="shared").eval()
    conv = m.trunk.stages[0][0].conv2
    seen = {}
    h = conv.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
    maps = feature_maps(m, digits[0][0], kinds=["rate"])
    h.remove()
    ref = torch.nn.functional.conv2d(seen["x"], conv.weight, None, 1, 2, 2)[0]
    torch.testing.assert_close(maps[1].maps, ref)


def test_feature_maps_leave_no_hooks_even_on_error(digits):
    m = create_model("resnet_digits")
    feature_maps(m, digits[0][0])
    assert all(not mod._forward_hooks for mod in m.modules())
    with pytest.raises(WsvizError):
        feature_maps(m, digits[0][0], names=["no.such.tap"])
    with pytest.raises(WsvizError, match="5-channel"):
        feature_maps(m, torch.zeros(5, 28, 28))  # 5 channels cannot be fitted
    assert all(not mod._forward_hooks for mod in m.modules())


# ------------------------------------------------------------------------------- sweeps
def test_rescale_keeps_size_and_identity():
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(rescale(x, 1.0), x)
    for f in (0.3, 0.5, 1.5, 2.0):
        assert rescale(x, f).shape == x.shape
    small = rescale(torch.ones(1, 1, 28, 28), 0.5)
    assert small[0, 0, 14, 14] == 1 and small[0, 0, 0, 0] == 0 and small.sum() == pytest.approx(14 * 14, abs=1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(1, 40), w=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_rescale_at_factor_one_and_rotate_at_zero_are_the_identity(n, c, h, w, seed):
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(rescale(x, 1.0), x) and torch.equal(rotate(x, 0.0), x) and torch.equal(rotate(x, 360.0), x)


def test_scale_sweep_meaning(trained_resnet, digits):
    x, y = digits
    other = create_model("resnet_digits", base_width=8, depth=8).eval()
    res = scale_sweep({"trained": trained_resnet, "untrained": other}, x, y, scales=(0.4, 0.7, 1.0))
    assert res.agreement["trained"][2] == 1.0 and res.agreement["untrained"][2] == 1.0
    base_acc = (predict(trained_resnet, x)[0] == y).float().mean().item()
    assert res.accuracy["trained"][2] == pytest.approx(base_acc)
    assert res.accuracy["trained"][2] > 0.6 > res.accuracy["untrained"][2]
    assert res.accuracy["trained"][0] < res.accuracy["trained"][2]  # shrinking to 0.4 hurts a plain CNN
    assert len(res.rows()) == 6 and set(res.rows()[0]) == {"scale", "model", "accuracy", "agreement"}


def test_rotation_sweep_c4_equal_at_0_and_90_plain_cnn_not(digits, trained_resnet):
    x, y = digits
    torch.manual_seed(0)
    c4 = create_model("steerable_rotmnist", N=4, width=0.25).eval()
    res = rotation_sweep({"c4": c4, "cnn": trained_resnet}, x, y, angles=(0, 90, 180, 270, 45))
    p = res.predictions
    assert (p["c4"][0] == p["c4"][1]).all() and (p["c4"][0] == p["c4"][2]).all()
    assert res.accuracy["c4"][0] == res.accuracy["c4"][1] == res.accuracy["c4"][3]
    assert res.agreement["c4"][1] == 1.0
    assert res.agreement["cnn"][1] < 0.8  # a plain CNN's predictions change under rotation
    assert res.accuracy["cnn"][1] < res.accuracy["cnn"][0]


def test_single_image_stability(trained_resnet, digits):
    x, y = digits
    st = single_image_stability(trained_resnet, x[0], [0, 30, 60, 90], "angle")
    assert st.predicted.shape == (4,) and np.allclose(st.probabilities.sum(1), 1, atol=1e-5)
    assert st.predicted[0] == predict(trained_resnet, x[:1])[0].item()
    st2 = single_image_stability(trained_resnet, x[0], [0.5, 1.0], "scale")
    assert st2.predicted[1] == st.predicted[0]
    with pytest.raises(WsvizError):
        single_image_stability(trained_resnet, x[0], [1], "shear")


def test_layer_scale_invariance(trained_resnet, digits):
    x, _ = digits
    inv1 = layer_scale_invariance(trained_resnet, x[:32], 1.0)
    assert np.allclose(inv1.error, 0, atol=1e-6)
    inv = layer_scale_invariance(trained_resnet, x[:32], 0.6)
    assert len(inv.error) == 3 and (inv.error > 0.05).all()
    ws = layer_scale_invariance(create_model("wsms_resnet_digits"), x[:16], 0.5, kinds=["stage"])
    assert len(ws.error) == 3
