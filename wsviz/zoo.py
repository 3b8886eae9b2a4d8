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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wsviz.zoo", description=__doc__,
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
    sub.add_parser("list", help="list the zoo entries")
    args = ap.parse_args(argv)
    from wsviz.errors import WsvizError

    try:
        if args.cmd == "retrain":
            retrain(args.out, args.epochs, args.only, args.device, args.max_batches,
                    log=lambda s: print(s, flush=True))
        elif args.cmd == "table":
            print(write_table(args.out))
        else:
            for e in ZOO:
                print(f"{e.name:28s} {e.model:24s} {e.dataset:14s} {json.dumps(e.overrides)}")
    except WsvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
