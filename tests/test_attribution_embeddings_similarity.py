"""Attributions, penultimate embeddings and CKA on real (small) models and real digits.

The checks are about meaning: saliency is the input gradient, Integrated Gradients adds up to
the logit difference, Grad-CAM lights up where a model's evidence is, projections of a trained
model's features separate the classes, CKA has its invariances.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from wsviz.analysis.attribution import METHODS, attribute
from wsviz.analysis.embeddings import penultimate_features, project
from wsviz.analysis.similarity import cka_matrix, layer_features, linear_cka
from wsviz.data.datasets import load_split
from wsviz.errors import WsvizError
from wsviz.models import create_model, list_taps
from wsviz.models.sharing import Tap
from wsviz.training.loop import TrainConfig, train


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: its work is small batches, where a second OpenMP
    thread gains little and, on a busy 2-core machine, spin-waiting made the module ~2x slower
    (measured: 26-30 s with 1 thread vs 43-52 s with 2 beside a training job). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def test_split():
    # The split is sorted by class: a stride gives every class (20 per class here).
    te = load_split("mnist5k", "test")
    return te.images[::5], te.labels[::5]


@pytest.fixture(scope="module")
def trained(test_split):
    """resnet_digits (width 8, depth 8) after one epoch on mnist5k: a model that has learnt something."""
    torch.manual_seed(0)
    model = create_model("resnet_digits", base_width=8, depth=8)
    tr = load_split("mnist5k", "train")
    x, y = test_split
    train(model, (tr.images, tr.labels), (x[::2], y[::2]), TrainConfig(epochs=1, batch_size=64, lr=0.05))
    return model.eval()


@pytest.fixture(scope="module")
def steerable():
    torch.manual_seed(0)
    return create_model("steerable_rotmnist", N=4, width=0.25)


@pytest.fixture(scope="module")
def msws():
    torch.manual_seed(0)
    return create_model("msws_resnet_digits", depth=8, base_width=8)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


class EvidenceModel(nn.Module):
    """A model whose evidence is known: class 0 = bright ink, class 1 = dark background.

    Channel 0 of the conv is a positive 3x3 mean (fires on ink), channel 1 fires where the local
    mean is below 0.5 (background); both are pooled to 14x14 (the ``level`` tap, so Grad-CAM must
    upsample), globally averaged and read by an identity classifier.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[0].fill_(1 / 9)
            self.conv.weight[1].fill_(-1 / 9)
            self.conv.bias.copy_(torch.tensor([0.0, 0.5]))
        self.pool = nn.AvgPool2d(2)
        self.level = Tap("level", "pooled")
        self.embedding = Tap("embedding", "pooled means")
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()
        self.wsviz_config = {"in_channels": 1, "input_size": 28, "num_classes": 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.level(self.pool(F.relu(self.conv(x))))
        return self.fc(self.embedding(a.mean((2, 3))))


def _quadrant_digits(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits shrunk to 14x14 and put in quadrant i % 4 of a black 28x28 canvas, and the quadrant masks."""
    small = F.interpolate(images, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.zeros(len(images), 1, 28, 28)
    masks = torch.zeros(len(images), 28, 28, dtype=torch.bool)
    for i in range(len(images)):
        r, c = 14 * ((i % 4) // 2), 14 * (i % 2)
        canvas[i, :, r:r + 14, c:c + 14] = small[i]
        masks[i, r:r + 14, c:c + 14] = True
    return canvas, masks


# -------------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("which", ["trained", "steerable", "msws"])
def test_saliency_is_the_absolute_input_gradient_of_the_target_logit(which, request, test_split):
    model = request.getfixturevalue(which)
    x = test_split[0][::50]  # 4 digits of different classes
    targets = torch.tensor([3, 1, 7, 0])
    res = attribute(model, x, "saliency", target=targets)
    model.eval()
    xg = x.clone().requires_grad_(True)
    model(xg)[torch.arange(4), targets].sum().backward()
    torch.testing.assert_close(res.raw, xg.grad.abs())
    torch.testing.assert_close(res.maps, xg.grad.abs().amax(1))
    assert torch.equal(res.targets, targets)


def test_default_target_is_the_predicted_class(trained, test_split):
    x = test_split[0][::25]
    res = attribute(trained, x, "saliency")
    assert torch.equal(res.targets, _logits(trained, x).argmax(1))
    assert torch.equal(attribute(trained, x, "saliency", target=4).targets, torch.full((len(x),), 4))


def test_integrated_gradients_add_up_to_the_logit_difference(trained, test_split):
    x = test_split[0][5::40]
    res = attribute(trained, x, "integrated_gradients", ig_steps=64)
    t = res.targets
    idx = torch.arange(len(x))
    diff = _logits(trained, x)[idx, t] - _logits(trained, torch.zeros_like(x))[idx, t]
    total = res.raw.sum((1, 2, 3))
    assert diff.abs().min() > 0.5  # a non-trivial check
    torch.testing.assert_close(total, diff, rtol=0.03, atol=0.05)
    torch.testing.assert_close(res.maps.sum((1, 2)), total, rtol=1e-4, atol=1e-4)  # maps sum the channels
    torch.testing.assert_close(res.convergence_delta, total - diff, rtol=0, atol=1e-3)


def test_grad_cam_concentrates_where_the_evidence_is(test_split):
    model = EvidenceModel()
    x, inside = _quadrant_digits(test_split[0][::25])
    ink = attribute(model, x, "grad_cam", target=0)
    background = attribute(model, x, "grad_cam", target=1)
    assert ink.layer == "level" and ink.maps.shape == (len(x), 28, 28)
    for i in range(len(x)):
        m_in, m_out = ink.maps[i][inside[i]].mean(), ink.maps[i][~inside[i]].mean()
        assert m_in > 10 * m_out  # the ink class looks at the quadrant with the digit
        b_in, b_out = background.maps[i][inside[i]].mean(), background.maps[i][~inside[i]].mean()
        assert b_out > b_in  # the background class looks elsewhere
    # Grad-CAM of class 0 is the ink channel, upsampled: its peak lies on the digit.
    peaks = ink.maps.flatten(1).argmax(1)
    assert all(inside[i].flatten()[p] for i, p in enumerate(peaks))


@pytest.mark.parametrize("which", ["trained", "steerable", "msws"])
def test_grad_cam_has_input_size_is_non_negative_and_depends_on_image_and_target(which, request, test_split):
    model = request.getfixturevalue(which)
    x = test_split[0][::50]
    hooks = _hook_count(model)
    res = attribute(model, x, "grad_cam")
    assert res.layer == list_taps(model, "level")[-1].name
    assert res.maps.shape == (4, 28, 28) and res.raw is None
    assert (res.maps >= 0).all() and torch.isfinite(res.maps).all()
    assert not torch.allclose(res.maps[0], res.maps[1])  # differs across images
    other = attribute(model, x, "grad_cam", target=(res.targets + 1) % 10)
    assert not torch.allclose(res.maps, other.maps)  # the explained class matters
    early = attribute(model, x, "grad_cam", layer=list_taps(model, "level")[0].name)
    assert early.maps.shape == (4, 28, 28)
    assert _hook_count(model) == hooks


def test_attributions_work_on_the_steerable_model(steerable, test_split):
    x = test_split[0][::50]
    steerable.train()  # e2cnn's R2Conv caches its filter in eval mode; the mode must come back cleanly
    try:
        for method in METHODS:
            res = attribute(steerable, x, method, ig_steps=16)
            assert res.maps.shape == (4, 28, 28) and torch.isfinite(res.maps).all()
            assert res.targets.shape == (4,) and res.maps.abs().sum() > 0
        assert all(m.training for m in steerable.modules())
        from e2cnn import nn as enn

        convs = [m for m in steerable.modules() if isinstance(m, enn.R2Conv)]
        assert convs and not any(hasattr(m, "filter") for m in convs)  # R2Conv's eval-mode cache is gone
    finally:
        steerable.eval()


@pytest.mark.parametrize("method", METHODS)
def test_chunking_gives_the_same_result_as_one_batch(method, msws, test_split):
    x = test_split[0][3::20]  # 10 images
    one = attribute(msws, x, method, batch_size=16, ig_steps=16)
    chunked = attribute(msws, x, method, batch_size=3, ig_steps=16)
    assert torch.equal(one.targets, chunked.targets)
    torch.testing.assert_close(chunked.maps, one.maps, rtol=1e-4, atol=1e-5)


def test_the_model_mode_is_restored_even_when_attribution_fails(msws, test_split):
    x = test_split[0][:2]
    msws.train()
    msws.head.eval()  # a mixed-mode model keeps each module's own flag
    flags = [m.training for m in msws.modules()]
    attribute(msws, x, "grad_cam")
    assert [m.training for m in msws.modules()] == flags

    def boom(module, args):
        raise RuntimeError("boom")

    hooks = _hook_count(msws)
    handle = msws.head.fc.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attribute(msws, x, "grad_cam", target=1)
        assert [m.training for m in msws.modules()] == flags
        assert _hook_count(msws) == hooks + 1  # only ours is left
    finally:
        handle.remove()
        msws.eval()


def test_bad_method_layer_or_target_raise_wsviz_errors(msws, test_split):
    x = test_split[0][:2]
    with pytest.raises(WsvizError, match="integrated_gradients, saliency, grad_cam"):
        attribute(msws, x, "lime")
    with pytest.raises(WsvizError, match=list_taps(msws, "level")[-1].name):  # names the level taps
        attribute(msws, x, "grad_cam", layer="trunk.nope")
    with pytest.raises(WsvizError, match="spatial"):
        attribute(msws, x, "grad_cam", layer="head.embedding")
    with pytest.raises(WsvizError, match="0..9"):
        attribute(msws, x, "saliency", target=10)
    with pytest.raises(WsvizError, match="one per image"):
        attribute(msws, x, "saliency", target=torch.tensor([1, 2, 3]))
    with pytest.raises(WsvizError, match=r"\(N, C, H, W\)"):
        attribute(msws, x[0], "saliency")
    with pytest.raises(WsvizError, match="create_model"):
        attribute(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x, "saliency")
    assert _hook_count(msws) == 0


# --------------------------------------------------------------------------------- embeddings
def test_penultimate_features_are_what_the_classifier_reads(trained, steerable, test_split):
    x = test_split[0][::10]
    f = penultimate_features(trained, x, batch_size=32)
    assert f.shape == (len(x), trained.head.fc.in_features) and f.dtype == np.float32
    logits = _logits(trained, x)
    torch.testing.assert_close(trained.head.fc(torch.from_numpy(f)).detach(), logits, rtol=1e-4, atol=1e-4)
    g = penultimate_features(steerable, x[:8])
    assert g.shape == (8, steerable.fully_net[0].in_features)
    assert _hook_count(trained) == 0 and _hook_count(steerable) == 0


def test_projections_are_seeded_and_subsample_within_range(trained, test_split):
    f = penultimate_features(trained, test_split[0])
    pca = project(f, "pca", n_components=3)
    ev = pca.explained_variance
    assert pca.coords.shape == (len(f), 3) and np.all(np.diff(ev) <= 0) and 0 < ev.sum() <= 1
    np.testing.assert_array_equal(pca.index, np.arange(len(f)))
    a, b = project(f, "tsne", max_points=60, seed=1), project(f, "tsne", max_points=60, seed=1)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.index, b.index)
    assert a.coords.shape == (60, 2) and a.explained_variance is None
    assert len(np.unique(a.index)) == 60 and a.index.min() >= 0 and a.index.max() < len(f)
    assert not np.array_equal(project(f, "pca", max_points=60, seed=2).index, a.index)


def test_projections_of_a_trained_model_separate_the_classes(trained, test_split):
    x, y = test_split
    f = penultimate_features(trained, x)  # 200 digits, 20 per class
    for method in ("pca", "tsne", "umap"):
        p = project(f, method, seed=0)
        assert p.coords.shape == (200, 2) and np.isfinite(p.coords).all()
        acc = cross_val_score(KNeighborsClassifier(5), p.coords, y.numpy()[p.index], cv=5).mean()
        assert acc > 0.3, (method, acc)  # chance is 0.1


def test_bad_projection_requests_raise_wsviz_errors():
    f = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(WsvizError, match="pca, tsne, umap"):
        project(f, "lda")
    with pytest.raises(WsvizError, match="at least 3"):
        project(f[:2])
    with pytest.raises(WsvizError, match="NaN"):
        project(np.full((5, 3), np.nan))


# --------------------------------------------------------------------------------------- CKA
def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_cka_of_a_representation_with_itself_is_one_and_matches_the_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = x @ rng.normal(size=(20, 30)) + rng.normal(size=(300, 30))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(_reference_cka(x, y), rel=1e-10)  # feature form
    small, wide = x[:20], rng.normal(size=(20, 100))
    assert linear_cka(small, wide) == pytest.approx(_reference_cka(small, wide), rel=1e-10)  # Gram form
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        linear_cka(x, y), rel=1e-5)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling_only():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 30))
    y = np.tanh(x @ rng.normal(size=(30, 40))) + 0.5 * rng.normal(size=(200, 40))
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    base = linear_cka(x, y)
    assert linear_cka(3.7 * x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 5.0, 0.01 * y) == pytest.approx(base, rel=1e-10)  # centring, scaling
    stretched = x * np.linspace(0.1, 10, 30)  # an anisotropic scaling is not an invariance
    assert abs(linear_cka(stretched, y) - base) > 0.01


def _brute_force_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC by its definition, with explicit loops over pairs of examples: tr(K H L H) / sqrt(...)."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k = np.array([[float(np.dot(x[i], x[j])) for j in range(n)] for i in range(n)])
    m = np.array([[float(np.dot(y[i], y[j])) for j in range(n)] for i in range(n)])
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 24), p=st.integers(1, 30), q=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(1e-3, 1e3))
def test_cka_laws(n, p, q, seed, scale):
    """On random features of any shape (both the feature and the Gram form): CKA is 1 on itself,
    lies in [0, 1], is symmetric, invariant to orthogonal transforms and isotropic scaling, and
    equals HSIC computed by brute force."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    y = np.tanh(x @ rng.normal(size=(p, q))) + rng.normal(size=(n, q))
    qx, _ = np.linalg.qr(rng.normal(size=(p, p)))
    base = linear_cka(x, y)
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-9)
    assert -1e-12 <= base <= 1 + 1e-12
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert linear_cka(scale * x @ qx, y) == pytest.approx(base, rel=1e-7, abs=1e-12)
    assert base == pytest.approx(_brute_force_cka(x, y), rel=1e-7, abs=1e-12)


def test_cka_edge_cases_and_messages():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    v = rng.normal(size=6)
    assert linear_cka(v, 2 * v - 1) == pytest.approx(1.0)  # 1-D input is one feature
    assert linear_cka(v, v ** 2) == pytest.approx(_reference_cka(v[:, None], v[:, None] ** 2), rel=1e-9)
    assert linear_cka(x[:2], y[:2]) == pytest.approx(1.0)  # two examples are enough (and always aligned)
    with warnings.catch_warnings():  # a constant representation is NaN by the rule, not by dividing 0 by 0
        warnings.simplefilter("error")
        assert np.isnan(linear_cka(np.ones((6, 4)), y)) and np.isnan(linear_cka(x, np.full((6, 3), 2.0)))
    for scale in (1e200, 1e-170):  # no overflow, and no underflow to 0, in the sums of products
        assert linear_cka(scale * x, y) == pytest.approx(linear_cka(x, y), rel=1e-9)
        assert linear_cka(x[:, :1] * scale, y) == pytest.approx(linear_cka(x[:, :1], y), rel=1e-9)  # Gram form
    assert np.isnan(linear_cka(np.zeros((6, 0)), y))  # no features: as constant as it gets
    grad = torch.from_numpy(x).requires_grad_()  # a tensor still in an autograd graph
    assert linear_cka(grad, y) == pytest.approx(linear_cka(x, y), rel=1e-12)
    for args, message in (((x, y[:5]), "x and y must describe the same examples; got 6 and 5 rows."),
                          ((x[:1], y[:1]), "CKA needs at least 2 examples, got 1."),
                          ((np.float64(3.0), y), "x must have one row per example, got a scalar."),
                          ((x, np.float64(3.0)), "y must have one row per example, got a scalar."),
                          ((x, np.full((6, 3), np.nan)), "y contains NaN or infinite values (a diverged model?); "
                                                         "CKA is undefined."),
                          ((np.full((6, 3), np.inf), y), "x contains NaN or infinite values")):
        with pytest.raises(WsvizError) as info:
            linear_cka(*args)
        assert str(info.value).startswith(message), str(info.value)


def test_cka_matrix_taps_constant_layers_and_image_count():
    model = create_model("resnet_digits", base_width=8, depth=8).eval()
    zeroed = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.endswith("conv2"))
    with torch.no_grad():  # its output is 0 on every image; the block's shortcut carries the signal on
        model.get_submodule(zeroed).weight.zero_()
    x = load_split("mnist5k", "test").images[:6]
    with warnings.catch_warnings():  # the constant layer's NaN comes from the rule, not from dividing 0 by 0
        warnings.simplefilter("error")
        res = cka_matrix(model, model, x, taps_a=[zeroed, "head.embedding"], taps_b=["head.embedding"])
    assert res.taps_a == [zeroed, "head.embedding"] and res.taps_b == ["head.embedding"]
    assert np.isnan(res.matrix[0, 0]) and res.matrix[1, 0] == pytest.approx(1.0)
    assert cka_matrix(model, model, x[:2], taps_a=["head.embedding"], taps_b=["head.embedding"]).matrix.shape == (1, 1)
    with pytest.raises(WsvizError, match=r"^CKA needs at least 2 images, got 1\.$"):
        cka_matrix(model, model, x[:1])
    with pytest.raises(WsvizError, match=r"^This model has no 'level' or 'embedding' taps; pass taps= module paths "
                                         r"to compare\.$"):
        cka_matrix(nn.Sequential(nn.Conv2d(1, 2, 3)), model, x)


