"""The Scale page draws what its sweep measured, for the checkpoints and labels it names (AppTest,
shipped checkpoints), and its per-layer invariance is not disturbed by other sessions."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-scale-truth-runs-"))

from conftest import copy_checkpoint, needs, open_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"
ACCURACY, AGREEMENT = "Accuracy vs scale", "Agreement with each model's own prediction at scale 1"


def unescaped(text: object) -> str:
    """Markdown as read: the page escapes names and reasons (pages._shared.plain)."""
    return str(text).replace("\\", "")


def charts(at) -> dict[str, dict[str, list[float]]]:
    """{figure title: {trace name: its y values}} of the page's plotly charts."""
    out = {}
    for chart in at.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        traces = {}
        for d in fig["data"]:
            y = d["y"]
            if isinstance(y, dict):  # plotly's typed-array encoding
                y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"])
            traces[d.get("name")] = [float(v) for v in y]
        out[fig["layout"]["title"]["text"]] = traces
    return out


def sweep(at, *, images: int = 100, scales=(0.5, 1.0), folder: str | None = None, timeout: float = 240) -> None:
    """Set the sweep's inputs, press Run and rerun until the work has ended (its figures drawn, or an
    error or warning said)."""
    next(s for s in at.slider if s.label == "Images").set_value(images).run()
    next(m for m in at.multiselect if m.label == "Scales").set_value(list(scales)).run()
    if folder is not None:
        next(t for t in at.text_input if t.label == "Or an image folder").set_value(folder).run()
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert not at.exception, at.exception
        if AGREEMENT in charts(at) or at.error:
            return
        time.sleep(0.5)
        at.run()
    raise AssertionError("the sweep did not finish in time")


def expected(folder: Path, dataset: str, n: int, scales) -> tuple[list[float], list[float]]:
    """(accuracy, agreement) in % of the checkpoint in ``folder``, swept directly."""
    from wsviz.analysis.sweeps import scale_sweep
    from wsviz.data.stream import eval_data
    from wsviz.training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(folder)
    res = scale_sweep({"m": model}, eval_data(dataset, "test", size=28, limit=n), scales=scales)
    return [100 * float(a) for a in res.accuracy["m"]], [100 * float(a) for a in res.agreement["m"]]


# ------------------------------------------------------------------ a checkpoint overwritten in place
def test_a_checkpoint_overwritten_in_place_is_swept_again_not_shown_with_its_old_curves(checkpoints):
    """Retrained at the same folder: the page must not go on showing the old weights' curves."""
    import torch
    from safetensors.torch import load_file, save_file

    needs("scale-resnet20")
    folder = copy_checkpoint("scale-resnet20", checkpoints / "retrained")
    at = open_app("pages/scale.py", ["retrained"])
    sweep(at)
    assert not at.error, [e.value for e in at.error]
    before = charts(at)
    acc, agree = expected(folder, "mnist5k", 100, (0.5, 1.0))
    np.testing.assert_allclose(before[ACCURACY]["retrained"], acc)
    np.testing.assert_allclose(before[AGREEMENT]["retrained"], agree)

    w = folder / "weights.safetensors"  # the classifier's classes rolled by one: every answer one class on
    tensors = load_file(str(w))
    save_file({k: torch.roll(v, 1, 0).contiguous() if k.startswith("head.fc.") else v for k, v in tensors.items()},
              str(w))
    later = w.stat().st_mtime + 2
    os.utime(w, (later, later))
    at.run()
    assert not at.exception, at.exception
    assert charts(at) == {}, "the page still showed the curves of the weights it replaced"
    assert any(c.value.startswith("The settings changed since the last scale sweep") for c in at.caption)

    next(b for b in at.button if b.label == "Run the sweep").click().run()
    t0 = time.time()
    while AGREEMENT not in charts(at) and time.time() - t0 < 240:
        time.sleep(0.5)
        at.run()
        assert not at.exception, at.exception
    after = charts(at)
    acc2, agree2 = expected(folder, "mnist5k", 100, (0.5, 1.0))
    assert acc2 != acc
    np.testing.assert_allclose(after[ACCURACY]["retrained"], acc2)
    np.testing.assert_allclose(after[AGREEMENT]["retrained"], agree2)


