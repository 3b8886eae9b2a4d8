"""End to end: `streamlit run app.py`, every page in headless Chromium (Playwright), an upload.

Screenshots of each page are kept in artifacts/e2e/. Needs Debian's `chromium` and the
`playwright` Python package (no browser download: Playwright drives /usr/bin/chromium).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "e2e"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]
PAGES = ["", "kernels", "compare", "scale", "rotation", "embeddings", "train"]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, WSVIZ_RUNS=str(tmp_path_factory.mktemp("runs")))
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
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
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _settle(page, timeout: float = 240.0) -> None:
    """Wait until the page has finished rendering: its title is there and the DOM has not
    changed for 3 s (a script still running keeps adding elements)."""
    page.wait_for_selector("[data-testid=stMain] h1", timeout=180_000)
    probe = "() => document.querySelectorAll('*').length + ':' + document.body.innerText.length"
    t0, last, stable = time.time(), None, 0
    while time.time() - t0 < timeout:
        now = page.evaluate(probe)
        stable = stable + 1 if now == last else 0
        if stable >= 6:
            return
        last = now
        page.wait_for_timeout(500)


def _check(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name or 'models'}.png"), full_page=True)
    errors = page.locator("[data-testid=stException]")
    assert errors.count() == 0, f"exception on page {name!r}: {errors.first.inner_text()[:1000]}"


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_without_exception(server, browser, path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/{path}")
    _settle(page)
    assert page.locator("h1").count() >= 1
    _check(page, path)
    page.close()


def test_upload_on_compare_page(server, browser, tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(img).ellipse((35, 15, 85, 75), outline="black", width=8)  # a hand-drawn-looking zero
    path = tmp_path / "zero.jpg"
    img.save(path)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/compare")
    _settle(page)
    page.set_input_files("input[type=file]", str(path))
    page.wait_for_selector("text=zero.jpg", timeout=60_000)
    _settle(page)
    _check(page, "compare-upload")
    assert page.locator("[data-testid=stMetric]").count() >= 1
    page.close()
