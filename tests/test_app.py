"""Every page runs headless (streamlit.testing AppTest) with the shipped checkpoints."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from conftest import digit_png, expected_predictions, kill_active_runs, open_app

RUNS = Path(tempfile.mkdtemp(prefix="wsviz-apptest-runs-"))
os.environ["WSVIZ_RUNS"] = str(RUNS)  # before the pages import their settings

from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if (p / "card.json").is_file())
pytestmark = pytest.mark.skipif(len(SHIPPED) < 2, reason="needs at least two shipped checkpoints")


def app(page: str | None = None, variants: list[str] | None = None) -> AppTest:
    return open_app(page, variants)


def pair() -> list[str]:
    wanted = [v for v in ("scale-msws-vanilla", "scale-msws-shared") if v in SHIPPED]
    return wanted if len(wanted) == 2 else SHIPPED[:2]


def test_models_page_lists_models_variants_and_sharing_map():
    at = app(variants=pair())
    at.multiselect(key="families").set_value(["shardnet"]).run()
    assert not at.exception
    names = set(at.dataframe[0].value["name"])
    assert {"shardnet_vgg", "sl_resnet34"} <= names
    assert not any(m.label == "params" for m in at.metric)  # nothing traced until a model is chosen
    at.selectbox(key="map-variant").set_value(pair()[1]).run()
    assert not at.exception
    assert any(m.label == "params" for m in at.metric)
    assert len(at.dataframe) >= 3  # zoo, trained variants, sharing map
    at.button[0].click().run()  # evaluate the chosen variants
    assert not at.exception
    assert any("McNemar" in md.value for md in at.markdown)


def test_kernels_page(monkeypatch):
    import wsviz.models
    import wsviz.models.accounting

    at = app("pages/kernels.py", pair())
    assert not at.error
    traced = []  # listing a model's kernel layers and collecting a layer's kernels each trace the model
    for module, fn in ((wsviz.models, "reuse_report"), (wsviz.models, "applied_weights"),
                       (wsviz.models.accounting, "sharing_report")):  # kernel_layers traces through the last
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _f=real, _n=fn, **k: traced.append(_n) or _f(*a, **k))
    at.slider[0].set_value(32).run()
    assert not at.exception
    assert len(at.get("plotly_chart")) >= 1
    assert traced == [], f"moving k re-traced the models ({traced}): seconds per rerun for a ResNet-152"


def test_kernels_page_shows_a_tiled_layers_kernels_once():
    """scale-repeatnet-linear tiles its stored kernels 4 times: by default the page shows 64 different kernels
    and says each is applied at 4 positions; with 'Each kernel once' off it says 48 of the 64 repeat."""
    if "scale-repeatnet-linear" not in SHIPPED:
        pytest.skip("needs the shipped scale-repeatnet-linear")
    at = app("pages/kernels.py", ["scale-repeatnet-linear", "scale-resnet20"])
    assert not at.exception and not at.error
    said = [c.value for c in at.caption]
    assert "Each of these 64 kernels is applied at 4 (out, in) positions: the layer repeats its stored kernels " \
           "('positions' in the table)." in said
    assert any(t.value.startswith("How alike") for t in at.subheader)
    at.checkbox(key="kernel-distinct").uncheck().run()
    assert not at.exception
    said = [c.value for c in at.caption]
    assert any(c.startswith("48 of these 64 positions repeat a kernel shown at another") for c in said)


def test_blending_highlight_stops_at_half_a_row():
    """ShaRDNet-SL's blending layers have 32 inputs per row: at most 16 per side can be marked, so the
    slider stops there and the legend never claims more than is drawn."""
    if "scale-shardnet-SL" not in SHIPPED:
        pytest.skip("needs the shipped scale-shardnet-SL")
    at = app("pages/kernels.py", ["scale-shardnet-SL"])
    slider = next(s for s in at.slider if s.label.startswith("highlight per row"))
    assert slider.max == 16 and slider.value == 8
    slider.set_value(16).run()
    assert not at.exception


def shown_predictions(at: AppTest) -> dict[str, tuple[int, float]]:
    """Per image shown on the Compare page: {(image, variant): (predicted class, confidence)} from its table."""
    df = at.dataframe[0].value
    return {(r.image, r.variant): (int(r.predicted), float(r.confidence)) for r in df.itertuples()}


def test_compare_page_with_a_sample_then_two_uploads():
    """The page's predictions come from the uploaded pixels: each upload is named, its prediction is what the
    model computes on that file, and two uploads of different digits get different predictions."""
    at = app("pages/compare.py", pair())
    assert not at.exception and not at.error
    assert len(at.metric) == 2
    sample = at.subheader[0].value
    assert sample.startswith("digit 0")
    for kind in at.radio[0].options:
        at.radio[0].set_value(kind).run()
        assert not at.exception
    at.selectbox[0].set_value("saliency").run()
    assert not at.exception

    uploads = [digit_png(3), digit_png(7)]
    at.file_uploader[0].upload(*uploads[0], "image/png").run()
    assert not at.exception and not at.error
    assert [h.value for h in at.subheader] == [uploads[0][0]]  # the upload replaces the sample
    first = shown_predictions(at)
    at.file_uploader[0].set_value([(n, d, "image/png") for n, d in uploads]).run()
    assert not at.exception and not at.error
    assert [h.value for h in at.subheader] == [n for n, _ in uploads]
    both = shown_predictions(at)
    assert {k: v for k, v in both.items() if k[0] == uploads[0][0]} == first
    for name, data in uploads:
        for variant, (pred, conf) in expected_predictions(ROOT / "checkpoints", pair(), name, data).items():
            assert both[name, variant][0] == pred and both[name, variant][1] == pytest.approx(conf, abs=1e-6)
    for variant in pair():  # the two digits are told apart (here: both read correctly)
        assert (both[uploads[0][0], variant][0], both[uploads[1][0], variant][0]) == (3, 7), both
    assert not any(sample == h.value for h in at.subheader)


def test_compare_page_reports_a_corrupt_upload():
    at = app("pages/compare.py", pair())
    at.file_uploader[0].upload("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png").run()
    assert not at.exception
    assert len([e for e in at.error if "broken.png" in e.value]) == 1  # said once, not once per section
    assert not [h.value for h in at.header]  # no 'Feature maps' or 'Attributions' headers over nothing
    assert [i.value for i in at.info] == ["No feature maps or attributions for broken.png: none of the chosen "
                                          "variants could read it (said above). Upload another image or remove this "
                                          "one to see a sample."]


def test_compare_page_with_real_photo_uploads():
    import sklearn.datasets

    photos = sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))[:2]
    at = app("pages/compare.py", pair())
    files = [(p.name, p.read_bytes()) for p in photos]
    at.file_uploader[0].set_value([(n, d, "image/jpeg") for n, d in files]).run()
    assert not at.exception and not at.error
    assert [h.value for h in at.subheader] == [p.name for p in photos]
    assert len(at.metric) == 2 * len(photos)
    shown = shown_predictions(at)
    for name, data in files:
        for variant, (pred, conf) in expected_predictions(ROOT / "checkpoints", pair(), name, data).items():
            assert shown[name, variant] == (pred, pytest.approx(conf, abs=1e-6))
    # two photos, two different inputs: the model's confidence tells them apart
    for variant in pair():
        assert shown[photos[0].name, variant] != shown[photos[1].name, variant]


def test_scale_page_slider_and_sweep():
    at = app("pages/scale.py", pair())
    before = [m.value for m in at.metric]
    at.slider[0].set_value(0.4).run()
    assert not at.exception
    assert len(at.metric) == len(before) == 2
    at.slider[1].set_value(100).run()
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    assert not at.exception
    wait_for_charts(at, 3)


def test_scale_sweep_survives_a_model_without_level_outputs():
    """ShaRDNet-S has only iteration outputs: its per-layer invariance cannot be measured, which the page
    says by name, while the sweep of both models and the other's invariance are still drawn."""
    if not {"scale-resnet20", "scale-shardnet-S"} <= set(SHIPPED):
        pytest.skip("needs the shipped scale-resnet20 and scale-shardnet-S")
    at = app("pages/scale.py", ["scale-resnet20", "scale-shardnet-S"])
    at.slider[1].set_value(100).run()
    next(m for m in at.multiselect if m.label == "Scales").set_value([0.5, 1.0]).run()
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    wait_for_charts(at, 3)
    assert any("No per-layer invariance for scale-shardnet-S" in i.value for i in at.info)
    assert not at.error