def test_cka_matrix_of_a_dataset_reads_a_seeded_subset_in_the_batches_it_is_given(monkeypatch):
    """A dataset is read at a fixed random subset of ``max_images`` (said so in the result), with the
    caller's batch size and loader workers (recorded on the way to the feature capture)."""
    from torch.utils.data import TensorDataset

    import wsviz.analysis.similarity as similarity
    from wsviz.data.stream import eval_data, sample_indices

    calls = []
    capture = similarity.capture_outputs

    def recording(model, images, taps, batch_size=128, *, workers=0):
        calls.append((len(images), batch_size, workers))
        return capture(model, images, taps, batch_size, workers=0)  # read in this process all the same

    monkeypatch.setattr(similarity, "capture_outputs", recording)
    model = create_model("resnet_digits", base_width=8, depth=8).eval()
    torch.manual_seed(1)
    other = create_model("resnet_digits", base_width=8, depth=8).eval()
    digits = load_split("mnist5k", "test")
    x = digits.images[:30]
    taps = ["trunk.stages.1.1", "head.embedding"]
    idx = sample_indices(30, 10, 3)
    for data in (TensorDataset(x, digits.labels[:30]), eval_data("mnist5k", limit=30)):
        calls.clear()
        res = cka_matrix(model, other, data, taps_a=taps, taps_b=taps[1:], max_images=10, seed=3, batch_size=4,
                         workers=2)
        assert calls == [(10, 4, 2), (10, 4, 2)]
        images = data.tensors[0] if isinstance(data, TensorDataset) else data.tensors()[0]
        ref = cka_matrix(model, other, images[idx], taps_a=taps, taps_b=taps[1:])
        assert calls[2:] == [(10, 128, 0), (10, 128, 0)]  # the defaults, for a tensor used whole
        assert (res.images, res.subset) == (10, "10 of 30 images (a seeded random subset, seed 3)")
        np.testing.assert_allclose(res.matrix, ref.matrix, rtol=1e-12)
        assert (ref.images, ref.subset) == (10, "")
        whole = cka_matrix(model, model, data, taps_a=taps, taps_b=taps, max_images=30)
        assert (whole.images, whole.subset) == (30, "")  # max_images covers the data: all of it, no subset
        assert calls[4:] == [(30, 128, 0)]  # one model with itself: its features are read once
    for bad in (1, 2.5, "10"):
        with pytest.raises(WsvizError, match=rf"^max_images must be a whole number of at least 2, got {bad!r}\.$"):
            cka_matrix(model, model, data, max_images=bad)
    assert cka_matrix(model, model, data, taps_a=taps, taps_b=taps, max_images=2).images == 2
    layer_features(model, x[:5], taps)
    assert calls[-1] == (5, 128, 0)  # layer_features' defaults
    # by default a dataset is read at 1,000 images drawn with seed 0 (a tiny model: 1,002 images of 2 x 2 pixels)
    from wsviz import adopt

    tiny = adopt(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), input_shape=(1, 2, 2))
    many = torch.randn(1002, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    res = cka_matrix(tiny, tiny, TensorDataset(many, torch.zeros(1002)), taps_a=["1"], taps_b=["1"])
    assert (res.images, res.subset) == (1000, "1,000 of 1,002 images (a seeded random subset, seed 0)")
    assert calls[-1] == (1000, 128, 0)


def test_cka_matrix_logs_its_shape_and_image_count(caplog):
    from wsviz import adopt

    model = adopt(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()), input_shape=(1, 2, 2))
    with caplog.at_level(logging.DEBUG, logger="wsviz.analysis.similarity"):
        cka_matrix(model, model, torch.randn(7, 1, 2, 2), taps_a=["1", "2"], taps_b=["2"])
    assert [r.getMessage() for r in caplog.records if r.name == "wsviz.analysis.similarity"] == [
        "CKA matrix (2, 1) over 7 images"]


