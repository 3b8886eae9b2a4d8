"""How fast the guards refuse, against a baseline measured in the same run.

The tests prove *that* each guard refuses before doing the expensive thing (the decoder is
never called on a decompression bomb, a huge card's model is never built off the meta device,
``launch`` returns before the training ends). How fast they do it is measured here, each as a
ratio against a baseline on the same machine in the same run, median of alternating repeats:

- refusing a PNG whose header claims 48 million pixels vs decoding a real 48x32 PNG;
- refusing a card describing a 10^12-parameter model vs loading the real checkpoint it was made from;
- ``jobs.launch`` (returns once the worker process is started) vs starting ``python -c pass``.

    python -m benchmarks.bench_guards [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

from wsviz.errors import WsvizError

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _refused(fn) -> None:
    try:
        fn()
    except WsvizError:
        return
    raise AssertionError("expected a refusal")


def _bomb_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def pairs(repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    from wsviz.data.uploads import decode_image
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.jobs import launch
    from wsviz.training.loop import TrainConfig
    from wsviz.training.runstore import RunStore

    tmp = Path(tempfile.mkdtemp(prefix="wsviz-bench-guards-"))
    try:
        small = io.BytesIO()
        Image.new("RGB", (48, 32), (255, 0, 0)).save(small, "PNG")
        bomb = _bomb_png(8000, 6000)
        good = ROOT / "checkpoints" / "scale-msws-vanilla"
        huge = tmp / "huge"
        shutil.copytree(good, huge)
        card = json.loads((huge / "card.json").read_text())
        card["config"]["base_width"] = 100_000
        (huge / "card.json").write_text(json.dumps(card))
        store = RunStore(tmp / "runs")
        cfg = TrainConfig(epochs=1, batch_size=64, max_batches=1)
        launched = []

        def do_launch():
            launched.append(launch(store, "resnet_digits", "mnist5k", cfg, overrides={"base_width": 8, "depth": 8},
                                   max_running=100))

        cases = {
            "bomb refusal / small decode": (lambda: _refused(lambda: decode_image(bomb, "bomb.png")),
                                            lambda: decode_image(small.getvalue(), "small.png")),
            "huge-card refusal / real load": (lambda: _refused(lambda: load_checkpoint(huge)),
                                              lambda: load_checkpoint(good)),
            "launch / python -c pass": (do_launch,
                                        lambda: subprocess.Popen([sys.executable, "-c", "pass"]).wait()),
        }
        out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
        for key, (fn, base) in cases.items():
            fn(), base()  # warm-up: imports, caches
            for _ in range(repeats):
                out[key][0].append(_timed(fn))
                out[key][1].append(_timed(base))
        for run in launched:  # the launched trainings are tiny; wait so nothing outlives the benchmark
            for _ in range(600):
                if not store.get(run.id).active:
                    break
                time.sleep(0.2)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {}
    for key, (measured, baseline) in pairs(args.repeats).items():
        m, b = statistics.median(measured), statistics.median(baseline)
        result[key] = {"measured_s": round(m, 4), "baseline_s": round(b, 4), "ratio": round(m / b, 2)}
        print(f"{key:32} {m * 1000:8.1f} ms vs {b * 1000:8.1f} ms  ratio {m / b:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
