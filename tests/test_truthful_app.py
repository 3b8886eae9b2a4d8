"""The app's views say what the model package measures (AppTest, shipped checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-truthful-runs-"))

from conftest import needs, open_app  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from wsviz.models import summarize  # noqa: E402
from wsviz.training.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def app(page: str | None = None, variants: list[str] | None = None) -> AppTest:
    return open_app(page, variants)


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    parts += [w.value for w in at.warning]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("variant", ["scale-repeatnet-linear", "rot-steerable-c8", "scale-sharesnet",
                                     "scale-repeatnet-f"])
def test_sharing_map_agrees_with_the_compression_it_prints(variant):
    needs(variant)
    at = app(None, needs("scale-msws-vanilla", "scale-msws-shared"))
    at.selectbox(key="map-variant").set_value(variant).run()
    assert not at.exception
    s = summarize(load_checkpoint(ROOT / "checkpoints" / variant)[0])
    assert s.compression > 1
    shown = texts(at)
    assert "shares nothing" not in shown
    # effective − the real-valued params (what the compression divides; f-RepeatNet's sign masks are bits)
    real = s.unique_params - s.mask_params
    assert f"effective − params = {s.effective_params - real:,}, so {s.effective_params:,} / {real:,} = " \
           f"{s.effective_params / real:.2f}× compression" in shown
    table = at.dataframe[-1].value
    kind = {"scale-repeatnet-linear": "tiled", "rot-steerable-c8": "expanded", "scale-sharesnet": "direct",
            "scale-repeatnet-f": "tiled"}[variant]
    assert table["reuse"].str.contains(kind).all() and len(table) == len(s.shared_params())
    assert any(c.proto.spec and "Sharing map" in c.proto.spec for c in at.get("plotly_chart"))


def test_sharing_map_of_a_model_that_shares_nothing():
    at = app(None, needs("scale-msws-vanilla", "scale-msws-shared"))
    at.selectbox(key="map-variant").set_value("scale-msws-vanilla").run()
    assert "shares nothing" in texts(at)


def test_registered_architecture_map_shows_its_basis_reuse():
    at = app(None, needs("scale-msws-vanilla", "scale-msws-shared"))
    at.radio[0].set_value("a registered architecture").run()
    at.selectbox(key="map-arch").set_value("steerable_rotmnist").run()
    assert not at.exception
    assert "shares nothing" not in texts(at)
    assert at.dataframe[-1].value["reuse"].str.contains("expanded").all()


def test_kernels_page_puts_the_same_place_side_by_side():
    pair = needs("scale-sharesnet-unshared", "scale-sharesnet")
    at = app("pages/kernels.py", pair)
    assert not at.error
    chosen = {v: at.selectbox(key=f"layer-{v}").value for v in pair}
    assert set(chosen.values()) == {"stages.2.2.conv2"}
    shown = texts(at)
    assert "shared: applied 2x per forward pass here and at stages.2.1.conv2" in shown
    assert "different places" not in shown
    sims = next(d.value for d in at.dataframe if "two random sets" in d.value.columns)  # not the kernels' table
    assert sims["reading"].iloc[0] in (
        "more alike than chance", "no more alike than two random sets")
    # choosing a different place for one variant is said out loud
    at.selectbox(key="layer-scale-sharesnet").set_value("stages.2.2.conv1").run()
    assert "different places" in texts(at)


def test_kernels_page_says_how_repeatnet_realises_its_layer():
    pair = needs("scale-repeatnet-dense", "scale-repeatnet-linear")
    at = app("pages/kernels.py", pair)
    shown = texts(at)
    assert "tiling" in shown and "each stored weight applied 4x" in shown


def test_fair_comparison_compares_only_within_a_test_set():
    trio = needs("rot-cnn", "scale-msws-shared", "rot-steerable-c8")
    at = app(None, trio)
    next(b for b in at.button if "Evaluate" in b.label).click().run()
    assert not at.exception
    warning = " ".join(w.value for w in at.warning)
    assert "2 different test sets" in warning and "2 cross-set pairs are not tested" in warning
    verdicts = [m.value for m in at.markdown if m.value.startswith((":material/check_circle:", ":material/remove:"))]
    assert len(verdicts) == 1 and "rot-cnn" in verdicts[0] and "rot-steerable-c8" in verdicts[0]
    skipped = [m.value for m in at.markdown if "different test sets" in m.value]
    assert len(skipped) == 2 and all("scale-msws-shared" in s for s in skipped)


def test_compare_page_offers_the_grad_cam_layer():
    pair = needs("scale-wsms-1x1", "scale-resnet20")
    at = app("pages/compare.py", pair)
    at.selectbox[0].set_value("grad_cam").run()
    assert not at.exception
    assert at.selectbox(key="cam-layer-scale-wsms-1x1").value == "integrated"
    at.selectbox(key="cam-layer-scale-wsms-1x1").set_value("stage_taps.0").run()
    assert not at.exception and not at.error
