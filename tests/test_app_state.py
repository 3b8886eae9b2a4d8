"""State that holds and figures that can be read (AppTest, shipped checkpoints)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-state-runs-"))

from conftest import open_app  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {p.name for p in (ROOT / "checkpoints").iterdir() if (p / "card.json").is_file()}
PAIR = ["scale-msws-vanilla", "scale-msws-shared"]
pytestmark = pytest.mark.skipif(not set(PAIR) <= SHIPPED, reason="needs the shipped msws checkpoints")


def app(page: str | None = None, variants: list[str] | None = None, url_variants: str | None = None) -> AppTest:
    return open_app(page, variants, url_variants)


def test_sidebar_choice_is_written_to_the_url_and_read_back_by_a_new_session():
    # (AppTest runs app.py, which owns the sidebar, on a session's first run only: one session each)
    for chosen in (PAIR, ["scale-msws-shared"]):
        at = app(variants=chosen)
        assert at.query_params["variants"] in ([",".join(chosen)], ",".join(chosen))
    fresh = app(url_variants="scale-msws-shared,scale-msws-vanilla")  # a reload: a new session with that URL
    assert fresh.session_state["variants"] == ["scale-msws-shared", "scale-msws-vanilla"]


def test_fair_comparison_survives_other_widgets():
    at = app(variants=PAIR)
    next(b for b in at.button if "Evaluate" in b.label).click().run()
    charts = len(at.get("plotly_chart"))
    assert charts >= 2
    at.multiselect(key="families").set_value(["msws"]).run()  # an unrelated widget
    assert len(at.get("plotly_chart")) == charts
    at.radio[0].set_value("a registered architecture").run()
    assert len(at.get("plotly_chart")) == charts and any("McNemar" in m.value for m in at.markdown)
    at.session_state["variants"] = PAIR[:1]  # its inputs changed (the sidebar): no stale result
    at.run()
    assert len(at.get("plotly_chart")) == 0
    assert any("evaluate again" in c.value for c in at.caption)


def heatmap_scales(at: AppTest) -> list[tuple[str, list[dict]]]:
    out = []
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        # the grey input image (drawn with hoverinfo "skip") is not a measurement
        heat = [t for t in spec["data"] if t.get("type") == "heatmap" and t.get("hoverinfo") != "skip"]
        if heat:
            out.append((spec["layout"].get("title", {}).get("text", ""), heat))
    return out


def check_readable(at: AppTest) -> int:
    figures = heatmap_scales(at)
    for title, heat in figures:
        assert any(t.get("showscale") for t in heat), f"no colour bar on {title!r}"
        assert len({(t.get("zmin"), t.get("zmax")) for t in heat}) == 1, f"panels of {title!r} use different scales"
        assert all(t.get("zmin") is not None for t in heat)
    return len(figures)


def test_every_heatmap_on_the_compare_page_has_one_colour_scale():
    at = app("pages/compare.py", PAIR)
    n = check_readable(at)
    for method in ("integrated_gradients", "saliency", "grad_cam"):
        next(s for s in at.selectbox if s.label == "Method").set_value(method).run()
        assert not at.exception
        n += check_readable(at)
    assert n >= 4  # feature maps of two variants and the attribution figures


def test_integrated_gradients_are_centred_at_zero():
    at = app("pages/compare.py", PAIR)
    next(s for s in at.selectbox if s.label == "Method").set_value("integrated_gradients").run()
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if "integrated gradients" in json.loads(c.proto.spec)["layout"].get("title", {}).get("text", ""))
    heat = [t for t in spec["data"] if t.get("type") == "heatmap" and t.get("hoverinfo") != "skip"]
    assert heat and all(t["zmin"] == -t["zmax"] and t.get("zmid") == 0 for t in heat)


def test_every_heatmap_on_the_kernels_and_scale_pages_has_a_colour_scale():
    at = app("pages/kernels.py", PAIR)
    assert check_readable(at) >= 1
    sl = app("pages/kernels.py", ["scale-shardnet-SL", "scale-shardnet-S"]) if "scale-shardnet-SL" in SHIPPED else None
    if sl is not None:
        assert check_readable(sl) >= 2  # kernels and blending layers
    sc = app("pages/scale.py", PAIR)
    check_readable(sc)  # the Scale page draws line charts; any heatmap it draws must be readable too


def test_train_page_watches_each_new_launch():
    """After a second launch the page watches the second run, not the first one still chosen."""
    from conftest import kill_active_runs

    at = app("pages/train.py", PAIR)
    launched = []
    try:
        for name in ("first-launch", "second-launch"):
            at.selectbox[0].set_value("resnet_digits")
            at.selectbox[1].set_value("mnist5k")
            at.number_input[0].set_value(1)
            at.number_input[1].set_value(16)
            at.text_input[0].set_value(name)
            at.text_input[1].set_value('{"base_width": 4, "depth": 8}')
            at.button[0].click().run()
            assert not at.exception and any(name in s.value for s in at.success), [e.value for e in at.error]
            launched.append(at.session_state["watch-select"])
            watched = at.selectbox(key="watch-select")
            assert watched.value == launched[-1] and name in watched.format_func(watched.value)
        assert launched[0] != launched[1]
    finally:
        kill_active_runs(os.environ["WSVIZ_RUNS"])
