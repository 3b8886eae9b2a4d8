"""End to end: `streamlit run app.py`, every page in headless Chromium (Playwright), an upload.

Screenshots of each page are kept in artifacts/e2e/. Needs Debian's `chromium` and the
`playwright` Python package (no browser download: Playwright drives /usr/bin/chromium).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CHROMIUM, digit_png, expected_predictions

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "e2e"
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]
PAGES = ["", "kernels", "compare", "scale", "rotation", "embeddings", "train", "share"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_RUNS: dict[str, Path] = {}  # the run store folder of the module's server


@contextmanager
def streamlit_server(tmp_path_factory, address: str = "localhost", unset: tuple[str, ...] = (), **env_extra: str):
    """``streamlit run app.py`` on a free port of ``address`` with a fresh run store; yields (url, runs folder)."""
    port = _free_port()
    runs = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, WSVIZ_RUNS=str(runs), **env_extra)
    for name in unset:
        env.pop(name, None)
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", address, "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{address}:{port}"
    try:
        t0 = time.time()
        while time.time() - t0 < 90:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            proc.kill()
            pytest.fail("streamlit did not start: " + Path(log.name).read_text()[-2000:])
        yield url, runs
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with streamlit_server(tmp_path_factory) as (url, runs):
        SERVER_RUNS["dir"] = runs
        yield url




def _settle(page, timeout: float = 240.0) -> None:
    """Wait until the page has finished rendering: its title is there, the script has stopped
    (``stApp``'s ``data-test-script-state`` is ``notRunning``) and the DOM has not changed for 3 s
    (charts draw after the script ends). A page that does not settle within ``timeout`` fails
    the test, saying what was still changing."""
    page.wait_for_selector("[data-testid=stMain] h1", timeout=180_000)
    probe = ("() => [document.querySelectorAll('*').length, document.body.innerText.length, "
             "(document.querySelector('[data-testid=stApp]') || {getAttribute: () => 'no stApp'})"
             ".getAttribute('data-test-script-state')]")
    t0, last, stable, history = time.time(), None, 0, []
    while time.time() - t0 < timeout:
        now = page.evaluate(probe)
        history.append((round(time.time() - t0, 1), *now))
        stable = stable + 1 if now == last and now[2] == "notRunning" else 0
        if stable >= 6:
            return
        last = now
        page.wait_for_timeout(500)
    changes = [h for a, h in zip(history, history[1:]) if a[1:] != h[1:]][-8:]
    pytest.fail(f"{page.url} did not settle within {timeout:.0f} s. Last changes as (seconds, elements, text "
                f"length, script state): {changes or history[-3:]}; text at the end: "
                f"{page.evaluate('() => document.body.innerText')[-600:]!r}")


def _check(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name or 'models'}.png"), full_page=True)
    errors = page.locator("[data-testid=stException]")
    assert errors.count() == 0, f"exception on page {name!r}: {errors.first.inner_text()[:1000]}"


def _shown_metrics(page) -> list[tuple[str, str]]:
    """(label, value) of every metric on the page, in page order."""
    return [(m.locator("[data-testid=stMetricLabel]").inner_text().strip(),
             m.locator("[data-testid=stMetricValue]").inner_text().strip())
            for m in page.locator("[data-testid=stMetric]").all()]


def test_uploads_on_compare_page_drive_the_predictions(server, browser, tmp_path):
    """Two digit files uploaded through the browser: the page names each one and shows, for each,
    the class every variant predicts on that file's pixels (computed here without the app)."""
    files = [digit_png(3), digit_png(7)]
    paths = []
    for name, data in files:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/compare")
    _settle(page)
    sample = _shown_metrics(page)
    assert sample, "the Compare page shows predictions for its built-in sample"
    variants = [label for label, _ in sample]
    page.set_input_files("input[type=file]", paths)
    for name, _ in files:
        page.wait_for_selector(f"text={name}", timeout=60_000)
    _settle(page)
    _check(page, "compare-upload")
    shown = _shown_metrics(page)
    expected = []
    for name, data in files:
        pred = expected_predictions(ROOT / "checkpoints", variants, name, data)
        expected += [(v, str(pred[v][0])) for v in variants]  # digit models: the class name is the digit
    assert shown == expected
    assert {value for _, value in shown[: len(variants)]} == {"3"}  # both digits read correctly,
    assert {value for _, value in shown[len(variants):]} == {"7"}  # so the two uploads differ
    page.close()


SIX = ["scale-resnet20", "scale-wsms-1x1", "scale-msnet-1x1", "scale-msws-vanilla", "scale-msws-shared",
       "scale-sharesnet"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_and_holds_at_800_px(server, browser, path):
    """Each page with six variants renders without exception at 1400 px; narrowed to 800 px (the window
    resized, as a user does: columns reflow without a rerun) it still shows no exception and no
    prediction label or value is cut off. (One page load for both: these were two tests, 14 loads.)"""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/{path}?variants={','.join(SIX)}")
    _settle(page)
    assert page.locator("h1").count() >= 1
    _check(page, path)
    page.set_viewport_size({"width": 800, "height": 1000})
    _settle(page)
    assert page.evaluate("() => window.innerWidth") == 800
    _check(page, f"800px-{path or 'models'}")
    cut = page.evaluate("() => [...document.querySelectorAll('[data-testid=stMetricValue] div, "
                        "[data-testid=stMetricLabel] p')].filter(e => e.scrollWidth > e.clientWidth + 1)"
                        ".map(e => e.innerText)")
    assert cut == [], f"cut off at 800 px: {cut}"
    page.close()


def test_a_sweep_runs_while_the_live_slider_answers(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/scale?variants={','.join(SIX)}")
    _settle(page)
    page.get_by_role("button", name="Run the sweep").click()
    page.wait_for_selector("text=Scale sweep:", timeout=60_000)  # its progress bar: the sweep is running
    last_img = ("() => { const im = document.querySelectorAll('[data-testid=stImage] img'); "
                "return im.length ? im[im.length - 1].src : ''; }")
    before = page.evaluate(last_img)
    slider = page.locator("[data-testid=stSlider] input[type=range]").first
    slider.focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"({last_img})() !== {json.dumps(before)}", timeout=60_000)
    assert page.get_by_text("Scale sweep:").count() >= 1, "the slider only answered once the sweep had ended"
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("text=The scale sweep was cancelled", timeout=60_000)
    page.close()


def test_train_page_watches_the_newest_run(server, browser):
    from wsviz.training.runstore import RunStore

    store = RunStore(SERVER_RUNS["dir"])
    spec = {"model": "resnet_digits", "dataset": "mnist5k", "train_config": {"epochs": 1}, "overrides": {}}
    for name in ("older-run", "newer-run"):
        run = store.create("resnet_digits", "mnist5k", spec, name)
        store.finish(run.id, "cancelled", "made by the test")
        time.sleep(0.05)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/train")
    _settle(page)
    box = page.locator("[data-testid=stSelectbox]").filter(has_text="Watch run").first
    shown = box.evaluate("e => e.innerText + ' | ' + [...e.querySelectorAll('input')].map(i => i.value + ' ' + "
                         "(i.getAttribute('aria-label') || '') + ' ' + (i.placeholder || '')).join(' ')")
    assert "newer-run" in shown and "older-run" not in shown, shown
    _check(page, "train-runs")
    page.close()


def test_both_fair_comparison_figures_download_and_open_offline(server, browser):
    """Downloading the first figure neither reruns the page nor loses the result, so the second can be
    downloaded too; each file carries plotly.js itself (no CDN), so it opens offline."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(f"{server}/?variants=scale-msws-vanilla,scale-msws-shared")
    _settle(page)
    page.get_by_role("button", name="Evaluate the chosen variants").click()
    page.wait_for_selector("text=McNemar p", timeout=180_000)
    _settle(page)
    charts = page.locator("[data-testid=stPlotlyChart]").count()
    buttons = page.get_by_role("button", name="Download figure (HTML)")
    files = []
    for i in range(buttons.count())[-2:]:  # the fair comparison's two figures are the last two
        with page.expect_download(timeout=120_000) as dl:
            buttons.nth(i).click()
        files.append(Path(dl.value.path()).read_text())
        page.wait_for_timeout(1000)
        assert page.locator("[data-testid=stPlotlyChart]").count() == charts, "the download cleared the result"
    assert len(files) == 2 and files[0] != files[1]
    for html in files:
        assert not re.search(r"<script[^>]*\bsrc=[\"']https?://", html)  # nothing loaded from the network
        assert len(html) > 1_000_000 and "Plotly.newPlot" in html  # plotly.js is inside the file
    page.close()
