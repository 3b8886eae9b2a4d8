"""How long scoring sharing opportunities takes (issue 19's speed targets), on this machine.

* torchvision ``resnet50`` (random weights, adopted) with a 64-image calibration batch at 224 px:
  candidate groups, per-stage similarity matrices and the three scores of one forward and backward
  pass (weight similarity, output CKA, gradient conflict) — target under 60 s on two cores. A model
  with random weights has no held-out accuracy to lose, so the fourth score (the measured drop) is
  timed separately, with the calibration batch itself as held-out data.
* the registry's digit models (``*_digits``, fresh weights) with 64 calibration and 256 held-out
  mnist5k images, all four scores — target under 5 s each.

    python -m benchmarks.bench_opportunities [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from wsviz.analysis.opportunities import find_opportunities


def timed_scoring(model, images, labels, held_out=None, desc=""):
    bar = tqdm(desc=desc, unit="step")

    def progress(i, n, what):
        bar.total, bar.n = n, i
        bar.set_postfix_str(what[:50])
        bar.refresh()

    t0 = time.perf_counter()
    rows = find_opportunities(model, images, labels, held_out=held_out, progress=progress).rows
    seconds = time.perf_counter() - t0
    bar.close()
    return seconds, len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-drop", action="store_true", help="skip resnet50's measured-drop timing")
    ap.add_argument("--digits-only", action="store_true", help="only the registry's digit models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = {"threads": args.threads}
    if not args.digits_only:
        resnet50(args, res)
    digits(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


def resnet50(args, res) -> None:
    """resnet50's timings, and one plain no-grad forward of the same batch as the baseline: on a
    loaded machine the absolute seconds say little, the ratio says what scoring adds."""
    import torchvision

    import wsviz

    net = wsviz.adopt(torchvision.models.resnet50(), input_shape=(3, 224, 224))
    x, y = torch.rand(64, 3, 224, 224), torch.randint(0, 1000, (64,))
    t0 = time.perf_counter()
    with torch.no_grad():
        net.eval()(x)
    res["resnet50_plain_forward_s"] = base = time.perf_counter() - t0
    print(f"resnet50, one plain forward of 64 images: {base:.1f} s")
    s, n = timed_scoring(net, x, y, desc="resnet50")
    res["resnet50_three_scores_s"], res["resnet50_groups"] = s, n
    print(f"resnet50, 64 images, {n} groups, three scores: {s:.1f} s (target < 60 s) = {s / base:.2f} plain forwards")
    if not args.skip_drop:
        s, _ = timed_scoring(net, x, y, held_out=(x, y), desc="resnet50 + drop")
        res["resnet50_all_four_s"] = s
        print(f"resnet50, 64 images, {n} groups, with the measured drop: {s:.1f} s")


def digits(res) -> None:
    import wsviz
    from wsviz.data.datasets import load_split
    from wsviz.models import create_model, list_models

    cal = load_split("mnist5k", "train").spread(64)
    te = load_split("mnist5k", "test").spread(256)
    res["digits"] = {}
    for name in [m for m in list_models() if m.endswith("_digits")]:
        model = create_model(name).eval()
        try:
            s, n = timed_scoring(model, cal.images, cal.labels, held_out=(te.images, te.labels), desc=name)
        except wsviz.WsvizError as exc:
            res["digits"][name] = {"error": str(exc)}
            print(f"{name}: {exc}")
            continue
        res["digits"][name] = {"seconds": s, "groups": n}
        print(f"{name}: {n} groups, all four scores: {s:.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