def test_cka_of_unrelated_features_is_small():
    rng = np.random.default_rng(2)
    values = [linear_cka(rng.normal(size=(500, 50)), rng.normal(size=(500, 50))) for _ in range(5)]
    # E[CKA] ~ pq n / sqrt((n p^2 + n^2 p)(n q^2 + n^2 q)) = 0.09 for independent Gaussians.
    assert max(values) < 0.15 and min(values) > 0.05
    x = rng.normal(size=(500, 50))
    assert linear_cka(x, x @ rng.normal(size=(50, 50)) + 0.1 * rng.normal(size=(500, 50))) > 0.5


def test_cka_matrix_of_a_model_with_itself(msws, trained, test_split):
    x = test_split[0][::2]  # 100 digits
    res = cka_matrix(msws, msws, x)
    expected = [t.name for t in list_taps(msws, "level")] + ["head.embedding"]
    assert res.taps_a == expected and res.taps_b == expected
    assert res.matrix.shape == (4, 4)
    np.testing.assert_allclose(np.diag(res.matrix), 1.0, atol=1e-10)
    np.testing.assert_allclose(res.matrix, res.matrix.T, atol=1e-12)
    assert np.all((res.matrix > 0) & (res.matrix <= 1 + 1e-12))
    # Between two different models: rectangular, and equal to linear_cka of the layer features.
    cross = cka_matrix(trained, msws, x, taps_b=["head.embedding"])
    assert cross.matrix.shape == (4, 1)
    fa = layer_features(trained, x, ["trunk.stages.0.1"])["trunk.stages.0.1"]
    fb = layer_features(msws, x, ["head.embedding"])["head.embedding"]
    assert cross.matrix[0, 0] == pytest.approx(linear_cka(fa, fb), rel=1e-6)


def test_layer_features_are_flattened_outputs_and_leave_no_hooks(steerable, test_split):
    x = test_split[0][:6]
    names = [t.name for t in list_taps(steerable, "level")][:2] + ["embedding"]
    feats = layer_features(steerable, x, names, batch_size=4)
    steerable.eval()
    from e2cnn import nn as enn

    with torch.no_grad():
        first = steerable.blocks[0](steerable.prepare(enn.GeometricTensor(x, steerable.input_type))).tensor
    np.testing.assert_allclose(feats[names[0]], first.reshape(6, -1).numpy(), rtol=1e-5, atol=1e-5)
    assert feats["embedding"].shape == (6, steerable.fully_net[0].in_features)
    assert _hook_count(steerable) == 0
    with pytest.raises(WsvizError, match="taps.0"):
        layer_features(steerable, x, ["no.such.layer"])