# ------------------------------------------------------------------------------ labels not the model's
def _pets(root: Path) -> Path:
    """An image folder of two classes, cat/ and dog/, ten small pictures each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_folder_of_other_classes_is_swept_for_agreement_only(tmp_path):
    """scale-resnet20 knows the ten digits; cat/ and dog/ are not its classes. An accuracy against them
    (label 0 = cat read as digit 0) would draw 0% for a model that was never asked the question."""
    needs("scale-resnet20")
    folder = _pets(tmp_path / "pets")
    at = open_app("pages/scale.py", ["scale-resnet20"])
    sweep(at, folder=str(folder))
    assert not at.error, [e.value for e in at.error]
    warnings = [unescaped(w.value) for w in at.warning]
    assert warnings == [f"folder:{folder} cannot score scale-resnet20: agreement only. "
                        f"It was trained on mnist5k-scale, whose classes are not those of folder:{folder}."]
    drawn = charts(at)
    assert ACCURACY not in drawn, "an accuracy against labels the model never learned was drawn"
    assert drawn[AGREEMENT]["scale-resnet20"][1] == 100.0  # at scale 1, by definition
    assert len(drawn[AGREEMENT]["scale-resnet20"]) == 2


def test_digits_of_another_protocol_are_the_models_classes():
    """A scale-trained model on the plain digits: the same ten classes, so its accuracy is drawn."""
    needs("scale-resnet20")
    at = open_app("pages/scale.py", ["scale-resnet20"])
    sweep(at)
    assert not at.error and not at.warning, [w.value for w in at.warning]
    assert set(charts(at)) >= {ACCURACY, AGREEMENT}


def test_a_model_trained_on_all_of_mnist_gets_no_accuracy_on_the_mnist5k_digits_it_trained_on(checkpoints):
    """mnist5k is 5,000 of MNIST's training digits: a full-MNIST model's accuracy on them is a training
    accuracy, which the page would draw as if it were a test one."""
    needs("scale-resnet20")
    folder = copy_checkpoint("scale-resnet20", checkpoints / "full-mnist")
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "dataset": "mnist-scale"}))
    at = open_app("pages/scale.py", ["full-mnist"])
    sweep(at)
    assert not at.error, [e.value for e in at.error]
    assert [unescaped(w.value) for w in at.warning] == [
        "mnist5k cannot score full-mnist: agreement only. It was trained on mnist-scale, whose training images "
        "include every mnist5k digit (mnist5k is drawn from MNIST's training set): an accuracy here would be on its "
        "own training images."]
    assert ACCURACY not in charts(at) and AGREEMENT in charts(at)


def _digit_folder(root: Path, per_class: int = 3) -> Path:
    """An image folder of the ten digit classes (0/ ... 9/), real mnist5k test digits as PNGs."""
    from PIL import Image

    from wsviz.data.digits import load_mnist5k_arrays, split_indices

    images, labels = load_mnist5k_arrays()
    test = split_indices(labels)["test"]
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for j, i in enumerate(test[labels[test] == c][:per_class]):
            Image.fromarray(images[i]).save(root / str(c) / f"{j}.png")
    return root


def test_a_folder_model_is_swept_from_the_input_its_training_tested_it_on(checkpoints, tmp_path, monkeypatch):
    """Trained with the imagenet preset, a folder model was tested on images resized to 8/7 and centre-cropped:
    letterboxed instead, the sweep's 'scale 1' would be another scale (0.66x for a 4:3 photo)."""
    from test_data_seed_views import _spy_on_eval_data

    needs("scale-resnet20")
    data = _digit_folder(tmp_path / "digits")
    folder = copy_checkpoint("scale-resnet20", checkpoints / "folder-model")
    card = json.loads((folder / "card.json").read_text())
    card["dataset"] = f"folder:{data}"
    card["train_config"] = {**card.get("train_config", {}), "augment": "imagenet"}
    (folder / "card.json").write_text(json.dumps(card))
    seen = _spy_on_eval_data(monkeypatch)
    at = open_app("pages/scale.py", ["folder-model"])
    sweep(at, folder=str(data))
    assert not at.error and not at.warning, [w.value for w in [*at.error, *at.warning]]
    assert [k.get("augment") for split, k in seen if split == "test"] == ["imagenet"], seen
    # and the page says how many images it swept: 3 per class, split 80/20 per class, leave 10, not 100
    assert any(c.value.startswith(f"10 test images of folder:{data} (its test split has no more than that; 100 were "
                                  "asked for)") for c in at.caption), [c.value for c in at.caption]


