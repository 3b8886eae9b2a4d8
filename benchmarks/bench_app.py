"""App responsiveness in a real browser (headless Chromium via Playwright).

* cold start: from launching ``streamlit run app.py`` to the first page showing its model table
  (the list appears before the parameter counts fill in) — target 3 s;
* scale slider: time from moving the Scale page's slider to every variant's prediction being
  redrawn, with 6 variants chosen, on CPU — target 0.3 s. Reported: median of several moves.

    python -m benchmarks.bench_app [--moves 7] [--json out.json]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SIX = ["scale-resnet20", "scale-wsms-1x1", "scale-msnet-1x1", "scale-msws-vanilla", "scale-msws-shared",
       "scale-sharesnet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--moves", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    port = free_port()
    env = dict(os.environ, WSVIZ_RUNS=tempfile.mkdtemp())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                 "--server.headless", "true"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1).read() == b"ok":
                        break
                except OSError:
                    time.sleep(0.05)
            page.goto(f"http://localhost:{port}/")
            page.wait_for_selector("[data-testid=stDataFrame]", timeout=120_000)
            cold = time.perf_counter() - t0

            page2 = browser.new_page(viewport={"width": 1400, "height": 1000})  # a new session
            page2.goto(f"http://localhost:{port}/scale?variants={','.join(SIX)}")
            page = page2
            page.wait_for_function(f"document.querySelectorAll('[data-testid=stMetric]').length >= {len(SIX)}",
                                   timeout=120_000)
            slider = page.locator("[data-testid=stSlider] input[type=range]").first
            times = []
            last_img = "() => { const im = document.querySelectorAll('[data-testid=stImage] img'); " \
                       "return im.length ? im[im.length - 1].src : ''; }"
            for i in range(args.moves):
                before = page.evaluate(last_img)
                slider.focus()
                t1 = time.perf_counter()
                page.keyboard.press("ArrowLeft" if i % 2 else "ArrowRight")
                # the last variant's rescaled input is redrawn last: wait until it changed
                page.wait_for_function(f"({last_img})() !== {json.dumps(before)}", timeout=60_000)
                times.append(time.perf_counter() - t1)
                assert page.locator("[data-testid=stMetric]").count() >= len(SIX)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            browser.close()
    result = {"cold_start_s": round(cold, 2), "slider_update_s_median": round(statistics.median(times), 3),
              "slider_update_s_all": [round(t, 3) for t in times], "variants": SIX}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
