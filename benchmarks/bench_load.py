"""Many users at once: N browser sessions moving the Scale page's slider on one server.

One ``streamlit run app.py`` server; for N = 1, 4, 8 (in that order, each after the previous
phase has ended) N headless-Chromium sessions (separate browser contexts, so separate
Streamlit sessions) open the Scale page with four variants and move the slider ``--moves``
times each, all at once. Reported per N: update latency (key press -> the last variant's
redrawn model input, which is drawn after every prediction) median and p95 over all moves of
all sessions, and the server process's memory (RSS: peak during the phase and at its end).

``--sweeps K`` adds a last phase: 4 sliding sessions while K other sessions each run the Scale
page's sweep over 1,000 test images (long analyses take turns: ``wsviz.concurrency``), and
the same 4 sliding sessions alone just before, so the two medians compare in one run.

    python -m benchmarks.bench_load [--sessions 1 4 8] [--moves 10] [--sweeps 2] [--json out.json]

The browsers run on the same 2-core machine as the server, so the latency includes their
rendering: it is what a person at one of the browsers waits, not the server's time alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_app import ARGS, server

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["scale-resnet20", "scale-msws-vanilla", "scale-msws-shared", "scale-sharesnet"]
LAST_IMG = ("() => { const im = document.querySelectorAll('[data-testid=stImage] img'); "
            "return im.length ? im[im.length - 1].src : ''; }")


def rss(pid: int) -> int:
    """Resident memory of ``pid`` and its children, in bytes."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(k) for k in fh.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


class MemoryWatch:
    """Samples the server's RSS every 0.1 s in a thread; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss(self.pid))

    def reset(self) -> None:
        self.peak = rss(self.pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def open_scale(browser, port: int):
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await ctx.new_page()
    await page.goto(f"http://localhost:{port}/scale?variants={','.join(FOUR)}")
    await page.wait_for_function(f"document.querySelectorAll('[data-testid=stMetric]').length >= {len(FOUR)}",
                                 timeout=300_000)
    return ctx, page


async def slide(page, moves: int, start: asyncio.Event) -> list[float]:
    """Move the slider ``moves`` times; each move's seconds until the last model input is redrawn."""
    slider = page.locator("[data-testid=stSlider] input[type=range]").first
    await start.wait()
    times = []
    for i in range(moves):
        await page.wait_for_timeout(300)  # a person's pause; lets the previous update's image fetches finish
        before = await page.evaluate(LAST_IMG)
        await slider.focus()
        t0 = time.perf_counter()
        await page.keyboard.press("ArrowLeft" if i % 2 else "ArrowRight")
        await page.wait_for_function(f"({LAST_IMG})() !== {json.dumps(before)}", timeout=300_000)
        times.append(time.perf_counter() - t0)
    return times


async def sweep(page, stop: asyncio.Event, done: list[int]) -> None:
    """Run the Scale page's sweep over 1,000 images, again and again (new sizes, so no cache hit) until ``stop``;
    ``done[0]`` counts the sweeps finished."""
    n = 0
    slider = page.locator("[data-testid=stSlider] input[type=range]").nth(1)  # "Images"
    while not stop.is_set():
        await slider.focus()
        await page.keyboard.press("End" if n % 2 == 0 else "ArrowLeft")
        await page.get_by_role("button", name="Run the sweep").click()
        await page.wait_for_function("document.querySelectorAll('[data-testid=stPlotlyChart]').length >= 3 && "
                                     "!document.querySelector('[data-testid=stProgress]')", timeout=600_000)
        n += 1
        done[0] += 1


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def phase(browser, port: int, n: int, moves: int, watch: MemoryWatch, sweepers: int = 0) -> dict:
    sessions = await asyncio.gather(*[open_scale(browser, port) for _ in range(n + sweepers)])
    start, stop = asyncio.Event(), asyncio.Event()
    watch.reset()
    sliders = [asyncio.create_task(slide(page, moves, start)) for _, page in sessions[:n]]
    sweeps_done = [0]
    sweeps = [asyncio.create_task(sweep(page, stop, sweeps_done)) for _, page in sessions[n:]]
    if sweeps:
        await asyncio.sleep(3)  # the sweeps are under way
    t0 = time.perf_counter()
    start.set()
    times = [t for ts in await asyncio.gather(*sliders) for t in ts]
    wall = time.perf_counter() - t0
    stop.set()
    done_sweeps = sweeps_done[0]
    for task in sweeps:  # a sweep under way is left behind with its session
        task.cancel()
    await asyncio.gather(*sweeps, return_exceptions=True)
    for ctx, _ in sessions:
        await ctx.close()
    return {"sessions": n, "sweeping_sessions": sweepers, "moves": len(times),
            "median_s": round(statistics.median(times), 3), "p95_s": round(pct(times, 0.95), 3),
            "max_s": round(max(times), 3), "wall_s": round(wall, 1), "sweeps_finished": done_sweeps,
            "server_rss_peak_mib": round(watch.peak / 2**20), "server_rss_end_mib": round(rss(watch.pid) / 2**20)}


async def run(args) -> dict:
    from playwright.async_api import async_playwright

    env = dict(os.environ, WSVIZ_RUNS=tempfile.mkdtemp(prefix="wsviz-bench-runs-"), WSVIZ_AUTH="off")  # single user
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        try:
            with server(ROOT / "app.py", ROOT, env) as (port, _, proc):
                watch = MemoryWatch(proc.pid)
                try:
                    warm = await phase(browser, port, 1, 3, watch)  # loads the models and the page's code once
                    result = {"variants": FOUR, "moves_per_session": args.moves, "warm_up": warm,
                              "server_rss_after_warm_up_mib": round(rss(proc.pid) / 2**20), "phases": []}
                    for n in args.sessions:
                        result["phases"].append(await phase(browser, port, n, args.moves, watch))
                        print(json.dumps(result["phases"][-1]), flush=True)
                    if args.sweeps:
                        for k in (0, args.sweeps):
                            result["phases"].append(await phase(browser, port, 4, args.moves, watch, sweepers=k))
                            print(json.dumps(result["phases"][-1]), flush=True)
                finally:
                    watch.stop()
        finally:
            await browser.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--sweeps", type=int, default=0, help="sessions running sweeps in an extra phase (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
