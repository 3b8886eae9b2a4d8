"""Training-loop throughput: wsviz.training.loop.train vs a minimal plain-PyTorch loop.

Same model, same data, same batch size and optimiser, measured in the same run, alternating
the two loops and taking the median of several repeats (these machines are noisy).

    python -m benchmarks.bench_train [--model resnet_digits] [--batches 40] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from wsviz.data.datasets import load_split
from wsviz.device import pick_device
from wsviz.training.loop import TrainConfig, train
from wsviz.training.run import build_for_dataset


def plain_loop(model, images, labels, batches: int, batch_size: int, device) -> float:
    """images/s of the simplest correct loop: index a batch, forward, loss, backward, step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    perm = torch.randperm(len(labels))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(batches):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - t0)


def wsviz_loop(model, images, labels, test, batches: int, batch_size: int, device) -> float:
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, schedule="none", max_batches=batches, amp=False)
    res = train(model, (images, labels), test, cfg, device=device)
    return res.epochs[0].images_per_s  # training phase only (evaluation excluded)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet_digits")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    device = pick_device(args.device)
    tr, te = load_split(args.dataset, "train"), load_split(args.dataset, "test")
    small_test = (te.images[:64], te.labels[:64])
    make = lambda: build_for_dataset(args.model, args.dataset).to(device)  # noqa: E731
    # warm-up both paths once (allocator, kernels)
    plain_loop(make(), tr.images, tr.labels, 3, args.batch_size, device)
    wsviz_loop(make(), tr.images, tr.labels, small_test, 3, args.batch_size, device)
    plain, ours = [], []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        plain.append(plain_loop(make(), tr.images, tr.labels, args.batches, args.batch_size, device))
        torch.manual_seed(0)
        ours.append(wsviz_loop(make(), tr.images, tr.labels, small_test, args.batches, args.batch_size, device))
    result = {"model": args.model, "device": str(device), "batch_size": args.batch_size, "batches": args.batches,
              "plain_images_per_s": round(statistics.median(plain), 1),
              "wsviz_images_per_s": round(statistics.median(ours), 1),
              "ratio": round(statistics.median(ours) / statistics.median(plain), 3),
              "all_plain": [round(v, 1) for v in plain], "all_wsviz": [round(v, 1) for v in ours]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
