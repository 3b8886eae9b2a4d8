"""The Compare page's figures mean what they show: attribution panels each on their own scale, feature maps of
all variants on one scale (diverging about 0 when signed), class names from each variant's own dataset, and
an uploaded digit on grey paper prepared (and said to be prepared) like the training digits."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-compare-truth-runs-"))

from conftest import needs, open_app  # noqa: E402

from wsviz.analysis.features import FeatureMap  # noqa: E402
from wsviz.data.classes import FASHION  # noqa: E402
from wsviz.figures import attribution_figure, feature_map_range, feature_maps_figure, title_parts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def heatmaps(spec: dict) -> list[dict]:
    """The measured heatmaps of a figure (not the grey input image, drawn with hoverinfo 'skip')."""
    return [t for t in spec["data"] if t.get("type") == "heatmap" and t.get("hoverinfo") != "skip"]


def z_of(trace: dict, key: str = "z") -> np.ndarray:
    z = trace[key]
    if isinstance(z, dict):  # plotly's typed-array encoding in a chart's JSON spec
        import base64

        flat = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"])
        z = flat.reshape([int(n) for n in str(z["shape"]).split(",")]) if "shape" in z else flat
    return np.asarray(z, dtype=float)


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def title(spec: dict) -> str:
    return spec["layout"].get("title", {}).get("text", "") or ""


# ------------------------------------------------------------------ the figures themselves


def test_each_attribution_panel_is_scaled_to_its_own_maximum_and_titled_with_it():
    """A model with small logits (rot-steerable-c8's saliency peaked at 14% of the shared top) is not blank."""
    rng = np.random.default_rng(0)
    small, big = rng.random((28, 28)) * 0.14, rng.random((28, 28))
    big[3, 4] = 1.0
    fig = attribution_figure(np.zeros((28, 28)), {"small → 3": small, "big → 3": big}, "saliency")
    heat = heatmaps(fig.to_plotly_json())
    assert len(heat) == 2
    for trace, raw in zip(heat, (small, big)):
        z = z_of(trace)
        assert trace["zmin"] == 0 and trace["zmax"] == 1.0
        assert float(np.nanmax(z)) == pytest.approx(trace["zmax"])  # the brightest pixel reaches the top colour
        assert np.allclose(z * raw.max(), raw) and np.allclose(z_of(trace, "customdata"), raw)
    titles = [a["text"] for a in fig.to_plotly_json()["layout"]["annotations"]]
    assert titles[0] == "input"
    assert f"max {small.max():.3g}" in titles[1] and "max 1</sup>" in titles[2]
    assert "own scale" in fig.layout.title.text

    shared = heatmaps(attribution_figure(np.zeros((28, 28)), {"a": small, "b": big}, scale="shared").to_plotly_json())
    assert {(t["zmin"], t["zmax"]) for t in shared} == {(0, 1.0)}
    assert float(z_of(shared[0]).max()) == pytest.approx(small.max())  # raw values on the shared scale

    signed = heatmaps(attribution_figure(np.zeros((4, 4)), {"a": -2 * np.eye(4), "b": 0.5 * np.eye(4)},
                                         signed=True).to_plotly_json())
    assert all(t["zmin"] == -1 and t["zmax"] == 1 and t["zmid"] == 0 for t in signed)
    assert float(z_of(signed[0]).min()) == -1 and float(z_of(signed[1]).max()) == 1
    with pytest.raises(ValueError, match="scale must be one of"):
        attribution_figure(np.zeros((2, 2)), {"a": np.ones((2, 2))}, scale="log")


def _taps(*ranges: tuple[float, float]) -> list[FeatureMap]:
    return [FeatureMap(f"layer{i}", "rate", f"rate {i}", torch.linspace(lo, hi, 16).reshape(1, 4, 4))
            for i, (lo, hi) in enumerate(ranges)]


def test_feature_maps_of_several_variants_share_one_range_and_signed_maps_diverge_about_zero():
    a, b = _taps((0.0, 0.5), (0.1, 0.3)), _taps((-4.16, 1.27))
    lo, hi = feature_map_range(a, b)
    assert (lo, hi) == pytest.approx((-4.16, 1.27))
    specs = [feature_maps_figure(m, zrange=(lo, hi)).to_plotly_json() for m in (a, b)]
    traces = [t for s in specs for t in heatmaps(s)]
    assert len(traces) == 3
    assert len({(t["zmin"], t["zmax"]) for t in traces}) == 1
    assert (traces[0]["zmin"], traces[0]["zmax"]) == pytest.approx((-4.16, 4.16))
    for t in traces:  # zero is the scale's white middle in every panel of every figure
        assert t["zmid"] == 0 and t["zmin"] == -t["zmax"]
        assert [c for _, c in t["colorscale"]][0] != [c for _, c in t["colorscale"]][-1]
        assert t["colorscale"][0][1].lower() in ("rgb(5,48,97)", "#053061")  # RdBu_r: blue at the bottom

    unsigned = [feature_maps_figure(m, zrange=feature_map_range(a, _taps((0.0, 2.0)))).to_plotly_json()
                for m in (a, _taps((0.0, 2.0)))]
    ut = [t for s in unsigned for t in heatmaps(s)]
    assert {(t["zmin"], t["zmax"]) for t in ut} == {(0.0, 2.0)} and not any(t.get("zmid") == 0 for t in ut)
    own = heatmaps(feature_maps_figure(_taps((-1.0, 3.0))).to_plotly_json())  # one figure alone: its own range
    assert own[0]["zmin"] == -3.0 and own[0]["zmax"] == 3.0


# ------------------------------------------------------------------ the page


def test_compare_page_feature_maps_of_all_variants_share_one_scale():
    pair = needs("scale-msws-shared", "scale-msws-unshared")
    at = open_app("pages/compare.py", pair)
    radio = next(r for r in at.radio if r.label == "Named outputs")
    radio.set_value("per dilation rate").run()
    assert not at.exception
    figs = [s for s in charts(at) if "channel-mean of each rate output" in title(s)]
    assert len(figs) == 2
    traces = [t for s in figs for t in heatmaps(s)]
    scales = {(t["zmin"], t["zmax"]) for t in traces}
    assert len(scales) == 1
    lo, hi = scales.pop()
    data_lo = min(float(np.nanmin(z_of(t))) for t in traces)
    data_hi = max(float(np.nanmax(z_of(t))) for t in traces)
    assert data_lo < 0  # the per-rate outputs are signed: a diverging scale, white at zero
    assert lo == -hi and hi == pytest.approx(max(-data_lo, data_hi)) and all(t["zmid"] == 0 for t in traces)
    assert any("share one colour scale" in c.value and "diverging" in c.value for c in at.caption)


def test_compare_page_attribution_panels_each_reach_their_own_maximum():
    pair = needs("scale-msws-vanilla", "rot-steerable-c8")
    at = open_app("pages/compare.py", pair)
    next(s for s in at.selectbox if s.label == "Method").set_value("saliency").run()
    assert not at.exception
    spec = next(s for s in charts(at) if title(s).startswith("saliency"))
    heat = heatmaps(spec)
    assert len(heat) == 2
    titles = [a["text"] for a in spec["layout"]["annotations"]][1:]
    for trace, t in zip(heat, titles):
        raw = z_of(trace, "customdata")
        assert float(np.nanmax(z_of(trace))) == pytest.approx(trace["zmax"])
        assert f"max {raw.max():.3g}" in t
    at.radio(key="attr-scale").set_value("one scale for all maps").run()
    assert not at.exception
    heat = heatmaps(next(s for s in charts(at) if title(s).startswith("saliency")))
    assert len({(t["zmin"], t["zmax"]) for t in heat}) == 1
    assert min(float(np.nanmax(z_of(t))) / t["zmax"] for t in heat) < 0.5  # why the shared scale is not the default


@pytest.fixture
def fashion_variant(tmp_path, monkeypatch):
    """The shipped scale-msws-vanilla, and a copy of it whose card says it was trained on Fashion-MNIST, as the
    page's only checkpoints: two variants whose classes have different names."""
    import pages._shared as shared

    src = ROOT / "checkpoints" / needs("scale-msws-vanilla")[0]
    (tmp_path / "digits").symlink_to(src, target_is_directory=True)
    shutil.copytree(src, tmp_path / "fashion")
    card = json.loads((tmp_path / "fashion" / "card.json").read_text())
    card["dataset"] = "fashion-mnist"
    (tmp_path / "fashion" / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(shared, "CHECKPOINTS", tmp_path)
    shared.scan_checkpoints.clear()
    yield ["digits", "fashion"]
    shared.scan_checkpoints.clear()


def test_attribution_class_names_come_from_each_variants_own_dataset(fashion_variant):
    at = open_app("pages/compare.py", fashion_variant)
    assert not at.exception and not at.error
    menu = next(s for s in at.selectbox if s.label == "Class to explain")
    assert menu.options == ["the predicted class"]  # no class shared by a digit model and a clothes model
    assert any("different classes" in c.value for c in at.caption)
    spec = next(s for s in charts(at) if title(s).startswith("saliency") or title(s).startswith("integrated"))
    titles = [title_parts(a["text"])[0] for a in spec["layout"]["annotations"]]
    shown = dict(t.split(" → ") for t in titles if " → " in t)  # the maps' panels (names wrapped), not inputs
    assert shown["digits"] in [str(i) for i in range(10)]
    assert shown["fashion"] in FASHION  # its own card's names, not the first variant's digits


def test_attribution_class_menu_lists_the_shared_classes():
    pair = needs("scale-msws-vanilla", "rot-steerable-c8")
    at = open_app("pages/compare.py", pair)
    menu = next(s for s in at.selectbox if s.label == "Class to explain")
    assert menu.options == ["the predicted class"] + [str(i) for i in range(10)]
    menu.set_value("7").run()
    assert not at.exception
    spec = next(s for s in charts(at) if "for class 7" in title(s))
    assert [title_parts(a["text"])[0].split(" → ")[1] for a in spec["layout"]["annotations"][1:]] == ["7", "7"]


def _digit_png(label: int, paper: float | None) -> tuple[str, bytes]:
    from PIL import Image

    from wsviz.data.datasets import load_split

    te = load_split("mnist5k", "test")
    a = te.images[int((te.labels == label).nonzero()[1, 0]), 0].numpy()
    page = a if paper is None else paper + (0.1 - paper) * a
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(page * 255), 0, 255).astype(np.uint8)).save(buf, "PNG")
    return f"digit-{label}-{paper}.png", buf.getvalue()


