"""Data paths: the streamed DataLoader path vs the in-memory fast path, in one run.

Same model, batch size and optimiser; the training loop's own images/s (training phase only),
alternating the two paths and taking the median of several repeats. Two data sets:

* mnist5k (in memory either way: the DataLoader path batches it through a Dataset);
* a generated image folder (``--images`` PNGs of ``--side`` pixels): the in-memory path
  decodes it once to 32x32 tensors first (timed apart, reported as well); the streamed path
  decodes and resizes every image in every epoch, as it must for folders that do not fit.

    python -m benchmarks.bench_data [--batches 30] [--repeats 3] [--workers 0] [--images 1200] [--side 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsviz.data.datasets import load_split
from wsviz.data.loaders import folder_dataset, transforms_for
from wsviz.training.loop import TrainConfig, train
from wsviz.training.run import build_for_dataset


def make_folder(root: Path, images: int, side: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        c = i % 4
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def rate(model_name: str, overrides: dict, dataset: str, data, test, cfg: TrainConfig) -> float:
    torch.manual_seed(0)
    model = build_for_dataset(model_name, dataset, overrides)
    return train(model, data, test, cfg).epochs[0].images_per_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    common = dict(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="none", max_batches=args.batches,
                  amp=False, workers=args.workers)
    memory, stream = TrainConfig(loader="memory", **common), TrainConfig(loader="stream", **common)
    out: dict = {"batches": args.batches, "batch_size": args.batch_size, "workers": args.workers,
                 "threads": torch.get_num_threads()}

    tr, te = load_split("mnist5k", "train"), load_split("mnist5k", "test")
    small_test = (te.images[:128], te.labels[:128])
    m, s = [], []
    for _ in range(args.repeats):
        m.append(rate("resnet_digits", {}, "mnist5k", (tr.images, tr.labels), small_test, memory))
        s.append(rate("resnet_digits", {}, "mnist5k", (tr.images, tr.labels), small_test, stream))
    out["mnist5k"] = {"memory": statistics.median(m), "stream": statistics.median(s),
                      "ratio": statistics.median(s) / statistics.median(m)}

    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "imgs", args.images, args.side)
        os.environ["WSVIZ_DATA_ROOTS"] = tmp  # folder: datasets are read only under a data root
        name, opts = f"folder:{root}", {"in_channels": 3, "input_size": 32}
        t0 = time.perf_counter()
        ftr = load_split(name, "train")
        decode_s = time.perf_counter() - t0
        fte = load_split(name, "test")
        small = (fte.images[:128], fte.labels[:128])
        streamed = folder_dataset(root, "train", 0, transforms_for("none", 32, train=True, from_pil=True))
        m, s = [], []
        for _ in range(args.repeats):
            m.append(rate("resnet_digits", opts, name, (ftr.images, ftr.labels), small, memory))
            s.append(rate("resnet_digits", opts, name, streamed, small, stream))
        out["folder"] = {"images": args.images, "side": args.side, "memory": statistics.median(m),
                         "stream": statistics.median(s), "ratio": statistics.median(s) / statistics.median(m),
                         "memory_decode_s": decode_s, "train_images": len(ftr.labels)}
    for key in ("mnist5k", "folder"):
        r = out[key]
        print(f"{key}: in memory {r['memory']:.0f} images/s, streamed {r['stream']:.0f} images/s: "
              f"ratio {r['ratio']:.2f}x" + (f" (in-memory decode of the folder first: {r['memory_decode_s']:.1f} s)"
                                           if key == "folder" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
