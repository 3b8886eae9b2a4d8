"""Analysis overheads, as ratios against the bare work measured in the same run.

* scale sweep: ``scale_sweep`` wall time vs the pure batched forward passes it needs (the
  same models on the same pre-transformed batches) — target at most 1.25x;
* feature maps: ``feature_maps`` (all taps of one image) vs one plain forward of that image —
  target at most 1.2x.

    python -m benchmarks.bench_analysis [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from wsviz.analysis.features import feature_maps
from wsviz.analysis.sweeps import scale_sweep
from wsviz.data.datasets import load_split
from wsviz.data.resample import rescale
from wsviz.models import create_model

SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    te = load_split("mnist5k-scale", "test")
    x, y = te.images, te.labels
    models = {"resnet20": create_model("resnet_digits").eval(),
              "wsms": create_model("wsms_resnet_digits").eval(),
              "msws": create_model("msws_resnet_digits").eval()}
    batches = [rescale(x, s) for s in SCALES]

    @torch.no_grad()
    def bare_forwards():
        for b in batches:
            for m in models.values():
                for i in range(0, len(b), 512):
                    m(b[i:i + 512])

    def sweep():
        scale_sweep(models, x, y, SCALES)

    # warm-up, then alternate
    bare_forwards(), sweep()
    bare, full = [], []
    for _ in range(args.repeats):
        bare.append(timed(bare_forwards, 1))
        full.append(timed(sweep, 1))
    sweep_ratio = statistics.median(full) / statistics.median(bare)

    fm_results = {}
    for name in ("resnet_digits", "wsms_resnet_digits", "msws_resnet_digits"):
        m = create_model(name).eval()
        img = x[0]

        @torch.no_grad()
        def plain(m=m, img=img):
            for _ in range(20):
                m(img.unsqueeze(0))

        def maps(m=m, img=img):
            for _ in range(20):
                feature_maps(m, img)

        plain(), maps()
        p, f = [], []
        for _ in range(args.repeats):
            p.append(timed(plain, 1))
            f.append(timed(maps, 1))
        fm_results[name] = round(statistics.median(f) / statistics.median(p), 3)

    result = {"scale_sweep": {"models": list(models), "images": len(y), "scales": len(SCALES),
                              "bare_forward_s": round(statistics.median(bare), 3),
                              "sweep_s": round(statistics.median(full), 3), "ratio": round(sweep_ratio, 3)},
              "feature_maps_vs_forward": fm_results}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