def test_variants_tested_under_different_transforms_are_swept_letterboxed_and_the_page_says_so(checkpoints, tmp_path):
    needs("scale-resnet20")
    data = _digit_folder(tmp_path / "digits")
    for name, preset in (("net", "imagenet"), ("box", "none")):
        folder = copy_checkpoint("scale-resnet20", checkpoints / name)
        card = json.loads((folder / "card.json").read_text())
        card["dataset"] = f"folder:{data}"
        card["train_config"] = {**card.get("train_config", {}), "augment": preset}
        (folder / "card.json").write_text(json.dumps(card))
    at = open_app("pages/scale.py", ["net", "box"])
    sweep(at, folder=str(data))
    assert [unescaped(w.value) for w in at.warning] == [
        f"These models were tested on folder:{data} under different transforms (net: resize to 8/7 and centre crop "
        "(imagenet); box: letterbox (none)): the images are letterboxed for all, so scale 1 is not each one's "
        "training scale. Compare them apart."]


def test_the_sweep_of_an_image_folder_is_stale_once_its_images_change(tmp_path):
    from PIL import Image

    needs("scale-resnet20")
    data = _digit_folder(tmp_path / "digits")
    at = open_app("pages/scale.py", ["scale-resnet20"])
    sweep(at, folder=str(data))
    assert AGREEMENT in charts(at)
    for png in data.glob("*/*.png"):  # every image replaced by a blank one
        Image.new("L", (28, 28)).save(png)
    at.run()
    assert not at.exception, at.exception
    assert charts(at) == {}, "the curves of the images replaced were still drawn"
    assert any(c.value.startswith("The settings changed since the last scale sweep") for c in at.caption)


# ------------------------------------------------------------------------------------- no scale chosen
def test_no_scale_chosen_offers_no_sweep():
    needs("scale-resnet20")
    at = open_app("pages/scale.py", ["scale-resnet20"])
    next(m for m in at.multiselect if m.label == "Scales").set_value([]).run()
    assert not at.exception, at.exception
    assert "Choose at least one scale." in [i.value for i in at.info]
    assert not [b for b in at.button if b.label == "Run the sweep"]
    assert charts(at) == {}


# --------------------------------------------------------------- one model's invariance failing; Cancel
def test_a_model_whose_invariance_fails_is_named_and_the_sweep_stands(monkeypatch):
    import wsviz.analysis.sweeps as sweeps

    pair = needs("scale-resnet20", "scale-msws-shared")
    real = sweeps.layer_scale_invariance

    def flaky(model, *a, **k):  # scale-resnet20's measurement fails with an error that is not wsviz's
        if model.wsviz_name == "resnet_digits":
            raise RuntimeError("CUDA out of memory")
        return real(model, *a, **k)

    monkeypatch.setattr(sweeps, "layer_scale_invariance", flaky)
    at = open_app("pages/scale.py", pair)
    sweep(at)
    assert not at.error, [e.value for e in at.error]
    assert [unescaped(w.value) for w in at.warning] == [
        "No per-layer invariance for scale-resnet20: RuntimeError: CUDA out of memory"]
    drawn = charts(at)
    assert set(drawn[ACCURACY]) == set(drawn[AGREEMENT]) == set(pair)  # the finished sweep, both models
    inv = next(t for title, t in drawn.items() if title.startswith("How far each layer"))
    assert list(inv) == ["scale-msws-shared"]