def page_function(page: str, name: str):
    """A top-level function of a page script, defined alone (running the page would draw it): its
    source runs from ``def name`` to the next blank-line pair; it imports what it needs itself."""
    source = (ROOT / "pages" / page).read_text()
    scope: dict = {}
    exec(source[source.index(f"def {name}"):].split("\n\n\n")[0], scope)
    return scope[name]


def test_the_invariance_images_are_spread_over_the_set():
    """The digits are sorted by class: the first 64 of 1,000 are all zeros. The sample spans the set."""
    invariance_sample = page_function("scale.py", "invariance_sample")
    idx = invariance_sample(1000)
    assert len(idx) == 64 and idx[0] == 0 and idx[-1] == 999
    assert invariance_sample(10) == list(range(10))
    from wsviz.data.stream import eval_data, take

    _, labels = take(eval_data("mnist5k", "test", limit=1000), idx)
    assert len(set(labels.tolist())) == 10


def wait_for_charts(at: AppTest, n: int, timeout: float = 240) -> None:
    """Background work ends while the page shows its progress: rerun until its figures are drawn."""
    t0 = time.time()
    while len(at.get("plotly_chart")) < n and time.time() - t0 < timeout:
        time.sleep(0.5)
        at.run()
        assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= n, "the background work did not finish in time"


