"""App responsiveness in a real browser (headless Debian Chromium driven by Playwright).

* cold start: from launching ``streamlit run app.py`` to the Models page showing its model
  table — target 3 s. Measured ``--starts`` times (median reported) and, in the same run, for
  a bare Streamlit app that shows one small table: the framework's own floor on this machine
  (server start, page load, websocket, a dataframe's first render), so the ratio says what
  wsviz adds on top of Streamlit. Each is taken with a fresh browser profile (nothing cached)
  and with a browser that has opened the app before (Streamlit's static files in its HTTP
  cache: what a researcher who restarts the app sees).
* scale slider: time from moving the Scale page's slider to every variant's prediction being
  redrawn, with 6 variants chosen, on CPU — target 0.3 s. Median of ``--moves`` moves, each
  after the previous update has settled (so one move's image fetches don't bleed into the next).

* sharing map of the largest registered architecture: from choosing it to its map on screen —
  target about 3 s — against building and tracing it live in the same run; and page switches:
  from a click in the navigation to the new page's title (median and worst).

    python -m benchmarks.bench_app [--starts 3] [--moves 15] [--json out.json] [--only navigation]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SIX = ["scale-resnet20", "scale-wsms-1x1", "scale-msnet-1x1", "scale-msws-vanilla", "scale-msws-shared",
       "scale-sharesnet"]
BARE_APP = """import pandas as pd
import streamlit as st
st.title("bare")
st.dataframe(pd.DataFrame({"name": ["a", "b", "c"], "params": [1, 2, 3]}), hide_index=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(script: Path, cwd: Path, env: dict):
    """Start ``streamlit run script``; yields (port, t0, process) with t0 taken just before the launch.
    A server that exits, or does not answer within 120 s, is an error."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
                             "--server.headless", "true"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start ({proc.returncode})") from None
                time.sleep(0.05)
        yield port, t0, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cold_start(browser, script: Path, cwd: Path, env: dict, context=None) -> float:
    """Seconds from launching the server to the first table on screen; a fresh browser profile
    unless ``context`` (a browser context that has seen the app before: its HTTP cache holds
    Streamlit's static files, as a researcher's browser does when they restart the app)."""
    page = context.new_page() if context else browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        with server(script, cwd, env) as (port, t0, _):
            page.goto(f"http://localhost:{port}/")
            page.wait_for_selector("[data-testid=stDataFrame]", timeout=120_000)
            return time.perf_counter() - t0
    finally:
        page.close()


def slider_moves(browser, env: dict, moves: int) -> list[float]:
    with server(ROOT / "app.py", ROOT, env) as (port, _, _):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://localhost:{port}/scale?variants={','.join(SIX)}")
        page.wait_for_function(f"document.querySelectorAll('[data-testid=stMetric]').length >= {len(SIX)}",
                               timeout=120_000)
        slider = page.locator("[data-testid=stSlider] input[type=range]").first
        # The model input is drawn after every prediction: once it changed, all of them are up to date.
        last_img = "() => { const im = document.querySelectorAll('[data-testid=stImage] img'); " \
                   "return im.length ? im[im.length - 1].src : ''; }"
        times = []
        for i in range(moves):
            page.wait_for_timeout(500)  # let the previous update finish (image fetches) before timing this one
            before = page.evaluate(last_img)
            slider.focus()
            t1 = time.perf_counter()
            page.keyboard.press("ArrowLeft" if i % 2 else "ArrowRight")
            page.wait_for_function(f"({last_img})() !== {json.dumps(before)}", timeout=60_000)
            times.append(time.perf_counter() - t1)
            assert page.locator("[data-testid=stMetric]").count() >= len(SIX)
        return times


def largest_architecture() -> str:
    from wsviz.catalog import load_catalog

    return max(load_catalog(), key=lambda r: r["unique_params"])["name"]


def sharing_map_and_page_switch(browser, env: dict, repeats: int) -> dict:
    """Seconds from choosing the largest registered architecture in the Models page's sharing map to
    its map on screen; and from clicking a page in the navigation to that page's title and first
    content. Baseline in the same run: building and tracing that architecture live (what the page
    did before the map was precomputed)."""
    name = largest_architecture()
    pages = {"Kernels": "Kernels", "Compare on images": "Compare on images", "Scale": "Scale", "Rotation": "Rotation",
             "Embeddings": "Embeddings", "Train": "Train", "Models": "Model zoo"}  # navigation label: page title
    with server(ROOT / "app.py", ROOT, env) as (port, _, _):
        maps, switches = [], []
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://localhost:{port}/?variants={','.join(SIX[:2])}")
            page.wait_for_selector("[data-testid=stDataFrame]", timeout=120_000)
            page.get_by_text("a registered architecture").click()
            box = page.locator("[data-testid=stSelectbox]").filter(has_text="Architecture").first
            box.wait_for(timeout=60_000)
            box.locator("input").first.click()
            page.keyboard.type(name)
            t1 = time.perf_counter()
            page.keyboard.press("Enter")
            page.wait_for_selector("text=effective − unique", timeout=120_000)
            maps.append(time.perf_counter() - t1)
            for link, title in pages.items():
                page.wait_for_timeout(300)
                t1 = time.perf_counter()
                page.locator("[data-testid=stSidebarNav] a").filter(has_text=link).first.click()
                page.wait_for_function(
                    "t => { const h = document.querySelector('[data-testid=stMain] h1'); "
                    "return h && h.innerText.trim() === t; }", arg=title, timeout=120_000)
                switches.append(time.perf_counter() - t1)
            page.close()
    from wsviz.models import create_model, summarize

    live = []
    for _ in range(max(1, repeats)):
        t1 = time.perf_counter()
        summarize(create_model(name))
        live.append(time.perf_counter() - t1)
    med = statistics.median
    return {"sharing_map_architecture": name, "sharing_map_s_median": round(med(maps), 2),
            "sharing_map_s_all": [round(t, 2) for t in maps], "live_trace_baseline_s": round(med(live), 2),
            "page_switch_s_median": round(med(switches), 2), "page_switch_s_max": round(max(switches), 2)}


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--moves", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["all", "navigation"], default="all",
                    help="navigation: only the sharing-map latency and page-switch times")
    args = ap.parse_args()
    # a single-user benchmark on this machine: no sign-in page in the way (WSVIZ_AUTH=off, as on a laptop)
    env = dict(os.environ, WSVIZ_RUNS=tempfile.mkdtemp(), WSVIZ_AUTH="off")
    bare_dir = Path(tempfile.mkdtemp())
    (bare_dir / "bare.py").write_text(BARE_APP)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        try:
            if args.only == "navigation":
                result = sharing_map_and_page_switch(browser, env, max(1, args.starts))
                print(json.dumps(result, indent=2))
                return
            cached = browser.new_context(viewport={"width": 1400, "height": 1000})
            cold_start(browser, bare_dir / "bare.py", bare_dir, env, cached)  # warms the OS file cache and `cached`
            wsviz, bare, wsviz_cached, bare_cached = [], [], [], []
            for _ in range(args.starts):  # interleaved, so drift in machine load hits both alike
                wsviz.append(cold_start(browser, ROOT / "app.py", ROOT, env))
                bare.append(cold_start(browser, bare_dir / "bare.py", bare_dir, env))
                wsviz_cached.append(cold_start(browser, ROOT / "app.py", ROOT, env, cached))
                bare_cached.append(cold_start(browser, bare_dir / "bare.py", bare_dir, env, cached))
            times = slider_moves(browser, env, args.moves)
            navigation = sharing_map_and_page_switch(browser, env, args.starts)
        finally:
            browser.close()
    med = statistics.median
    result = {"cold_start_s": round(med(wsviz), 2), "cold_start_all": [round(t, 2) for t in wsviz],
              "bare_streamlit_cold_start_s": round(med(bare), 2), "bare_all": [round(t, 2) for t in bare],
              "cold_start_vs_bare": round(med(wsviz) / med(bare), 2),
              "cold_start_cached_browser_s": round(med(wsviz_cached), 2),
              "bare_cached_browser_s": round(med(bare_cached), 2),
              "cached_vs_bare": round(med(wsviz_cached) / med(bare_cached), 2),
              "slider_update_s_median": round(statistics.median(times), 3),
              "slider_update_s_all": [round(t, 3) for t in times], "variants": SIX, **navigation}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
