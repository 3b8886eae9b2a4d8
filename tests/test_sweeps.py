"""Sweeps on tiny hand-made models whose answers are known: every number checked against a
brute-force loop (transform, run the model, compare) or a closed form. Fast: no training, no data files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from wsviz import WsvizError
from wsviz.analysis.cache import PredictionCache, model_hash
from wsviz.analysis.streaming import data_ident
from wsviz.analysis.sweeps import (
    SweepResult,
    invariance_per_model,
    label_mismatch,
    layer_scale_invariance,
    model_label_mismatch,
    predict,
    rotation_sweep,
    scale_sweep,
    single_image_stability,
)
from wsviz.data.resample import rescale, rotate
from wsviz.models.sharing import Tap

SIZE = 8


class Linear(nn.Module):
    """A fixed random linear classifier of (channels, SIZE, SIZE) images; counts its forward passes."""

    def __init__(self, classes: int = 3, channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, channels * SIZE * SIZE, generator=g))
        self.wsviz_config = {"in_channels": channels, "input_size": SIZE, "num_classes": classes}
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        return x.flatten(1) @ self.weight.T


class LeftRight(nn.Module):
    """Class 0 when the left half of the image is brighter, else class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.wsviz_config = {"in_channels": 1, "input_size": SIZE, "num_classes": 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return self.gain * torch.stack([x[..., :h].sum((1, 2, 3)), x[..., h:].sum((1, 2, 3))], 1)


def images(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 bright blocks off the vertical centre line, labelled with their half (0 left, 1 right)."""
    xs, ys = [], []
    for r in (0, 3, 6):
        for c in (0, 1, 5, 6):
            x = torch.zeros(1, SIZE, SIZE)
            x[0, r:r + 2, c:c + 2] = 1
            xs.append(x)
            ys.append(0 if c < SIZE // 2 else 1)
    return torch.stack(xs), torch.tensor(ys)


def brute(model: nn.Module, x: torch.Tensor, op, v: float) -> np.ndarray:
    with torch.no_grad():
        return model(op(x, v)).argmax(1).numpy()


# ---------------------------------------------------------------------------------- predict
def test_predict_is_argmax_and_softmax_over_batches_in_eval_mode():
    m = Linear()
    x = images(7)
    pred, prob = predict(m, x, batch_size=3)
    with torch.no_grad():
        out = m(x)
    assert m.calls == 4 and m.modes[:3] == [False] * 3 and m.training  # 3 + 3 + 1 images, then restored
    torch.testing.assert_close(prob, out.softmax(1))
    assert torch.equal(pred, out.argmax(1)) and pred.dtype == torch.long and prob.dtype == torch.float32


def test_predict_default_batch_is_512_images():
    m = Linear()
    predict(m, torch.zeros(513, 1, SIZE, SIZE))
    assert m.calls == 2  # 512 + 1
    m.calls = 0
    predict(m, torch.zeros(512, 1, SIZE, SIZE))
    assert m.calls == 1


def test_predict_fits_the_images_to_the_model():
    m = Linear(channels=3)
    x = images(4)  # 1 channel at 8x8 for a 3-channel model: repeated
    pred, prob = predict(m, x.double().float())
    with torch.no_grad():
        out = m(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(prob, out.softmax(1))
    small = images(2)[:, :, 1:7, 1:7]  # 6x6: zero-padded to 8x8
    with torch.no_grad():
        ref = m(torch.nn.functional.pad(small, (1, 1, 1, 1)).expand(-1, 3, -1, -1)).softmax(1)
    torch.testing.assert_close(predict(m, small)[1], ref)


# ----------------------------------------------------------------------------------- sweeps
def test_scale_sweep_against_brute_force():
    models = {"a": Linear(seed=0), "b": Linear(seed=5)}
    x = images(12)
    y = torch.tensor([0, 1, 2] * 4)
    scales = (0.5, 1.0, 1.5, 0.75)
    res = scale_sweep(models, x, y, scales=scales, batch_size=5)
    assert res.parameter == "scale" and res.values.tolist() == list(scales) and res.values.dtype == np.float64
    assert (res.samples, res.shares, res.cached) == (12, [12], 0)
    assert list(res.accuracy) == list(res.agreement) == list(res.predictions) == ["a", "b"]
    for name, m in models.items():
        base = brute(m, x, rescale, 1.0)
        want = np.stack([brute(m, x, rescale, s) for s in scales])
        assert np.array_equal(res.predictions[name], want)
        np.testing.assert_allclose(res.agreement[name], (want == base).mean(1))
        np.testing.assert_allclose(res.accuracy[name], (want == y.numpy()).mean(1))
        assert res.agreement[name][1] == 1.0
        assert res.agreement[name].min() < 1  # the transformed images do change some predictions


def test_rotation_sweep_against_brute_force_and_closed_form():
    x, y = blocks()
    lr, lin = LeftRight(), Linear()
    angles = (0, 90, 180, 360, 45)
    res = rotation_sweep({"lr": lr, "lin": lin}, x, y, angles=angles, batch_size=5)
    assert res.parameter == "angle" and res.values.tolist() == [0.0, 90.0, 180.0, 360.0, 45.0]
    # closed form: every block is in the half its label names; half a turn puts it in the other one
    assert res.accuracy["lr"].tolist()[:4] == [1.0, res.accuracy["lr"][1], 0.0, 1.0]
    assert res.agreement["lr"].tolist()[:4] == [1.0, res.agreement["lr"][1], 0.0, 1.0]
    for name, m in (("lr", lr), ("lin", lin)):
        want = np.stack([brute(m, x, rotate, a) for a in angles])
        assert np.array_equal(res.predictions[name], want)
        np.testing.assert_allclose(res.agreement[name], (want == want[0]).mean(1))
        np.testing.assert_allclose(res.accuracy[name], (want == y.numpy()).mean(1))
    assert 0 < res.agreement["lin"][1] < 1


def test_agreement_is_with_the_untransformed_prediction_not_the_first_value():
    x = images(12)
    m = Linear()
    res = scale_sweep({"m": m}, x, scales=(0.5, 0.6))
    base = brute(m, x, rescale, 1.0)
    want = np.stack([brute(m, x, rescale, s) for s in (0.5, 0.6)])
    np.testing.assert_allclose(res.agreement["m"], (want == base).mean(1))
    assert res.agreement["m"][0] < 1
    res = rotation_sweep({"m": m}, x, angles=(30, 60))
    want = np.stack([brute(m, x, rotate, a) for a in (30, 60)])
    np.testing.assert_allclose(res.agreement["m"], (want == brute(m, x, rotate, 0.0)).mean(1))


def test_without_labels_accuracy_is_nan_and_agreement_still_counts():
    x, _ = blocks()
    res = rotation_sweep({"lr": LeftRight()}, x, angles=(0, 180))
    assert np.isnan(res.accuracy["lr"]).all() and res.accuracy["lr"].shape == (2,)
    assert res.agreement["lr"].tolist() == [1.0, 0.0]


def test_default_values():
    x, y = blocks()
    res = scale_sweep({"lr": LeftRight()}, x, y)
    assert res.values.tolist() == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4]
    res = rotation_sweep({"lr": LeftRight()}, x, y)
    assert res.values.tolist() == [float(a) for a in range(0, 361, 15)]
    assert res.accuracy["lr"][12] == 0.0 and res.accuracy["lr"][0] == res.accuracy["lr"][24] == 1.0


@pytest.mark.parametrize("sweep", [scale_sweep, rotation_sweep])
def test_default_batch_is_512_images(sweep):
    m = Linear()
    sweep({"m": m}, torch.zeros(513, 1, SIZE, SIZE), **{"scales" if sweep is scale_sweep else "angles": (0.5,)})
    assert m.calls == 4  # two batches (512 + 1), each at the value and untransformed


@pytest.mark.parametrize("sweep,values", [(scale_sweep, {"scales": (0.5,)}), (rotation_sweep, {"angles": (90,)})])
def test_sweeps_pass_on_batch_size_progress_loader_and_workers(sweep, values):
    x = images(5)
    calls = []
    res = sweep({"m": Linear()}, x, batch_size=2, progress=lambda *a: calls.append(a), **values)
    assert len(calls) == 6 and calls[-1][:2] == (10, 10)  # 3 batches x (the value, untransformed)
    with pytest.raises(WsvizError, match="loader must be one of"):
        sweep({"m": Linear()}, x, loader="nope", **values)
    with pytest.raises(ValueError, match="num_workers"):
        sweep({"m": Linear()}, x, loader="stream", workers=-1, **values)
    assert res.samples == 5


@pytest.mark.parametrize("sweep,values,keys", [
    (scale_sweep, (0.5, 1.0), ["rescale=0.5", "identity"]),
    (rotation_sweep, (90, 0, 360, -360), ["rotate=90.0", "identity"]),
])
def test_sweeps_cache_their_predictions_under_the_documented_keys(tmp_path, sweep, values, keys):
    x = images(6)
    m = Linear()
    cache = PredictionCache(tmp_path)
    kw = {"scales" if sweep is scale_sweep else "angles": values}
    first = sweep({"m": m}, x, cache=cache, **kw)
    assert first.cached == 0
    again = sweep({"m": m}, x, cache=cache, **kw)
    assert again.cached == len(keys)  # 0, 360 and -360 degrees are the untransformed images: one entry
    assert np.array_equal(again.predictions["m"], first.predictions["m"])
    stored = sorted(p.stem for p in tmp_path.rglob("*.npy"))
    assert stored == sorted(cache.key(model_hash(m), *data_ident(x), k) for k in keys)


def test_a_scale_of_360_is_not_the_identity():
    x = images(6)
    m = Linear()
    res = scale_sweep({"m": m}, x, scales=(360.0,))
    assert np.array_equal(res.predictions["m"][0], brute(m, x, rescale, 360.0))
    assert not np.array_equal(res.predictions["m"][0], brute(m, x, rescale, 1.0))


@pytest.mark.parametrize("sweep,word", [(scale_sweep, "scale"), (rotation_sweep, "angle")])
def test_sweep_messages(sweep, word):
    with pytest.raises(WsvizError, match=r"^Choose at least one model for the sweep\.$"):
        sweep({}, images(2))
    kw = {"scales" if sweep is scale_sweep else "angles": ()}
    with pytest.raises(WsvizError, match=rf"^Give at least one {word} value for the sweep\.$"):
        sweep({"m": Linear()}, images(2), **kw)


def test_rows_are_long_format():
    res = SweepResult("scale", np.array([0.5, 1.0]), accuracy={"a": np.array([0.25, 1.0]), "b": np.array([0.5, 0.75])},
                      agreement={"a": np.array([0.5, 1.0]), "b": np.array([0.0, 1.0])})
    assert res.rows() == [
        {"scale": 0.5, "model": "a", "accuracy": 0.25, "agreement": 0.5},
        {"scale": 1.0, "model": "a", "accuracy": 1.0, "agreement": 1.0},
        {"scale": 0.5, "model": "b", "accuracy": 0.5, "agreement": 0.0},
        {"scale": 1.0, "model": "b", "accuracy": 0.75, "agreement": 1.0},
    ]
    assert all(type(v) is float for r in res.rows() for k, v in r.items() if k != "model")
    empty = SweepResult("angle", np.array([1.0]))
    assert (empty.samples, empty.shares, empty.cached, empty.predictions) == (0, [], 0, {})


# --------------------------------------------------------------------------- single image
@pytest.mark.parametrize("parameter,op,values", [("angle", rotate, [0, 90, 180, 45]),
                                                 ("scale", rescale, [0.5, 1.0, 1.5])])
def test_single_image_stability_against_brute_force(parameter, op, values):
    m = Linear()
    x = images(3)
    st = single_image_stability(m, x[2], values, parameter)
    with torch.no_grad():
        prob = torch.cat([m(op(x[2:3], float(v))) for v in values]).softmax(1)
    assert st.parameter == parameter and st.values.tolist() == [float(v) for v in values]
    assert st.values.dtype == np.float64
    np.testing.assert_allclose(st.probabilities, prob.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(st.predicted, prob.argmax(1).numpy())
    np.testing.assert_allclose(st.confidence, prob.max(1).values.numpy(), rtol=1e-5, atol=1e-6)
    assert len(set(st.predicted.tolist())) > 1  # the values do change the prediction here


def test_single_image_stability_takes_a_batch_or_uint8():
    m = Linear()
    x = images(3)
    first = single_image_stability(m, x, [0, 90])  # (N, C, H, W): its first image; "angle" by default
    assert np.array_equal(first.probabilities, single_image_stability(m, x[0], [0, 90], "angle").probabilities)
    q = (x[0] * 255).round().to(torch.uint8)
    st = single_image_stability(m, q, [0, 90])
    ref = single_image_stability(m, q.float() / 255, [0, 90])
    np.testing.assert_allclose(st.probabilities, ref.probabilities, rtol=1e-6)


def test_single_image_stability_message():
    with pytest.raises(WsvizError, match=r"^parameter must be 'angle' or 'scale', got 'shear'$"):
        single_image_stability(Linear(), images(1)[0], [1], "shear")


# ------------------------------------------------------------------------- layer invariance
class Tapped(nn.Module):
    """Taps whose commutation with rescaling is known: a pointwise map (exact), a shift (not),
    a pooled map (not), a stage tap and an embedding (not a map: skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(3.0))
        self.wsviz_config = {"in_channels": 1, "input_size": SIZE, "num_classes": 2}
        self.pointwise = Tap("level", "pointwise")
        self.shifted = Tap("level", "shifted")
        self.stage = Tap("stage", "pooled")
        self.unused = Tap("level", "never run")
        self.embedding = Tap("level", "flat")

    def forward(self, x):
        a = self.pointwise(self.gain * x)
        self.shifted(torch.roll(a, 1, dims=3))
        self.stage(nn.functional.avg_pool2d(a, 2))
        e = self.embedding(a.flatten(1))
        return e[:, :2]


def _relative(fx: torch.Tensor, ftx: torch.Tensor, s: float) -> float:
    """Mean over images of ||f(T x) - T f(x)|| / ||T f(x)||, one image at a time."""
    errs = []
    for u, v in zip(fx, ftx):
        tu = rescale(u[None].double(), s)[0]
        errs.append(float((v.double() - tu).norm() / tu.norm()))
    return float(np.mean(errs))


def test_layer_scale_invariance_by_hand():
    m = Tapped()
    x = images(7, seed=3)
    s = 0.6
    inv = layer_scale_invariance(m, x, s, kinds=["level"], batch_size=3)
    assert inv.scale == s and inv.taps == ["pointwise", "shifted"] and inv.labels == ["pointwise", "shifted"]
    a, ta = 3 * x, 3 * rescale(x, s)
    assert inv.error[0] == pytest.approx(0.0, abs=1e-6)
    assert inv.error[1] == pytest.approx(_relative(torch.roll(a, 1, 3), torch.roll(ta, 1, 3), s), rel=1e-5)
    assert inv.error[1] > 0.05
    stage = layer_scale_invariance(m, x, s, kinds=["stage"])
    pooled = nn.functional.avg_pool2d
    assert stage.taps == ["stage"] and stage.labels == ["pooled"]
    assert stage.error[0] == pytest.approx(_relative(pooled(a, 2), pooled(ta, 2), s), rel=1e-5)
    both = layer_scale_invariance(m, x, s, kinds=("level", "stage"), batch_size=100)
    assert both.taps == ["pointwise", "shifted", "stage"]
    np.testing.assert_allclose(both.error, [*inv.error, *stage.error], rtol=1e-5, atol=1e-7)
    assert layer_scale_invariance(m, x, s).taps == both.taps  # level and stage by default


class Offset(Tapped):
    """Tapped with a background: the pointwise map is 3x + 1, so a blank image answers 1, not 0."""

    def forward(self, x):
        a = self.pointwise(self.gain * x + 1.0)
        self.shifted(torch.roll(a, 1, dims=3))
        self.stage(nn.functional.avg_pool2d(a, 2))
        return self.embedding(a.flatten(1))[:, :2]


def test_layer_scale_invariance_is_measured_from_the_blank_images_answer():
    """3x + 1 commutes with rescaling once its background (the answer 1 to the blank border a shrunk
    image leaves) is taken off: 0 centred. Zero-filling the raw features counts the background as error."""
    x, s = images(5, seed=6), 0.6
    inv = layer_scale_invariance(Offset(), x, s, kinds=["level"])
    assert inv.error[0] == pytest.approx(0.0, abs=1e-6)
    a, ta = 3 * x, 3 * rescale(x, s)  # centred: exactly the unbiased map's numbers
    assert inv.error[1] == pytest.approx(_relative(torch.roll(a, 1, 3), torch.roll(ta, 1, 3), s), rel=1e-5)
    raw = layer_scale_invariance(Offset(), x, s, kinds=["level"], centre=False)
    assert raw.error[0] == pytest.approx(_relative(a + 1, ta + 1, s), rel=1e-5) and raw.error[0] > 0.1


def test_layer_scale_invariance_reads_uint8_and_batches_of_64():
    m = Tapped()
    q = (images(70, seed=4) * 255).round().to(torch.uint8)
    seen = []
    m.shifted.register_forward_hook(lambda mod, a, out: seen.append(len(out)))
    inv = layer_scale_invariance(m, q, 0.5, kinds=["level"])
    assert seen == [1, 64, 64, 6, 6]  # the blank image once, then every batch once as it is, once rescaled
    ref = layer_scale_invariance(m, q.float() / 255, 0.5, kinds=["level"])
    np.testing.assert_allclose(inv.error, ref.error, rtol=1e-6)


def test_layer_scale_invariance_guards_a_zero_map():
    m = Tapped()
    inv = layer_scale_invariance(m, torch.zeros(2, 1, SIZE, SIZE), 0.5, kinds=["level"])
    assert inv.error.tolist() == [0.0, 0.0]  # 0 / max(0, 1e-12), not NaN


def test_layer_scale_invariance_passes_loader_and_workers():
    m = Tapped()
    with pytest.raises(WsvizError, match="loader must be one of"):
        layer_scale_invariance(m, images(2), 0.5, loader="nope")
    with pytest.raises(ValueError, match="num_workers"):
        layer_scale_invariance(m, images(2), 0.5, loader="stream", workers=-1)


def test_layer_scale_invariance_message():
    with pytest.raises(WsvizError, match=r"^This model has no spatial taps to compare\.$"):
        layer_scale_invariance(Tapped(), images(2), 0.5, kinds=["rate"])


def test_values_are_floats_even_when_given_as_whole_numbers():
    x, y = blocks()
    res = rotation_sweep({"lr": LeftRight()}, x, y, angles=[0, 180])
    assert res.values.dtype == np.float64 and res.values.tolist() == [0.0, 180.0]
    assert scale_sweep({"lr": LeftRight()}, x, y, scales=[1, 2]).values.dtype == np.float64


def test_one_degree_is_a_rotation_not_the_identity(tmp_path):
    x = images(4)
    m = Linear()
    cache = PredictionCache(tmp_path)
    rotation_sweep({"m": m}, x, angles=(1,), cache=cache)
    assert rotation_sweep({"m": m}, x, angles=(1,), cache=cache).cached == 2  # rotate=1.0 and identity


def test_single_image_stability_of_a_colour_image():
    m = Linear(channels=3)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    st = single_image_stability(m, x[1], [0, 90])
    with torch.no_grad():
        prob = torch.cat([m(rotate(x[1:2], a)) for a in (0.0, 90.0)]).softmax(1)
    np.testing.assert_allclose(st.probabilities, prob.numpy(), rtol=1e-5, atol=1e-6)


class Recording(torch.utils.data.Dataset):
    """A map-style dataset that notes which items were read (in this process)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.read = x, y, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.read.append(i)
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("sweep,values", [(scale_sweep, {"scales": (0.5,)}), (rotation_sweep, {"angles": (90,)})])
def test_a_dataset_is_read_once_in_this_process_by_default(sweep, values):
    x, y = images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    ds = Recording(x, y)
    res = sweep({"m": Linear()}, ds, **values)
    assert sorted(ds.read) == list(range(6))  # no loader worker processes unless asked for
    ref = sweep({"m": Linear()}, x, y, **values)
    assert np.array_equal(res.predictions["m"], ref.predictions["m"])
    np.testing.assert_allclose(res.accuracy["m"], ref.accuracy["m"])


# ------------------------------------------------------ a model shared with other threads (the app)
class Crowded(Tapped):
    """Tapped in eval mode (as the app's loaded checkpoints are), shared with another thread that predicts
    through it: each pass of the ``owner`` thread waits, before returning (inside whatever capture it
    runs in), until the other thread has made a whole pass of its own through the same object."""

    def __init__(self) -> None:
        super().__init__()
        self.eval()
        self.owner: int | None = None
        self.others = 0
        self.turn = threading.Condition()

    def forward(self, x):
        out = super().forward(x)
        if threading.get_ident() == self.owner:
            with self.turn:
                seen = self.others
                assert self.turn.wait_for(lambda: self.others > seen, timeout=30), "the other thread stopped"
        else:
            with self.turn:
                self.others += 1
                self.turn.notify_all()
        return out


def test_layer_scale_invariance_records_only_its_own_threads_passes():
    """The live slider predicts through the object a sweep is measuring (the app shares one per
    checkpoint): those passes must not land in the measurement's captured features."""
    m, x = Crowded(), images(9, seed=8)
    alone = layer_scale_invariance(m, x, 0.6, batch_size=4)
    stop = threading.Event()
    theirs = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 5

    def other():
        while not stop.is_set():
            predict(m, theirs)

    m.owner = threading.get_ident()
    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        crowded = [layer_scale_invariance(m, x, 0.6, batch_size=4) for _ in range(3)]
    finally:
        stop.set()
        m.owner = None
        t.join(30)
    assert m.others > 3 * 7  # a pass of theirs inside each of ours (1 blank + 3 batches x 2)
    for inv in crowded:
        assert inv.taps == alone.taps
        np.testing.assert_array_equal(inv.error, alone.error)


class Normed(nn.Module):
    """A conv, BatchNorm and a tap, then a linear classifier: eval mode reads the running statistics,
    training mode the batch's (and updates the running ones)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.bn.running_mean.fill_(0.3)
        self.bn.running_var.fill_(2.0)
        self.level = Tap("level", "normed")
        self.head = nn.Linear(2 * SIZE * SIZE, 3)
        self.wsviz_config = {"in_channels": 1, "input_size": SIZE, "num_classes": 3}

    def forward(self, x):
        return self.head(self.level(self.bn(self.conv(x))).flatten(1))


def _sweep_path(m: nn.Module, x: torch.Tensor) -> None:
    """Everything the Scale page and the sweeps run through a model."""
    predict(m, x)
    scale_sweep({"m": m}, x, scales=(0.5, 1.0), batch_size=3)
    rotation_sweep({"m": m}, x, angles=(90,), batch_size=3)
    single_image_stability(m, x[0], [0.5, 1.0], "scale")
    layer_scale_invariance(m, x, 0.5, batch_size=3)


def test_the_sweep_path_never_changes_an_eval_mode_model():
    """The app's models are loaded in eval mode and shared with other threads: the sweeps, predictions and
    invariance never switch their mode (not even for a moment), nor touch BatchNorm statistics or weights."""
    m, x = Normed().eval(), images(7, seed=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    switched = []
    for mod in m.modules():
        mod.train = lambda mode=True, _m=mod: switched.append((_m, mode))
    seen = []  # at every pass: whether any module was in training mode
    m.register_forward_pre_hook(lambda mod, args: seen.append(any(mm.training for mm in m.modules())))
    _sweep_path(m, x)
    assert switched == [] and seen and not any(seen)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_the_sweep_path_runs_a_training_mode_model_in_eval_mode_and_restores_it():
    m, x = Normed().train(), images(7, seed=2)
    m.head.eval()  # a frozen part keeps its own flag
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [mod.training for mod in m.modules()]
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(any(mm.training for mm in m.modules())))
    _sweep_path(m, x)
    assert seen and not any(seen) and [mod.training for mod in m.modules()] == flags
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # running statistics read, not updated
    with torch.no_grad():
        assert torch.equal(predict(m, x)[0], Normed().eval()(x).argmax(1))


# ------------------------------------------------------------------- invariance of several models
class Broken(Tapped):
    def forward(self, x):
        raise RuntimeError("out of memory")


def test_invariance_per_model_names_a_failure_and_goes_on():
    x = images(5, seed=4)
    inv, no_taps, failed = invariance_per_model({"broken": Broken(), "plain": Linear(), "ok": Tapped()}, x, 0.5)
    assert list(inv) == ["ok"] and no_taps == ["plain"] and failed == {"broken": "RuntimeError: out of memory"}
    ref = layer_scale_invariance(Tapped(), x, 0.5)
    assert inv["ok"].taps == ref.taps
    np.testing.assert_array_equal(inv["ok"].error, ref.error)
    # a WsvizError reads as its message
    _, _, failed = invariance_per_model({"m": Tapped()}, x, 0.5, loader="nope")
    assert failed["m"].startswith("loader must be one of")


class Stop(Exception):
    pass


def test_invariance_per_model_asks_progress_before_each_model_and_a_cancel_stops_it():
    models = {"a": Tapped(), "b": Tapped(), "c": Tapped()}
    ran = []
    for name, m in models.items():
        m.pointwise.register_forward_hook(lambda mod, a, out, _n=name: ran.append(_n))
    calls = []
    invariance_per_model(models, images(3), 0.5, progress=lambda *a: calls.append(a))
    assert calls == [(0, 3, "a"), (1, 3, "b"), (2, 3, "c"), (3, 3, "")]

    def cancel(done, total, label):
        if label == "b":
            raise Stop()  # the page's Cancel raises from its progress call
    ran.clear()
    with pytest.raises(Stop):
        invariance_per_model(models, images(3), 0.5, progress=cancel)
    assert set(ran) == {"a"}  # not caught as the model's failure: b and c never measured


# -------------------------------------------------------------------------- comparable labels
@pytest.mark.parametrize("dataset,trained_on", [
    ("mnist5k", "mnist5k-scale"), ("mnist-rot", "mnist-scale"), ("mnist", "mnist5k"), ("mnist", "mnist-rot"),
    ("fashion-mnist", "fashion-mnist"), ("cifar10", "cifar10")])
def test_labels_of_the_same_classes_are_comparable(dataset, trained_on):
    assert label_mismatch(dataset, trained_on, 10) is None


@pytest.mark.parametrize("dataset,trained_on", [
    ("mnist5k", "mnist"), ("mnist5k-rot", "mnist-rot"), ("mnist5k-scale", "mnist"), ("mnist5k-rot", "mnist-scale")])
def test_the_mnist5k_digits_cannot_score_a_model_trained_on_all_of_mnists_training_set(dataset, trained_on):
    """mnist5k's digits are 5,000 of MNIST's *training* digits: a model trained on full MNIST (any protocol)
    has seen each of them, so an accuracy on them is a training accuracy, not a test one."""
    from wsviz.data.digits import load_mnist5k_arrays

    why = label_mismatch(dataset, trained_on, 10)
    assert why == (f"it was trained on {trained_on}, whose training images include every {dataset} digit "
                   "(mnist5k is drawn from MNIST's training set): an accuracy here would be on its own training images")
    # the premise, checked on the data: MNIST's first training digit (a 5) is among mnist5k's
    first_row = [3, 18, 18, 18, 126, 136, 175, 26, 166, 255, 247, 127]
    images, labels = load_mnist5k_arrays()
    hit = (images[:, 5, 12:24] == np.array(first_row)).all(1)
    assert hit.sum() == 1 and labels[hit][0] == 5


def test_labels_of_other_classes_are_not_comparable(tmp_path):
    folder = tmp_path / "pets"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
    pets = f"folder:{folder}"
    assert label_mismatch(pets, "mnist5k-scale", 10) == (f"it was trained on mnist5k-scale, whose classes are "
                                                          f"not those of {pets}")
    assert label_mismatch("fashion-mnist", "mnist5k", 10) == ("it was trained on mnist5k, whose classes are not "
                                                              "those of fashion-mnist")
    assert label_mismatch("mnist5k", "cifar10", 10) is not None
    assert label_mismatch("cifar100", "cifar100", 10) == "it has 10 classes, cifar100 has 100"
    assert label_mismatch("mnist5k", "mnist5k", 2) == "it has 2 classes, mnist5k has 10"
    assert label_mismatch("mnist5k", None, 10) == ("its card names no training set wsviz knows the classes of "
                                                   "(none)")
    assert label_mismatch(pets, "folder:/elsewhere", 2) is not None
    assert label_mismatch(pets, pets, 2) is None  # a model trained on that very folder: its sub-folders, sorted
    assert label_mismatch(pets, pets, 3) == f"it has 3 classes, {pets} has 2"
    gone = f"folder:{tmp_path / 'gone'}"
    assert label_mismatch(gone, gone, 2).startswith(f"the classes of {gone} cannot be read")


def test_model_label_mismatch_reads_the_models_classes_and_the_cards_dataset():
    assert model_label_mismatch(Linear(classes=10), {"dataset": "mnist5k-scale"}, "mnist5k") is None
    assert model_label_mismatch(Linear(classes=3), {"dataset": "mnist5k-scale"}, "mnist5k") == \
        "it has 3 classes, mnist5k has 10"
    assert model_label_mismatch(Linear(classes=10), {}, "mnist5k") is not None
    plain = nn.Linear(2, 2)  # a model wsviz does not size: the card's count
    assert model_label_mismatch(plain, {"dataset": "mnist5k", "config": {"num_classes": 10}}, "mnist5k") is None


def test_single_image_and_per_layer_sweeps_transform_at_the_images_size_then_pad_as_the_protocol_does(monkeypatch):
    """The protocol rotates / rescales a 28-px digit, then pads it to an odd-sized model (29 px); padding
    first moves the centre half a pixel."""
    import torch.nn as nn

    import wsviz
    import wsviz.analysis.sweeps as sw
    from wsviz.data.datasets import fit_to
    from wsviz.data.resample import rescale, rotate

    net = wsviz.adopt(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(4, 10)).eval(), (1, 29, 29), taps={"1": "level"})
    torch.manual_seed(0)
    x28 = torch.rand(1, 28, 28)
    seen = []
    real = sw.predict
    monkeypatch.setattr(sw, "predict", lambda m, b, **k: seen.append(b) or real(m, b, **k))
    sw.single_image_stability(net, x28, [0.0, 30.0], "angle")
    want = torch.cat([fit_to(rotate(x28[None], a), 1, 29) for a in (0.0, 30.0)])
    assert torch.allclose(seen[0], want, atol=1e-6)

    inputs = []
    net[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    sw.layer_scale_invariance(net, x28[None], 0.5, centre=False)
    assert torch.allclose(inputs[-1], fit_to(rescale(x28[None], 0.5), 1, 29), atol=1e-6)


# -------------------------------------------------------------------------- uncertainty drawn, ties said
def test_an_accuracy_curve_carries_each_points_wilson_interval_over_the_images_swept():
    from wsviz.analysis.stats import wilson_ci
    from wsviz.figures import sweep_figure

    res = SweepResult("angle", np.array([0.0, 90.0]), accuracy={"m": np.array([0.9, 0.5])},
                      agreement={"m": np.array([1.0, 0.6])}, samples=300)
    (trace,) = sweep_figure(res, "accuracy").data
    for i, a in enumerate((0.9, 0.5)):
        acc, lo, hi = wilson_ci(np.arange(300) < round(a * 300))
        assert trace.error_y.array[i] == pytest.approx(100 * (hi - acc))
        assert trace.error_y.arrayminus[i] == pytest.approx(100 * (acc - lo))
    assert sweep_figure(res, "agreement").data[0].error_y.array is None  # 100% at 0 by definition: no bars there


def test_the_worst_angle_says_how_many_angles_tie_at_its_accuracy():
    from wsviz.analysis.rotation import rotation_summary

    res = SweepResult("angle", np.array([0.0, 90.0, 180.0, 270.0, 360.0]),
                      accuracy={"m": np.array([0.96, 0.95, 0.95, 0.97, 0.96])},
                      agreement={"m": np.ones(5)}, samples=300)
    (s,) = rotation_summary(res)
    assert (s.worst_angle, s.worst_accuracy, s.worst_ties) == (90.0, 0.95, 2)
    assert s.row()["angles tied at the worst"] == 2


def test_an_embedding_of_a_hundred_classes_draws_each_class_differently():
    """Ten colours for CIFAR-100 would draw classes 0, 10, 20, ... alike: colour and marker shape together."""
    from wsviz.figures import embedding_figure

    labels = np.repeat(np.arange(100), 3)
    fig = embedding_figure(np.random.default_rng(0).normal(size=(300, 2)), labels, "class", "CIFAR-100")
    looks = [(t.marker.color, t.marker.symbol or "circle") for t in fig.data]
    assert len(fig.data) == 100 and len(set(looks)) == 100
    assert fig.layout.title.text == "CIFAR-100 (100 classes: each a colour and a marker shape)"
    ten = embedding_figure(np.zeros((10, 2)), np.arange(10), "class", "digits")
    assert len({t.marker.color for t in ten.data}) == 10 and ten.layout.title.text == "digits"


def test_similarity_heatmaps_of_a_flat_container_label_each_layer_by_its_index():
    """vgg's features.16 and features.18 are two candidates of one container: labelled 16 and 18, not both
    'features'; a stage's title has no empty role after it."""
    from types import SimpleNamespace

    from wsviz.figures import stage_similarity_figure

    flat = SimpleNamespace(stage="features", role="", layers=("features.16", "features.18"),
                           output_cka=np.eye(2), weight_similarity=np.eye(2))
    nested = SimpleNamespace(stage="stages.2", role="conv2", layers=tuple(f"stages.2.{b}.conv2" for b in range(3)),
                             output_cka=np.eye(3), weight_similarity=np.eye(3))
    fig = stage_similarity_figure([flat, nested])
    assert [list(t.x) for t in fig.data] == [["16", "18"], ["0", "1", "2"]]
    assert [a.text for a in fig.layout.annotations] == ["features", "stages.2 · conv2"]


def test_attribution_titles_fit_narrow_panels():
    """Four panels on an 800 px page are ~110 px each: a 45-character note on one line ran into the next
    panel's (seen in a screenshot), so notes wrap at 24 characters and the titles are set smaller."""
    import re

    from wsviz.figures import attribution_figure

    note = "sum off f(x) − f(black) by 0.8% (128 steps)"
    maps = {f"model-{i} → 0": np.random.default_rng(i).normal(size=(8, 8)) for i in range(3)}
    fig = attribution_figure(np.zeros((8, 8)), maps, "ig", signed=True, notes={n: note for n in maps})
    for a in fig.layout.annotations[1:]:
        lines = [re.sub(r"<[^>]+>", "", x) for x in a.text.split("<br>")[2:]]
        assert " ".join(lines) == note and max(map(len, lines)) <= 24, a.text
        assert a.font.size == 10
    assert attribution_figure(np.zeros((8, 8)), {"m → 0": np.ones((8, 8))}).layout.annotations[1].font.size == 13
