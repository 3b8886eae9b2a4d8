"""Attributions and feature maps say what they show: each panel over its own model's input, Grad-CAM's
resolution and Integrated Gradients' completeness error in the titles, and analyses that never switch
the mode of the model object the app shares between sessions."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-attribution-truth-runs-"))

from conftest import needs, open_app  # noqa: E402

import wsviz  # noqa: E402
from wsviz.analysis.attribution import IG_MAX_STEPS, IG_TOLERANCE, attribute  # noqa: E402
from wsviz.analysis.embeddings import model_inputs  # noqa: E402
from wsviz.analysis.features import feature_maps  # noqa: E402
from wsviz.data.datasets import load_split  # noqa: E402
from wsviz.figures import title_parts  # noqa: E402
from wsviz.training.checkpoint import load_checkpoint  # noqa: E402


def _tiny_with_frozen_bn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    wsviz.adopt(net, (1, 8, 8), taps={"2": "level"})
    return net


# ------------------------------------------------------------------ feature maps leave the model's modes alone
def test_feature_maps_restore_every_submodules_mode():
    """A training model with a frozen (eval-mode) BatchNorm keeps it frozen after a feature-map pass."""
    net = _tiny_with_frozen_bn().train()
    net[1].eval()
    before = [m.training for m in net.modules()]
    maps = feature_maps(net, torch.rand(1, 8, 8))
    assert [f.name for f in maps] == ["2"]
    assert [m.training for m in net.modules()] == before


def test_feature_maps_never_switch_the_mode_of_the_object_they_are_given():
    """The app shares one model object between sessions (threads): switching its mode, even for the length of a
    pass, changes what another session's pass through it computes (hooks.py's policy: a copy changes modes)."""
    net = _tiny_with_frozen_bn().train()
    seen = []
    h = net[0].register_forward_pre_hook(lambda mod, args: seen.append((net.training, net[1].training)))
    try:
        feature_maps(net, torch.rand(1, 8, 8))
    finally:
        h.remove()
    assert seen and all(flags == (True, True) for flags in seen)
    assert net.training and net[1].training


def test_feature_maps_of_a_training_model_are_its_eval_mode_maps():
    """BatchNorm reads its running statistics, not the one image's, as in every other analysis."""
    net = _tiny_with_frozen_bn()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.rand(1, 8, 8)
    got = feature_maps(net.train(), x)[0].maps
    with torch.no_grad():
        torch.testing.assert_close(got, net.eval()[:3](x.unsqueeze(0))[0])


# ------------------------------------------------------------------ Integrated Gradients: completeness, said
ROOT = Path(__file__).resolve().parents[1]


def _shipped(name: str):
    return load_checkpoint(ROOT / "checkpoints" / needs(name)[0])[0]


def _logit_change(model, x, targets):
    with torch.no_grad():
        i = torch.arange(len(x))
        return model(x)[i, targets] - model(torch.zeros_like(x))[i, targets]


def test_integrated_gradients_add_up_to_the_logit_change_within_the_stated_tolerance():
    """At the old fixed 32 steps scale-msws-shared's maps of these 16 test images missed f(x) - f(black) by a
    median 17% and up to 121% (2 of 16 within 2%); the default now refines each image until under IG_TOLERANCE,
    and says how far off each map is and whether it stopped at the cap."""
    model = _shipped("scale-msws-shared")
    images = load_split("mnist5k", "test").spread(16).images
    res = attribute(model, images, "integrated_gradients")
    x = model_inputs(model, images)
    change = _logit_change(model, x, res.targets)
    rel = (res.maps.sum((1, 2)) - change).abs() / change.abs()
    assert float((rel <= IG_TOLERANCE).float().mean()) >= 0.9, rel
    assert ((rel <= IG_TOLERANCE) | (res.ig_steps == IG_MAX_STEPS)).all()  # over it only where the cap was hit
    torch.testing.assert_close(res.relative_delta, rel, rtol=1e-3, atol=1e-4)  # the error it reports is the error
    torch.testing.assert_close(res.logit_change, change, rtol=1e-4, atol=1e-4)
    assert res.ig_steps.min() >= 64 and res.ig_steps.max() <= IG_MAX_STEPS


