"""Evaluation data paths: streamed (DataLoader) vs in-memory sweeps, and a sweep over an image folder.

1. The digit sets (``mnist5k-scale`` with a scale sweep, ``mnist5k-rot`` with a rotation sweep):
   the same sweep of three shipped models over the 1,000 test digits, fed as a tensor (sliced)
   or as a dataset read through a DataLoader (``loader="stream"``), alternating, median of
   ``--repeats``; images/s counts image x value evaluations (each by every model).
2. A generated folder of ``--images`` 224-px JPEGs (ImageNet's val/ layout), streamed with the
   one evaluation loop at 224 px: a two-scale sweep of a shipped digit model (the images are
   fitted to its 28-px input per batch: what the data path costs) and of ``--big-model`` at its
   224-px input (what the model costs), with ``--workers`` loader processes.

    python -m benchmarks.bench_stream [--repeats 3] [--images 400] [--workers 0 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsviz.analysis.sweeps import rotation_sweep, scale_sweep
from wsviz.data.stream import eval_data
from wsviz.device import pick_device
from wsviz.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ZOO = ("scale-resnet20", "scale-msws-shared", "scale-sharesnet")
SCALES = (0.3, 0.5, 0.7, 1.0, 1.4)
ANGLES = (0, 45, 90, 135, 180)


def make_folder(root: Path, images: int, side: int = 224) -> Path:
    """``images`` JPEGs of ``side`` px in ``root/val/c{0..3}`` (and a train/ beside it, as ImageNet)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for split in ("train", "val"):
        for i in range(images if split == "val" else 4):
            c = i % 4
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            img = (np.stack([xx, yy, (xx + yy) / 2], -1)[..., np.roll(np.arange(3), c)] * 180
                   + rng.integers(0, 60, (side, side, 3))).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            (root / split / f"c{c}" / f"{i}.jpg").write_bytes(buf.getvalue())
    return root


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def digits(models: dict, repeats: int, batch: int, device: torch.device) -> dict:
    out = {}
    for name, sweep, values in (("mnist5k-scale", scale_sweep, SCALES), ("mnist5k-rot", rotation_sweep, ANGLES)):
        data = eval_data(name)
        x, y = data.tensors()
        x, y = x.to(device), y.to(device)
        n = len(y) * len(values)
        mem, stream = [], []
        kw = {"scales" if sweep is scale_sweep else "angles": values}
        sweep(models, x, y, batch_size=batch, **kw)  # warm-up
        for _ in range(repeats):  # alternating, so a slow moment of a shared machine hits both
            mem.append(timed(lambda: sweep(models, x, y, batch_size=batch, loader="memory", **kw)))
            stream.append(timed(lambda: sweep(models, data, batch_size=batch, loader="stream", **kw)))
        m, s = statistics.median(mem), statistics.median(stream)
        out[name] = {"images": len(y), "values": len(values), "models": len(models),
                     "memory_img_per_s": n / m, "stream_img_per_s": n / s, "stream_vs_memory": m / s}
        print(f"{name}: in memory {n / m:,.0f} images/s, streamed {n / s:,.0f} images/s: {m / s:.2f}x")
    return out


def folder(args, device: torch.device) -> dict:
    from wsviz.models import create_model

    out = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("WSVIZ_DATA_ROOTS", "").split(os.pathsep)[0] or None) as tmp:
        t0 = time.perf_counter()
        root = make_folder(Path(tmp) / "imgs", args.images)
        print(f"made {args.images} 224-px JPEGs in {time.perf_counter() - t0:.1f} s")
        data = eval_data(f"folder:{root}", "test", size=224)
        small = {"scale-resnet20": load_checkpoint(ROOT / "checkpoints" / "scale-resnet20", device=device)[0]}
        big = {args.big_model: create_model(args.big_model).to(device)}
        for label, models, n_img in (("digit model (28 px)", small, args.images),
                                     (f"{args.big_model} (224 px)", big, args.big_images)):
            sub = data if n_img >= len(data) else data.subset(np.arange(n_img))
            for w in args.workers:
                secs = [timed(lambda: scale_sweep(models, sub, scales=(0.5, 1.0), batch_size=args.batch,
                                                  workers=w)) for _ in range(args.repeats)]
                rate = len(sub) * 2 / statistics.median(secs)
                out[f"{label}, {w} workers"] = {"images": len(sub), "scales": 2, "img_per_s": rate}
                print(f"folder sweep, {label}, {w} workers: {rate:,.1f} images/s ({len(sub)} images x 2 scales)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--big-model", default="msws_resnet18")
    ap.add_argument("--big-images", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WSVIZ_DATA_ROOTS", tempfile.gettempdir())
    device = pick_device(args.device)
    print(f"device {device}, {args.threads} thread(s)")
    models = {n: load_checkpoint(ROOT / "checkpoints" / n, device=device)[0] for n in ZOO}
    result = {"device": str(device), "threads": args.threads, "digits": digits(models, args.repeats, args.batch, device),
              "folder": folder(args, device)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