def _page_function(name: str, scope: dict):
    """A top-level function of pages/scale.py, defined alone in ``scope`` (running the page would draw)."""
    source = (ROOT / "pages" / "scale.py").read_text()
    exec(source[source.index(f"def {name}"):].split("\n\n\n")[0], scope)
    return scope[name]


def test_the_sweep_checks_cancel_during_the_invariance_too(monkeypatch):
    import torch

    import wsviz.analysis.sweeps as sweeps
    from wsviz.concurrency import heavy_slot
    from wsviz.models import create_model

    scope = {"heavy_slot": heavy_slot, "scale_sweep": sweeps.scale_sweep,
             "invariance_per_model": sweeps.invariance_per_model}
    _page_function("invariance_sample", scope)
    run_sweep = _page_function("run_sweep", scope)
    torch.manual_seed(0)
    models = {name: create_model("resnet_digits", base_width=4, depth=8).eval() for name in ("a", "b")}
    measured = []
    real = sweeps.layer_scale_invariance
    monkeypatch.setattr(sweeps, "layer_scale_invariance", lambda m, *a, **k: measured.append(m) or real(m, *a, **k))

    class Cancelled(Exception):
        pass

    texts = []

    def progress(fraction, text):
        texts.append((fraction, text))

    res, inv, skipped, failed, blind, _ = run_sweep(progress, models, "mnist5k", 100, (0.5, 1.0), {})
    assert list(inv) == ["a", "b"] and skipped == [] and failed == {} and blind == {}
    assert [t for _, t in texts if t.startswith("per-layer")] == [
        "per-layer invariance at 0.5: a", "per-layer invariance at 0.5: b", "per-layer invariance at 0.5"]
    assert [f for f, _ in texts] == sorted(f for f, _ in texts) and texts[-1][0] == 1.0

    def cancel_at_b(fraction, text):  # Work.progress raises when Cancel was pressed
        if text.endswith(": b"):
            raise Cancelled()
    measured.clear()
    with pytest.raises(Cancelled):
        run_sweep(cancel_at_b, models, "mnist5k", 100, (0.5, 1.0), {})
    assert measured == [models["a"]]

    res, *_, blind, _ = run_sweep(progress, models, "mnist5k", 100, (0.5,), {"b": "not its classes"})
    assert np.isnan(res.accuracy["b"]).all() and not np.isnan(res.accuracy["a"]).any()
    assert blind == {"b": "not its classes"}


# ------------------------------------------------------------ another session predicting meanwhile
def test_invariance_of_a_shipped_checkpoint_is_not_disturbed_by_another_threads_predictions():
    """The reviewer's case: scale-resnet20's per-stage invariance while another thread predicts through the
    same object in a loop (the live slider, another session) came out as [0.0, 0.0, 2.258]."""
    import torch

    from wsviz.analysis.sweeps import layer_scale_invariance, predict
    from wsviz.data.stream import eval_data, take
    from wsviz.training.checkpoint import load_checkpoint

    needs("scale-resnet20")
    model, _ = load_checkpoint(CKPT / "scale-resnet20")
    data = eval_data("mnist5k-scale", "test")
    x, _ = take(data, np.linspace(0, len(data) - 1, 64).round().astype(int).tolist())
    alone = layer_scale_invariance(model, x, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stop, calls = threading.Event(), [0]

    def other():
        while not stop.is_set():
            predict(model, x[:1])
            calls[0] += 1

    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        runs = [layer_scale_invariance(model, x, 0.5) for _ in range(3)]
    finally:
        stop.set()
        t.join(60)
    assert calls[0] > 0
    for inv in runs:
        np.testing.assert_array_equal(inv.error, alone.error)
    assert not model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