def test_a_digit_on_grey_paper_is_read_like_the_digit_and_the_page_says_how():
    pair = needs("scale-msws-vanilla", "scale-resnet20")
    at = open_app("pages/compare.py", pair)
    grey, plain = _digit_png(3, 0.9), _digit_png(3, None)
    at.file_uploader[0].set_value([(n, d, "image/png") for n, d in (grey, plain)]).run()
    assert not at.exception and not at.error
    df = at.dataframe[0].value
    got = {(r.image, r.variant): (int(r.predicted), float(r.confidence)) for r in df.itertuples()}
    for v in pair:
        (p_grey, c_grey), (p_plain, c_plain) = got[grey[0], v], got[plain[0], v]
        assert p_grey == p_plain == 3 and c_grey == pytest.approx(c_plain, abs=0.02)
    notes = [c.value for c in at.caption if c.value.startswith("Prepared like the training digits")]
    assert len(notes) == 2  # one per image: both variants get the same 28x28 input
    assert "inverted" in notes[0] and "brightness 0.90" in notes[0] and "20×20 box" in notes[0]
    assert "inverted" not in notes[1] and "brightness 0.00" in notes[1]


def test_a_fashion_model_gets_the_upload_fit_not_the_digit_layout_though_its_input_shape_is_the_same(fashion_variant):
    import pages._shared as shared
    from wsviz.data.uploads import load_upload

    at = open_app("pages/compare.py", fashion_variant)
    name, data = _digit_png(3, 0.9)
    at.file_uploader[0].set_value([(name, data, "image/png")]).run()
    assert not at.exception and not at.error
    notes = [c.value for c in at.caption if c.value.startswith("Input for ")]
    assert len(notes) == 2, [c.value for c in at.caption]  # two inputs: one per layout, said for each
    digit_note = next(n for n in notes if n.startswith("Input for digits:"))
    fashion_note = next(n for n in notes if n.startswith("Input for fashion:"))
    assert "20×20 box" in digit_note and "20×20 box" not in fashion_note
    # and the model inputs themselves: each as load_upload lays it out for that model's training set
    got = shared.model_inputs_for(name, data, fashion_variant, quiet=True)
    assert torch.equal(got["fashion"][0], load_upload(data, name, 1, 28, dataset="fashion-mnist"))
    assert torch.equal(got["digits"][0], load_upload(data, name, 1, 28, dataset="mnist5k-scale"))
    assert not torch.equal(got["fashion"], got["digits"])