def test_integrated_gradients_with_fixed_steps_uses_them_and_reports_the_error():
    model = _shipped("scale-msws-shared")
    images = load_split("mnist5k", "test").spread(4).images
    res = attribute(model, images, "integrated_gradients", ig_steps=8)
    assert res.ig_steps.tolist() == [8] * 4
    change = _logit_change(model, model_inputs(model, images), res.targets)
    torch.testing.assert_close(res.relative_delta, (res.maps.sum((1, 2)) - change).abs() / change.abs(),
                               rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ Grad-CAM: the map's resolution, said
def test_grad_cam_reports_the_grid_of_its_layer():
    model = _shipped("rot-cnn")
    x = load_split("mnist5k", "test").images[:2]
    res = attribute(model, x, "grad_cam")
    assert res.layer == "features.25" and res.grid == (2, 2) and res.maps.shape == (2, 28, 28)
    assert attribute(model, x, "grad_cam", layer="features.12").grid == (12, 12)
    assert attribute(model, x, "saliency").grid is None


def _charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _titles(spec: dict) -> list[str]:
    return [a["text"] for a in spec["layout"]["annotations"]]


def _attribution_chart(at, prefix: str) -> dict:
    """The page's attribution figure (its title starts with the method's words)."""
    return next(s for s in _charts(at) if (s["layout"].get("title") or {}).get("text", "").startswith(prefix))


def _compare_page_with(pair, method: str):
    at = open_app("pages/compare.py", pair)
    next(s for s in at.selectbox if s.label == "Method").set_value(method).run()
    assert not at.exception
    return at


def test_compare_page_titles_grad_cam_with_its_grid_and_warns_at_2x2():
    at = _compare_page_with(needs("rot-cnn", "scale-resnet20"), "grad_cam")
    spec = _attribution_chart(at, "grad cam")
    titles = [title_parts(t)[0] for t in _titles(spec)]
    assert any(t.startswith("rot-cnn → ") and t.endswith("@ features.25 (2x2)") for t in titles), titles
    assert any(t.startswith("scale-resnet20 → ") and t.endswith("(7x7)") for t in titles), titles
    warned = [w.value for w in at.warning if "2x2" in w.value]
    assert len(warned) == 1 and "rot-cnn" in warned[0] and "scale-resnet20" not in warned[0]
    assert "features.21" in warned[0]  # the deepest finer map, to choose instead
    # the user's choice stands: a finer layer, no warning
    next(s for s in at.selectbox if s.label == "Grad-CAM layer of rot-cnn").set_value("features.12").run()
    assert not at.exception
    spec = _attribution_chart(at, "grad cam")
    assert any(title_parts(t)[0].endswith("@ features.12 (12x12)") for t in _titles(spec))
    assert not [w.value for w in at.warning if "2x2" in w.value]


def test_compare_page_titles_integrated_gradients_with_their_completeness_error():
    at = _compare_page_with(needs("scale-msws-shared", "scale-resnet20"), "integrated_gradients")
    spec = _attribution_chart(at, "integrated")
    maps = [t for t in _titles(spec) if " → " in title_parts(t)[0]]
    assert len(maps) == 2
    for t in maps:  # the note is wrapped over short lines (narrow panels): read as text
        text = " ".join(re.sub(r"<[^>]+>", " ", t).split())
        assert "sum off f(x) − f(black) by " in text and " steps)" in text, t


# ------------------------------------------------------------------ the CLI: own inputs, test indices, batches
@pytest.fixture
def digit_and_fashion(tmp_path):
    """Two checkpoint folders: the shipped scale-msws-vanilla, and a copy whose card says Fashion-MNIST."""
    src = ROOT / "checkpoints" / needs("scale-msws-vanilla")[0]
    shutil.copytree(src, tmp_path / "digits")
    shutil.copytree(src, tmp_path / "fashion")
    card = json.loads((tmp_path / "fashion" / "card.json").read_text())
    card["dataset"] = "fashion-mnist"
    (tmp_path / "fashion" / "card.json").write_text(json.dumps(card))
    return [str(tmp_path / "digits"), str(tmp_path / "fashion")]


@pytest.fixture
def written_figures(monkeypatch):
    import wsviz.cli as cli

    figs = {}
    real = cli._write_fig

    def keep(path, fig):
        figs[Path(path).name] = fig.to_plotly_json()
        real(path, fig)
    monkeypatch.setattr(cli, "_write_fig", keep)
    return figs


def _grey_paper_digit(path: Path) -> Path:
    from PIL import Image

    a = load_split("mnist5k", "test").images[18, 0].numpy()
    Image.fromarray(np.clip(np.rint((0.9 - 0.8 * a) * 255), 0, 255).astype(np.uint8)).save(path)
    return path


def _z(v) -> np.ndarray:
    if isinstance(v, dict):
        import base64

        flat = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return flat.reshape([int(n) for n in str(v["shape"]).split(",")]) if "shape" in v else flat
    return np.asarray(v, dtype=float)


def test_cli_attribution_draws_each_model_over_its_own_input(digit_and_fashion, tmp_path, written_figures):
    from wsviz.cli import main
    from wsviz.data.uploads import load_upload

    img = _grey_paper_digit(tmp_path / "d.png")
    assert main(["attribution", "--checkpoint", *digit_and_fashion, "--image", str(img), "--method", "saliency",
                 "--out", str(tmp_path / "o")]) == 0
    spec = written_figures["attribution.html"]
    data = img.read_bytes()
    own = {"digits": load_upload(data, "d.png", 1, 28, dataset="mnist5k-scale")[0].numpy(),
           "fashion": load_upload(data, "d.png", 1, 28, dataset="fashion-mnist")[0].numpy()}
    assert not np.allclose(own["digits"], own["fashion"])
    titles = [title_parts(a["text"])[0] for a in spec["layout"]["annotations"]]
    assert sorted(t for t in titles if t.startswith("input")) == ["input of digits", "input of fashion"]
    for j, t in enumerate(titles, start=1):
        if t.startswith("input of "):
            grey = next(tr for tr in spec["data"] if tr.get("xaxis", "x") == ("x" if j == 1 else f"x{j}"))
            np.testing.assert_allclose(_z(grey["z"]), own[t.removeprefix("input of ")], atol=1e-6)
    assert "d.png" in spec["layout"]["title"]["text"]


def test_cli_attribution_gallery_names_test_images_and_labels_and_reports_errors(tmp_path, written_figures):
    from wsviz.cli import main

    ck = str(ROOT / "checkpoints" / needs("scale-resnet20")[0])
    assert main(["attribution", "--checkpoint", ck, "--dataset", "mnist5k", "--limit", "3",
                 "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "attribution.csv")))
    te = load_split("mnist5k", "test")
    assert [r["image"] for r in rows] == ["0", "500", "999"]  # the test split's indices, not 0, 1, 2
    assert [int(r["label"]) for r in rows] == [int(te.labels[i]) for i in (0, 500, 999)]
    maps = np.load(tmp_path / "attribution_scale-resnet20.npy")
    model = _shipped("scale-resnet20")
    x = te.images[[0, 500, 999]]
    change = _logit_change(model, x, torch.tensor([int(r["target"]) for r in rows]))
    rel = np.abs(maps.sum((1, 2)) - change.numpy()) / np.abs(change.numpy())
    np.testing.assert_allclose([float(r["relative_delta"]) for r in rows], rel, rtol=1e-3, atol=1e-5)
    assert all(int(r["ig_steps"]) >= 64 for r in rows)
    title = written_figures["attribution.html"]["layout"]["title"]["text"]
    assert f"test image 0 of mnist5k (label {int(te.labels[0])})" in title and "first of 3" in title
    assert main(["attribution", "--checkpoint", ck, "--dataset", "mnist5k", "--limit", "2", "--method", "grad_cam",
                 "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "attribution.csv")))
    assert {r["grid"] for r in rows} == {"7x7"} and {r["layer"] for r in rows} == {"trunk.stages.2.3"}


def test_cli_attribution_passes_batch_size_and_workers_on(tmp_path, monkeypatch):
    import wsviz.analysis.attribution as attribution
    import wsviz.data.stream as stream
    from wsviz.cli import main

    seen = {"attribute": [], "take": []}
    real_attribute, real_take = attribution.attribute, stream.take

    def spy_attribute(*a, **kw):
        seen["attribute"].append(kw.get("batch_size"))
        return real_attribute(*a, **kw)

    def spy_take(*a, **kw):
        seen["take"].append((kw.get("batch_size"), kw.get("workers")))
        return real_take(*a, **kw)
    monkeypatch.setattr(attribution, "attribute", spy_attribute)
    monkeypatch.setattr(stream, "take", spy_take)
    ck = str(ROOT / "checkpoints" / needs("scale-resnet20")[0])
    assert main(["attribution", "--checkpoint", ck, "--dataset", "mnist5k", "--limit", "2", "--method", "saliency",
                 "--batch-size", "7", "--workers", "1", "--out", str(tmp_path)]) == 0
    assert seen["attribute"] == [7]
    assert (7, 1) in seen["take"]


# ------------------------------------------------------------------ taps say where they are taken
POINTS = ("post-ReLU", "pre-BN", "pre-activation", "pre-ReLU")


@pytest.mark.parametrize("name,cfg", [
    ("sharesnet_wrn_digits", {}), ("msws_resnet_digits", {"sharing": "shared"}),
    ("shardnet_vgg", {"kind": "E", "width": 16}), ("shardnet_vgg", {"kind": "S", "width": 16}),
    ("shardnet_vgg", {"kind": "SL", "width": 16}), ("sl_resnet34", {"width": 8}),
    ("sl_resnet50", {"width": 8}), ("resnet_digits", {}),
])
def test_tap_labels_say_where_the_output_is_taken_and_the_outputs_agree(name, cfg):
    """One label ("stage 1", "iteration 3") meant a post-ReLU map in one family and a pre-activation sum or a raw
    conv output before BatchNorm in another; the labels now say which, and the values bear it out."""
    from wsviz.models import create_model, list_taps

    torch.manual_seed(0)
    model = create_model(name, **cfg).eval()
    wanted = {"rate", "iteration"} if name == "msws_resnet_digits" else {"rate", "iteration", "stage", "level"}
    taps = [t for t in list_taps(model) if t.kind in wanted]
    assert taps
    c, s = model.wsviz_config["in_channels"], model.wsviz_config["input_size"]
    with torch.no_grad():
        for m in model.modules():  # BatchNorm with non-trivial statistics, so "post-BN" differs from the conv
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, c, s, s)
    maps = {f.name: f.maps for f in feature_maps(model, x[0], names=[t.name for t in taps])}
    for t in taps:
        points = [p for p in POINTS if p in t.label]
        assert len(points) == 1, f"{name}: tap {t.name} labelled {t.label!r} does not say where it is taken"
        if points[0] == "post-ReLU":
            assert maps[t.name].min() >= 0, (t.name, t.label)
        else:
            assert maps[t.name].min() < 0, (t.name, t.label)


def test_grad_cam_refuses_a_layer_that_runs_more_than_once():
    """In a weight-sharing model the shared conv is the layer a user most wants to explain, and it runs
    once per use: Grad-CAM explained its last run only (correlation 1.0 with the 2nd use, 0.04 with the 1st),
    unsaid. It is refused, naming the runs and what to pick instead; a layer run once still works."""
    from wsviz.errors import WsvizError

    class SharedTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.shared(torch.relu(self.stem(x))))
            h = torch.relu(self.shared(h))
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    net = wsviz.adopt(SharedTwice(), (1, 12, 12), taps=[])
    x = torch.rand(1, 1, 12, 12)
    with pytest.raises(WsvizError, match=r"'shared' runs 2 times in one forward pass"):
        attribute(net, x, "grad_cam", layer="shared")
    assert attribute(net, x, "grad_cam", layer="stem").maps.shape[-2:] == (12, 12)