def test_rotation_page():
    rot = [v for v in ("rot-cnn", "rot-repeat-swish-c8", "rot-steerable-c8") if v in SHIPPED]
    at = app("pages/rotation.py", rot or pair())
    assert not at.exception
    at.slider[0].set_value(100).run()
    next(b for b in at.button if b.label == "Run the rotation sweep").click().run()
    assert not at.exception
    wait_for_charts(at, 1)
    next(s for s in at.slider if s.label == "Angle").set_value(90).run()  # the live angle slider
    assert not at.exception


def test_embeddings_page():
    at = app("pages/embeddings.py", pair())
    assert not at.exception
    at.slider[0].set_value(200).run()
    assert not at.exception and len(at.get("plotly_chart")) == 2  # the two chosen variants, side by side


def test_train_page_launch_and_cancel():
    at = app("pages/train.py", pair())
    at.selectbox[0].set_value("resnet_digits")
    at.selectbox[1].set_value("mnist5k")
    at.number_input[0].set_value(50)  # epochs: long enough to cancel
    at.number_input[1].set_value(32)
    at.text_input[1].set_value('{"base_width": 8, "depth": 8}')
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    assert any("Launched" in s.value for s in at.success), [e.value for e in at.error]
    from wsviz.training.runstore import RunStore

    store = RunStore(RUNS)
    run = store.list()[0]
    t0 = time.time()
    while store.get(run.id).status == "queued" and time.time() - t0 < 60:
        time.sleep(0.2)
    at.run()
    cancel = [b for b in at.button if b.label == "Cancel this run"]
    assert cancel, "an active run offers a cancel button"
    cancel[0].click().run()
    t0 = time.time()
    while store.get(run.id).active and time.time() - t0 < 60:
        time.sleep(0.2)
    assert store.get(run.id).status == "cancelled"


def test_train_page_refuses_bad_options():
    at = app("pages/train.py", pair())
    at.text_input[1].set_value('{"sharing": "half"}')
    at.button[0].click().run()
    assert not at.exception
    assert at.error and "sharing" in at.error[0].value


@pytest.fixture(scope="module", autouse=True)
def _no_stray_jobs():
    """No training launched from the Train page outlives this module, even if a test fails."""
    yield
    kill_active_runs(RUNS)


@pytest.mark.parametrize("name", ["scale-repeatnet-f", "rot-repeat-swish-c8", "scale-msws-shared"])
def test_the_sharing_sentence_adds_up_to_the_compression_shown(name):
    """The Models page's sharing map in words: effective − params is never negative (f-RepeatNet's sign
    masks are bits, said apart, not parameters) and is what the compression metric divides."""
    from wsviz.models import summarize
    from wsviz.sharingmap import SharingMap
    from wsviz.training.checkpoint import load_checkpoint

    s = SharingMap.from_summary(summarize(load_checkpoint(ROOT / "checkpoints" / name)[0]))
    stored, applied = sum(r.numel for r in s.reused), sum(r.applied for r in s.reused)
    text = page_function("models.py", "sharing_sentence")(s, len(s.reused), stored, applied)
    gap = s.effective_params - s.float_params
    assert gap > 0 and f"effective − params = {gap:,}" in text and f"{s.compression:.2f}× compression" in text
    assert gap == applied - stored + s.others + s.mask_params  # the sentence's parts add up to it
    assert ("sign-mask latents are stored as bits" in text) == (s.mask_params > 0)
    assert ("swish pairs" in text) == name.startswith("rot-repeat-swish")