@pytest.mark.parametrize("page", ["pages/scale.py", "pages/rotation.py"])
def test_scale_and_rotation_pages_say_how_an_upload_became_the_models_input(page):
    """The live scale and rotation views predict on the upload as the Compare page prepares it; a grey
    page inverted and boxed like the training digits must be said there too, not only on Compare."""
    pair = needs("scale-msws-vanilla", "scale-resnet20")
    at = open_app(page, pair)
    name, data = _digit_png(3, 0.9)
    at.file_uploader[0].set_value((name, data, "image/png")).run()
    assert not at.exception and not at.error
    notes = [c.value for c in at.caption if c.value.startswith("Prepared like the training digits")]
    assert len(notes) == 1, [c.value for c in at.caption]  # both variants share one 28x28 input
    assert "inverted" in notes[0] and "brightness 0.90" in notes[0] and "20×20 box" in notes[0]


# ------------------------------------------------------------------ each attribution over its own input
def _panels(spec: dict) -> list[tuple[str, np.ndarray | None, np.ndarray | None]]:
    """(subplot title's main text, grey input drawn there or None, map drawn there or None) per subplot, in order."""
    titles = [title_parts(a["text"])[0] for a in spec["layout"]["annotations"]]
    out = []
    for j, t in enumerate(titles, start=1):
        axis = "x" if j == 1 else f"x{j}"
        here = [tr for tr in spec["data"] if tr.get("xaxis", "x") == axis]
        grey = next((z_of(tr) for tr in here if tr.get("hoverinfo") == "skip"), None)
        heat = next((z_of(tr, "customdata") for tr in here if tr.get("hoverinfo") != "skip"), None)
        out.append((t, grey, heat))
    return out


