"""The shipped zoo: which variants ``checkpoints/`` holds and the one command that retrains them.

    python -m wsviz.zoo retrain [--epochs N] [--only NAME ...] [--device cuda] [--out checkpoints]
    python -m wsviz.zoo table [--out checkpoints]      # regenerate checkpoints/README.md from the cards

Two zoos, each trained with one recipe so their members compare fairly:

* scale zoo on ``mnist5k-scale``: SGD lr 0.1, momentum 0.9, weight decay 1e-4 (the papers'
  recipe), cosine schedule, batch 128;
* rotation zoo on ``mnist5k-rot``: Adam lr 1e-3, cosine, batch 128. Every model is scaled to
  a quarter of the paper's width (``width=0.25``) so it trains on 2 CPU cores; RepeatNet
  variants stay matched in inference FLOPs to the steerable C4/C8/C16 models they face.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCALE_RECIPE = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
                "batch_size": 128}
ROT_RECIPE = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine",
              "batch_size": 128}
ROT_WIDTH = 0.25
DEFAULT_EPOCHS = 12


@dataclass(frozen=True)
class ZooEntry:
    name: str  # checkpoint folder name
    model: str
    dataset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # variants compared with each other
    role: str = ""  # short label in the comparison


def _scale(name, model, group, role, **overrides) -> ZooEntry:
    return ZooEntry(name, model, "mnist5k-scale", overrides, SCALE_RECIPE, group, role)


def _rot(name, model, role, **overrides) -> ZooEntry:
    return ZooEntry(name, model, "mnist5k-rot", {**overrides, "width": ROT_WIDTH}, ROT_RECIPE, "rotation", role)


ZOO: list[ZooEntry] = [
    _scale("scale-resnet20", "resnet_digits", "wsms", "ResNet-20 baseline"),
    _scale("scale-wsms-1x1", "wsms_resnet_digits", "wsms", "WSMS-ResNet (1x1)", integration="1x1", shared=True),
    _scale("scale-msnet-1x1", "wsms_resnet_digits", "wsms", "MS-ResNet (1x1)", integration="1x1", shared=False),
    _scale("scale-msws-vanilla", "msws_resnet_digits", "msws", "vanilla", sharing="vanilla"),
    _scale("scale-msws-unshared", "msws_resnet_digits", "msws", "unshared", sharing="unshared"),
    _scale("scale-msws-shared", "msws_resnet_digits", "msws", "shared", sharing="shared"),
    _scale("scale-sharesnet", "sharesnet_wrn_digits", "sharesnet", "ShaResNet", shared=True),
    _scale("scale-sharesnet-unshared", "sharesnet_wrn_digits", "sharesnet", "unshared twin", shared=False),
    _scale("scale-shardnet-E", "shardnet_vgg", "shardnet", "E-VGGNet", kind="E", width=32, input_size=28),
    _scale("scale-shardnet-S", "shardnet_vgg", "shardnet", "S-VGGNet", kind="S", width=32, input_size=28),
    _scale("scale-shardnet-SL", "shardnet_vgg", "shardnet", "SL-VGGNet", kind="SL", width=32, input_size=28),
    _scale("scale-repeatnet-dense", "repeatnet_resnet18", "repeatnet", "dense (same width)", mode="none",
           base_width=8, scale=2, input_size=28),
    _scale("scale-repeatnet-linear", "repeatnet_resnet18", "repeatnet", "linear", mode="linear", base_width=8,
           scale=2, input_size=28),
    _scale("scale-repeatnet-s", "repeatnet_resnet18", "repeatnet", "s-RepeatNet", mode="swish", base_width=8,
           scale=2, input_size=28),
    _scale("scale-repeatnet-f", "repeatnet_resnet18", "repeatnet", "f-RepeatNet", mode="bireal", base_width=8,
           scale=2, input_size=28),
    _rot("rot-cnn", "repeatnet_rotmnist_cnn", "CNN", mode="none"),
    *[_rot(f"rot-repeat-{m}-{c}", "repeatnet_rotmnist_cnn", f"{label} ({c.upper()} FLOPs)", mode=m, match=c)
      for c in ("c4", "c8", "c16") for m, label in (("linear", "linear"), ("swish", "s-RepeatNet"),
                                                  ("bireal", "f-RepeatNet"))],
    *[_rot(f"rot-steerable-c{n}", "steerable_rotmnist", f"steerable C{n}", N=n) for n in (4, 8, 16)],
]


def entry(name: str) -> ZooEntry:
    for e in ZOO:
        if e.name == name:
            return e
    from wsviz.errors import WsvizError

    raise WsvizError(f"No zoo entry {name!r}; entries: {', '.join(e.name for e in ZOO)}")


def retrain(out: str | Path = "checkpoints", epochs: int = DEFAULT_EPOCHS, only: list[str] | None = None,
            device: str | None = None, max_batches: int | None = None, log=print) -> list[dict]:
    """Train every zoo entry (or ``only`` those) into ``out/<name>``; returns the cards."""
    from wsviz.training.loop import TrainConfig
    from wsviz.training.run import run_training

    entries = [entry(n) for n in only] if only else ZOO
    cards = []
    for i, e in enumerate(entries, 1):
        cfg = TrainConfig(epochs=epochs, seed=0, max_batches=max_batches, **e.recipe)
        log(f"[{i}/{len(entries)}] {e.name}: {e.model} {e.overrides} on {e.dataset}, {epochs} epochs")
        card = run_training(e.model, e.dataset, Path(out) / e.name, cfg, overrides=e.overrides, device=device)
        cards.append(card)
        log(f"    test accuracy {card['test_accuracy']:.4f} ({card['duration_s']:.0f} s)")
    write_table(out)
    return cards


def write_table(out: str | Path = "checkpoints") -> Path:
    """checkpoints/README.md: one row per shipped card, generated (never typed)."""
    from wsviz.training.checkpoint import read_card

    out = Path(out)
    rows = []
    for e in ZOO:
        folder = out / e.name
        if not (folder / "card.json").is_file():
            continue
        c = read_card(folder)
        comp = c["effective_params"] / max(c["unique_params"], 1)
        rows.append(f"| `{e.name}` | {e.group} | {e.role} | `{c['model']}` | {c['dataset']} | "
                    f"{100 * c['test_accuracy']:.2f} | {c['unique_params']:,} | {comp:.2f}x | "
                    f"{c['flops'] / 1e6:.1f} | {c['epochs_done']} |")
    text = "\n".join([
        "# Shipped checkpoints",
        "",
        "Generated by `python -m wsviz.zoo table` from the model cards; do not edit by hand.",
        "Retrain everything with `python -m wsviz.zoo retrain` (CPU by default, GPU if present);",
        "each card's `command` field reproduces that checkpoint alone.",
        "",
        "Test accuracy is on the fixed 1,000-image test split of the named dataset. Compression is",
        "effective / unique parameters (how many times each stored weight is applied). MFLOPs per image.",
        "",
        "| checkpoint | group | variant | model | dataset | test acc % | unique params | compression | MFLOPs | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    path = out / "README.md"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- report
# (claim, group, A, B): each claim is tested as "A vs B" on the same test images.
CLAIMS = [
    ("Aich et al.: shared ~ vanilla at ~25% fewer parameters", "scale-msws-shared", "scale-msws-vanilla"),
    ("Aich et al.: unshared ~ vanilla (same parameters)", "scale-msws-unshared", "scale-msws-vanilla"),
    ("Takahashi et al.: WSMS-ResNet beats its ResNet baseline", "scale-wsms-1x1", "scale-resnet20"),
    ("Takahashi et al.: WSMS-ResNet vs MS-ResNet (unshared stages)", "scale-wsms-1x1", "scale-msnet-1x1"),
    ("Boulch: ShaResNet ~ its unshared twin", "scale-sharesnet", "scale-sharesnet-unshared"),
    ("ShaRDNet: S-VGGNet vs E-VGGNet (one conv for all layers)", "scale-shardnet-S", "scale-shardnet-E"),
    ("ShaRDNet: blending layers help (SL vs S)", "scale-shardnet-SL", "scale-shardnet-S"),
    ("RepeatNet: s-RepeatNet vs linear repetition", "scale-repeatnet-s", "scale-repeatnet-linear"),
    ("RepeatNet: f-RepeatNet vs linear repetition", "scale-repeatnet-f", "scale-repeatnet-linear"),
    ("RepeatNet Table 4: C4 steerable > s-RepeatNet (C4 FLOPs)", "rot-steerable-c4", "rot-repeat-swish-c4"),
    ("RepeatNet Table 4: C8 steerable > s-RepeatNet (C8 FLOPs)", "rot-steerable-c8", "rot-repeat-swish-c8"),
    ("RepeatNet Table 4: C16 steerable > s-RepeatNet (C16 FLOPs)", "rot-steerable-c16", "rot-repeat-swish-c16"),
    ("RepeatNet Table 4: s-RepeatNet (C4 FLOPs) > plain CNN", "rot-repeat-swish-c4", "rot-cnn"),
    ("RepeatNet Table 4: s-RepeatNet (C8 FLOPs) > plain CNN", "rot-repeat-swish-c8", "rot-cnn"),
    ("RepeatNet Table 4: s-RepeatNet (C16 FLOPs) > plain CNN", "rot-repeat-swish-c16", "rot-cnn"),
]
SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def report(out: str | Path = "checkpoints") -> Path:
    """checkpoints/REPORT.md: what the zoo shows against the papers' claims, with McNemar tests.

    Every number is computed here from the shipped weights (nothing typed in). Scale
    robustness is measured on the upright mnist5k test digits shrunk by 0.3..1.0, pooling the
    predictions of all scales for the paired test.
    """
    import numpy as np
    import torch

    from wsviz.analysis.stats import compare_predictions
    from wsviz.analysis.sweeps import scale_sweep
    from wsviz.data.datasets import load_split
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.loop import evaluate

    out = Path(out)
    cache: dict[str, tuple] = {}

    def preds(name: str):
        if name not in cache:
            model, card = load_checkpoint(out / name)
            te = load_split(card["dataset"], "test", seed=card.get("data_seed", 0))
            _, acc, p = evaluate(model, te.images, te.labels)
            cache[name] = (model, card, p.numpy(), te.labels.numpy())
        return cache[name]

    lines = ["# What the shipped zoo shows", "",
             "Generated by `python -m wsviz.zoo report` from the shipped weights; do not edit by hand.",
             "Small models, 4,000 training digits, 12 epochs, one seed: these are sanity checks of the papers'",
             "claims at toy scale, not reproductions of their ImageNet/CIFAR numbers. A difference is called",
             "significant when McNemar's test gives p < 0.05 on the 1,000 paired test images.", "",
             "## Accuracy on each zoo's own test split", "",
             "| claim | A | B | result |", "|---|---|---|---|"]
    for claim, a, b in CLAIMS:
        if not ((out / a / "card.json").is_file() and (out / b / "card.json").is_file()):
            continue
        _, ca, pa, y = preds(a)
        _, cb, pb, _ = preds(b)
        comp = compare_predictions(pa, pb, y, names=(a, b))
        params = f" ({ca['unique_params']:,} vs {cb['unique_params']:,} params)"
        lines.append(f"| {claim} | `{a}` | `{b}` | {comp.summary}{params} |")
    # scale robustness
    te = load_split("mnist5k", "test")
    group = ["scale-resnet20", "scale-wsms-1x1", "scale-msnet-1x1", "scale-msws-vanilla", "scale-msws-shared",
             "scale-msws-unshared"]
    group = [g for g in group if (out / g / "card.json").is_file()]
    if group:
        models = {g: preds(g)[0] for g in group}
        with torch.no_grad():
            sw = scale_sweep(models, te.images, te.labels, SCALES)
        lines += ["", "## Scale robustness (upright test digits shrunk by 0.3 ... 1.0)", "",
                  "Shrunk about the centre with `wsviz.data.resample.rescale`, the operator that makes the "
                  "MNIST-scale training data, so each column is exactly the protocol's images at that factor.", "",
                  "| model | " + " | ".join(f"{s:g}" for s in SCALES) + " | mean |",
                  "|---|" + "---|" * (len(SCALES) + 1)]
        for g in group:
            acc = sw.accuracy[g]
            lines.append(f"| `{g}` | " + " | ".join(f"{100 * v:.1f}" for v in acc) + f" | {100 * acc.mean():.1f} |")
        lines += ["", "Pooled tests below treat the 8 rescaled copies of each digit as independent pairs, so their "
                  "p-values are optimistic; read them together with the per-scale table."]
        y_all = np.tile(te.labels.numpy(), len(SCALES))
        for a, b in (("scale-wsms-1x1", "scale-resnet20"), ("scale-wsms-1x1", "scale-msnet-1x1"),
                     ("scale-msws-shared", "scale-msws-vanilla")):
            if a in sw.predictions and b in sw.predictions:
                comp = compare_predictions(sw.predictions[a].ravel(), sw.predictions[b].ravel(), y_all, names=(a, b))
                lines.append("")
                lines.append(f"- pooled over scales: {comp.summary}")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from wsviz.cli_errors import CliParser

    ap = CliParser(prog="python -m wsviz.zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retrain", help="train the zoo into --out")
    r.add_argument("--out", default="checkpoints")
    r.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    r.add_argument("--only", nargs="*", default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--max-batches", type=int, default=None)
    t = sub.add_parser("table", help="regenerate --out/README.md from the cards")
    t.add_argument("--out", default="checkpoints")
    rp = sub.add_parser("report", help="write --out/REPORT.md: the papers' claims tested on the zoo")
    rp.add_argument("--out", default="checkpoints")
    sub.add_parser("list", help="list the zoo entries")
    args = ap.parse_args(argv)
    from wsviz.errors import WsvizError

    try:
        if args.cmd == "retrain":
            retrain(args.out, args.epochs, args.only, args.device, args.max_batches,
                    log=lambda s: print(s, flush=True))
        elif args.cmd == "table":
            print(write_table(args.out))
        elif args.cmd == "report":
            print(report(args.out))
        else:
            for e in ZOO:
                print(f"{e.name:28s} {e.model:24s} {e.dataset:14s} {json.dumps(e.overrides)}")
    except WsvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return 0


if __name__ == "__main__":
    from wsviz.cli_errors import run_cli

    sys.exit(run_cli(main))