def test_attribution_figure_draws_each_map_over_its_own_input():
    a, b = np.zeros((4, 4)), np.eye(4)
    maps = {"A → 3": np.ones((4, 4)), "B → 3": 2 * np.ones((4, 4)), "C → 1": 3 * np.ones((4, 4))}
    spec = attribution_figure({"A → 3": a, "B → 3": b, "C → 1": a.copy()}, maps, opacity=0.5).to_plotly_json()
    panels = _panels(spec)
    assert [title_parts(t)[0] for t, _, _ in panels] == ["input of A, C", "A → 3", "C → 1", "input of B", "B → 3"]
    want = {"A": a, "B": b, "C": a}
    for t, grey, heat in panels:
        assert grey is not None
        if heat is not None:  # a map, drawn over its own model's input
            assert np.array_equal(grey, want[t[0]])
    one = _panels(attribution_figure(a, {"A → 3": maps["A → 3"], "B → 3": maps["B → 3"]}).to_plotly_json())
    assert [title_parts(t)[0] for t, _, _ in one] == ["input", "A → 3", "B → 3"]  # one input: drawn once


def test_compare_page_draws_each_variants_attribution_over_its_own_input(fashion_variant):
    """A digit model and a Fashion-MNIST model read one upload differently (MNIST's layout vs the image fit in a
    square): each one's map is drawn over the input it explained, not over the first variant's."""
    from wsviz.data.uploads import load_upload

    at = open_app("pages/compare.py", fashion_variant)
    name, data = _digit_png(3, 0.9)
    at.file_uploader[0].set_value([(name, data, "image/png")]).run()
    next(s for s in at.slider if s.label.startswith("Overlay")).set_value(0.5).run()
    next(s for s in at.selectbox if s.label == "Method").set_value("saliency").run()
    assert not at.exception
    own = {"digits": load_upload(data, name, 1, 28, dataset="mnist5k-scale")[0].numpy(),
           "fashion": load_upload(data, name, 1, 28, dataset="fashion-mnist")[0].numpy()}
    assert not np.allclose(own["digits"], own["fashion"])
    spec = next(s for s in charts(at) if title(s).startswith("saliency"))
    drawn = [(t.split(" → ")[0], grey) for t, grey, heat in _panels(spec) if heat is not None]
    assert sorted(v for v, _ in drawn) == ["digits", "fashion"]
    for variant, grey in drawn:
        np.testing.assert_allclose(grey, own[variant], atol=1e-6, err_msg=f"{variant}'s map over another input")
    inputs = [t for t, _, heat in _panels(spec) if heat is None]
    assert sorted(inputs) == ["input of digits", "input of fashion"]
