"""The shipped zoo: which variants ``checkpoints/`` holds and the one command that retrains them.

    python -m wsviz.zoo retrain [--epochs N] [--only NAME ...] [--device cuda] [--out checkpoints]
    python -m wsviz.zoo table [--out checkpoints]      # regenerate checkpoints/README.md from the cards

Two zoos, each trained with one recipe so their members compare fairly:

* scale zoo on ``mnist5k-scale``: SGD lr 0.1, momentum 0.9, weight decay 1e-4 (the papers'
  recipe), cosine schedule, batch 128;
* rotation zoo on ``mnist5k-rot``: Adam lr 1e-3, cosine, batch 128. Every model is scaled to
  a quarter of the paper's width (``width=0.25``) so it trains on 2 CPU cores; RepeatNet
  variants keep the paper's repetition factors, sized to the FLOPs of the steerable C4/C8/C16
  models they face (at this width C4 and C16 within 0.03%, C8 6.4% fewer: the Rotation page says each).
"""

from __future__ import annotations

import argparse
import json
import math
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


# What a RepeatNet CNN sized by the paper's factor for steerable Cn costs at ROT_WIDTH, against that
# steerable model at the same width: C4 and C16 within 0.03%, C8 6.4% under (1% at width 1: the
# steerable C8 model's channels round more coarsely when narrowed). Checked by a test.
MATCHED = {"c4": "C4 FLOPs", "c8": "0.94x C8 FLOPs", "c16": "C16 FLOPs"}


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
    *[_rot(f"rot-repeat-{m}-{c}", "repeatnet_rotmnist_cnn", f"{label} ({MATCHED[c]})", mode=m, match=c)
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


SEEDS = (0, 1, 2)  # training seeds of every variant that enters a claim
SCALE_GROUP = ("scale-resnet20", "scale-wsms-1x1", "scale-msnet-1x1", "scale-msws-vanilla", "scale-msws-shared",
               "scale-msws-unshared")  # the variants of the scale-robustness table
PREDICTIONS = "predictions.npz"


def seed_folder(out: str | Path, name: str, seed: int) -> Path:
    """Where seed ``seed`` of zoo entry ``name`` lives: seed 0 is the shipped checkpoint itself
    (weights and card); further seeds ship as their card and test predictions, without weights,
    in ``<name>/seeds/seed<k>/`` (``retrain`` writes their weights there too; git ignores them)."""
    return Path(out) / name if seed == 0 else Path(out) / name / "seeds" / f"seed{seed}"


def claimed() -> list[str]:
    """The zoo entries that enter a claim or the scale table, in zoo order."""
    names = {n for _, a, b, _ in CLAIMS for n in (a, b)} | set(SCALE_GROUP)
    return [e.name for e in ZOO if e.name in names]


def write_predictions(folder: str | Path, name: str) -> Path:
    """Per-image predictions of the checkpoint in ``folder`` (zoo entry ``name``), saved beside its
    card: ``test`` on its own test split, and for the scale group ``scale`` (one row per factor of
    SCALES) on the upright mnist5k test digits. The report is computed from these files; a test
    recomputes them from the shipped weights to show they are not stale."""
    import numpy as np
    import torch

    from wsviz.analysis.sweeps import scale_sweep
    from wsviz.data.datasets import load_split
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.loop import evaluate

    folder = Path(folder)
    model, card = load_checkpoint(folder)
    te = load_split(card["dataset"], "test", seed=card.get("data_seed", 0))
    with torch.no_grad():
        _, _, p = evaluate(model, te.images, te.labels)
        arrays = {"test": p.numpy().astype(np.int16), "labels": te.labels.numpy().astype(np.int16)}
        if name in SCALE_GROUP:
            up = load_split("mnist5k", "test")
            sw = scale_sweep({name: model}, up.images, up.labels, SCALES)
            arrays["scale"] = np.asarray(sw.predictions[name]).astype(np.int16)
            arrays["scale_labels"] = up.labels.numpy().astype(np.int16)
    path = folder / PREDICTIONS
    np.savez_compressed(path, **arrays)
    return path


def retrain(out: str | Path = "checkpoints", epochs: int = DEFAULT_EPOCHS, only: list[str] | None = None,
            device: str | None = None, max_batches: int | None = None, log=print,
            seeds: tuple[int, ...] | None = None) -> list[dict]:
    """Train every zoo entry (or ``only`` those) into ``out``; returns the cards.

    ``seeds`` default: seed 0 of every entry, plus seeds 1 and 2 of every claimed entry (see
    :func:`seed_folder`). Each run's per-image predictions are written beside its card."""
    from wsviz.training.loop import TrainConfig
    from wsviz.training.run import run_training

    entries = [entry(n) for n in only] if only else ZOO
    in_claims = set(claimed())
    jobs = [(e, s) for s in (seeds if seeds is not None else SEEDS) for e in entries
            if s == 0 or seeds is not None or e.name in in_claims]
    cards = []
    for i, (e, seed) in enumerate(jobs, 1):
        cfg = TrainConfig(epochs=epochs, seed=seed, max_batches=max_batches, **e.recipe)
        folder = seed_folder(out, e.name, seed)
        log(f"[{i}/{len(jobs)}] {e.name} seed {seed}: {e.model} {e.overrides} on {e.dataset}, {epochs} epochs")
        card = run_training(e.model, e.dataset, folder, cfg, overrides=e.overrides, device=device)
        write_predictions(folder, e.name)
        cards.append(card)
        log(f"    test accuracy {card['test_accuracy']:.4f} ({card['duration_s']:.0f} s)")
    write_table(out)
    return cards


def write_table(out: str | Path = "checkpoints") -> Path:
    """checkpoints/README.md: one row per shipped card, generated (never typed)."""
    from wsviz.training.cards import card_float_params
    from wsviz.training.checkpoint import read_card

    out = Path(out)
    rows = []
    for e in ZOO:
        folder = out / e.name
        if not (folder / "card.json").is_file():
            continue
        c = read_card(folder)
        fp = card_float_params(c)
        comp = c["effective_params"] / max(fp, 1)
        bits = c.get("sign_mask_params") or 0
        others = [read_card(seed_folder(out, e.name, s))["test_accuracy"] for s in SEEDS[1:]
                  if (seed_folder(out, e.name, s) / "card.json").is_file()]
        seeds = ", ".join(f"{100 * a:.2f}" for a in others) or "–"
        rows.append(f"| `{e.name}` | {e.group} | {e.role} | `{c['model']}` | {c['dataset']} | "
                    f"{100 * c['test_accuracy']:.2f} | {seeds} | {fp:,} | {bits:,} | {comp:.2f}x | "
                    f"{c['flops'] / 1e6:.1f} | {c['epochs_done']} |")
    text = "\n".join([
        "# Shipped checkpoints",
        "",
        "Generated by `python -m wsviz.zoo table` from the model cards; do not edit by hand.",
        "Retrain everything with `python -m wsviz.zoo retrain` (CPU by default, GPU if present);",
        "each card's `command` field reproduces that checkpoint alone.",
        "",
        "Test accuracy is on the fixed 1,000-image test split of the named dataset: the shipped checkpoint",
        "(training seed 0), and the further seeds that ship as card and predictions (`<name>/seeds/`), for",
        "the variants that enter a claim in REPORT.md. Params are real-valued parameters, a shared weight",
        "counted once; f-RepeatNet's sign masks are counted apart as bits. Compression is effective / params",
        "(how many times each stored weight is applied). MFLOPs per image.",
        "",
        "| checkpoint | group | variant | model | dataset | test acc % (seed 0) | seeds 1, 2 | params | "
        "sign-mask bits | compression | MFLOPs | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    path = out / "README.md"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- report
# (claim, A, B, kind): each claim is tested as "A vs B" on the same test images. kind "~": the paper
# says A is as good as B (tested for equivalence within MARGIN); ">": the paper says A is better;
# "vs": the paper reports a comparison without a direction we could hold it to.
CLAIMS = [
    ("Aich et al.: shared ~ vanilla at ~25% fewer parameters", "scale-msws-shared", "scale-msws-vanilla", "~"),
    ("Aich et al.: unshared ~ vanilla (same parameters)", "scale-msws-unshared", "scale-msws-vanilla", "~"),
    ("Takahashi et al.: WSMS-ResNet beats its ResNet baseline", "scale-wsms-1x1", "scale-resnet20", ">"),
    ("Takahashi et al.: WSMS-ResNet vs MS-ResNet (unshared stages)", "scale-wsms-1x1", "scale-msnet-1x1", "vs"),
    ("Boulch: ShaResNet ~ its unshared twin", "scale-sharesnet", "scale-sharesnet-unshared", "~"),
    ("ShaRDNet: S-VGGNet vs E-VGGNet (one conv for all layers)", "scale-shardnet-S", "scale-shardnet-E", "vs"),
    ("ShaRDNet: blending layers help (SL vs S)", "scale-shardnet-SL", "scale-shardnet-S", ">"),
    ("RepeatNet: s-RepeatNet vs linear repetition", "scale-repeatnet-s", "scale-repeatnet-linear", "vs"),
    ("RepeatNet: f-RepeatNet vs linear repetition", "scale-repeatnet-f", "scale-repeatnet-linear", "vs"),
    (f"RepeatNet Table 4: C4 steerable > s-RepeatNet ({MATCHED['c4']})", "rot-steerable-c4", "rot-repeat-swish-c4", ">"),
    (f"RepeatNet Table 4: C8 steerable > s-RepeatNet ({MATCHED['c8']})", "rot-steerable-c8", "rot-repeat-swish-c8", ">"),
    (f"RepeatNet Table 4: C16 steerable > s-RepeatNet ({MATCHED['c16']})", "rot-steerable-c16", "rot-repeat-swish-c16", ">"),
    (f"RepeatNet Table 4: s-RepeatNet ({MATCHED['c4']}) > plain CNN", "rot-repeat-swish-c4", "rot-cnn", ">"),
    (f"RepeatNet Table 4: s-RepeatNet ({MATCHED['c8']}) > plain CNN", "rot-repeat-swish-c8", "rot-cnn", ">"),
    (f"RepeatNet Table 4: s-RepeatNet ({MATCHED['c16']}) > plain CNN", "rot-repeat-swish-c16", "rot-cnn", ">"),
]
# Scale-robustness comparisons (accuracy averaged over SCALES), tested like the claims.
SCALE_CLAIMS = [
    ("WSMS-ResNet vs ResNet-20, averaged over scales", "scale-wsms-1x1", "scale-resnet20", "vs"),
    ("WSMS-ResNet vs MS-ResNet, averaged over scales", "scale-wsms-1x1", "scale-msnet-1x1", "vs"),
    ("msws shared ~ vanilla, averaged over scales", "scale-msws-shared", "scale-msws-vanilla", "~"),
]
SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MARGIN = 0.01  # equivalence margin of the "~" claims: ±1 point
ALPHA = 0.05


@dataclass
class SeedRun:
    """One trained seed of a zoo entry: its card and per-image predictions (from ``predictions.npz``)."""

    seed: int
    card: dict[str, Any]
    test: Any  # (n,) predicted class per test image
    labels: Any
    scale: Any = None  # (len(SCALES), n) on the upright mnist5k test digits, for the scale group
    scale_labels: Any = None

    @property
    def correct(self):
        return self.test == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def seed_runs(out: str | Path, name: str) -> list[SeedRun]:
    """Every seed of ``name`` that has a card and predictions, in seed order."""
    import numpy as np

    from wsviz.training.checkpoint import read_card

    runs = []
    for seed in SEEDS:
        folder = seed_folder(out, name, seed)
        if not ((folder / "card.json").is_file() and (folder / PREDICTIONS).is_file()):
            continue
        with np.load(folder / PREDICTIONS) as z:
            arrays = {k: z[k].astype(np.int64) for k in z.files}
        runs.append(SeedRun(seed, read_card(folder), arrays["test"], arrays["labels"], arrays.get("scale"),
                            arrays.get("scale_labels")))
    return runs


def seed_accuracies(folder: str | Path) -> list[float]:
    """Test accuracy of every shipped training seed of the checkpoint in ``folder`` (seed 0 is the
    folder itself; further seeds in ``folder/seeds/seed<k>/``), from their per-image predictions."""
    folder = Path(folder)
    return [r.accuracy for r in seed_runs(folder.parent, folder.name)]


@dataclass
class ClaimResult:
    claim: str
    a: str
    b: str
    kind: str
    seeds: Any  # stats.SeedComparison
    per_seed: list[tuple[int, float]]  # (seed, per-image p) for each seed pair: McNemar, or clustered by digit
    p_holm: float = 1.0
    eq_holm: float | None = None

    def verdict(self) -> str:
        s = self.seeds
        if not s.testable:
            return f"cannot test: {s.reason}"
        different = self.p_holm < ALPHA
        if self.kind == "~":
            if self.eq_holm is not None and self.eq_holm < ALPHA:
                return f"equivalent within ±{100 * MARGIN:g} pt"
            return "different" if different else "inconclusive"
        if not different:
            return "inconclusive"
        if self.kind == ">":
            return "supported (A > B)" if s.diff > 0 else "contradicted (B > A)"
        return "A > B" if s.diff > 0 else "B > A"


def claims_table(out: str | Path = "checkpoints",
                 cache: dict[str, list[SeedRun]] | None = None) -> tuple[list[ClaimResult], int]:
    """Every claim (and scale comparison) tested over seeds, Holm-adjusted as one family.
    Returns the results and the number of tests in the family. ``cache``: seed runs already read
    (filled with those this reads)."""
    import numpy as np

    from wsviz.analysis.stats import clustered_sign_flip_test, compare_over_seeds, holm, mcnemar

    out = Path(out)
    cache = {} if cache is None else cache

    def runs(name: str) -> list[SeedRun]:
        if name not in cache:
            cache[name] = seed_runs(out, name)
        return cache[name]

    results = []
    for claim, a, b, kind in CLAIMS:
        ra, rb = runs(a), runs(b)
        if len(ra) < 2 or len(rb) < 2:
            continue
        sc = compare_over_seeds([r.accuracy for r in ra], [r.accuracy for r in rb],
                                margin=MARGIN if kind == "~" else None, alpha=ALPHA)
        by_b = {r.seed: r for r in rb}
        per_seed = [(r.seed, mcnemar(r.correct, by_b[r.seed].correct).p_value) for r in ra if r.seed in by_b]
        results.append(ClaimResult(claim, a, b, kind, sc, per_seed))
    for claim, a, b, kind in SCALE_CLAIMS:
        ra, rb = runs(a), runs(b)
        ra, rb = [r for r in ra if r.scale is not None], [r for r in rb if r.scale is not None]
        if len(ra) < 2 or len(rb) < 2:
            continue

        def mean_acc(r: SeedRun) -> float:
            return float((r.scale == r.scale_labels[None, :]).mean())

        sc = compare_over_seeds([mean_acc(r) for r in ra], [mean_acc(r) for r in rb],
                                margin=MARGIN if kind == "~" else None, alpha=ALPHA)
        by_b = {r.seed: r for r in rb}
        per_seed = []
        for r in ra:
            if r.seed not in by_b:
                continue
            o = by_b[r.seed]
            digits = np.tile(np.arange(r.scale.shape[1]), r.scale.shape[0])  # one cluster per test digit
            t = clustered_sign_flip_test((r.scale == r.scale_labels[None, :]).ravel(),
                                         (o.scale == o.scale_labels[None, :]).ravel(), digits, seed=r.seed)
            per_seed.append((r.seed, t.p_value))
        results.append(ClaimResult(claim, a, b, kind, sc, per_seed))
    # One family: the difference test of every claim, and the equivalence test of every "~" claim; a row
    # that cannot be tested (no spread between seeds: NaN) is left out of it (holm keeps NaN as NaN).
    family = [r.seeds.p_value for r in results] + [r.seeds.equivalence_p for r in results if r.kind == "~"]
    adjusted = holm(family)
    eq = iter(adjusted[len(results):])
    for r, p in zip(results, adjusted[:len(results)]):
        r.p_holm = p
        if r.kind == "~":
            r.eq_holm = next(eq)
    return results, sum(not math.isnan(p) for p in family)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):  # no such test, or not run (no spread between seeds)
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _interval(s: Any) -> str:
    return f"[{100 * s.lo:+.1f}, {100 * s.hi:+.1f}]" if s.testable else "[no interval]"


def _runs_per_row(results: list[ClaimResult]) -> str:
    """'3 vs 3', or every combination the rows have ('3 vs 2 or 3 vs 3')."""
    ns = sorted({(r.seeds.n_a, r.seeds.n_b) for r in results})
    return " or ".join(f"{a} vs {b}" for a, b in ns) or "no"


def _test_images(results: list[ClaimResult], runs: dict[str, list[SeedRun]]) -> str:
    """How many test images the per-seed-pair McNemar tests are on (the claims' variants' test splits)."""
    sizes = sorted({len(r.test) for c in results if (c.claim, c.a, c.b, c.kind) in CLAIMS
                    for n in (c.a, c.b) for r in runs.get(n, [])})
    return " or ".join(f"{k:,}" for k in sizes) or "no"


def _welch_power_sentence(results: list[ClaimResult], m: int) -> str:
    """What few runs mean for Welch's test, computed: the rows' degrees of freedom, the |t| a row needs to
    pass even the first Holm step at them, and the inconclusive row with the largest |t|."""
    from scipy import stats as sps

    tested = [r for r in results if r.seeds.testable]
    if not tested or not m:
        return ""
    dfs = sorted(r.seeds.df for r in tested)

    def need(df: float) -> float:
        return float(sps.t.ppf(1 - ALPHA / (2 * m), df))

    text = (f"With so few runs Welch's t has {dfs[0]:.1f} to {dfs[-1]:.1f} degrees of freedom here, so at the first "
            f"Holm step (p < {ALPHA:g}/{m}) a row needs |t| ≥ {need(dfs[-1]):.1f} (at {dfs[-1]:.1f} df) to "
            f"{need(dfs[0]):.1f} (at {dfs[0]:.1f} df): a difference of that many standard errors (later steps, "
            "reached only when every earlier one rejects, need a little less).")

    def t(r: ClaimResult) -> float:
        s = r.seeds
        return s.diff / math.sqrt(s.sd_a ** 2 / s.n_a + s.sd_b ** 2 / s.n_b)

    missed = [r for r in tested if r.p_holm >= ALPHA]
    if missed:
        r = max(missed, key=lambda r: abs(t(r)))
        text += (f" The inconclusive row with the largest |t| is `{r.a}` vs `{r.b}`: t = {t(r):.1f} at "
                 f"{r.seeds.df:.1f} df, where the first step needs {need(r.seeds.df):.1f}.")
    return text


def _seed_code_bullet(runs: dict[str, list[SeedRun]]) -> list[str]:
    """A bullet on variants whose seeds' cards record different train_config fields (trained by different
    versions of the training code), from the cards; none when every variant's seeds agree."""
    from scipy import stats as sps

    def names(ns: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in ns)

    mixed: dict[str, list[int]] = {}
    missing: set[str] = set()
    for n, rs in runs.items():
        keys = {r.seed: set(r.card.get("train_config") or {}) for r in rs}
        every = set().union(*keys.values()) if keys else set()
        old = [s for s, k in keys.items() if k != every]
        if old:
            mixed[n] = old
            missing |= set().union(*(every - keys[s] for s in old))
    if not mixed:
        return []
    olds = sorted({s for ss in mixed.values() for s in ss})
    which = f"seed {olds[0]}'s card records" if len(olds) == 1 else \
        f"the cards of seeds {', '.join(map(str, olds))} record"

    def days(pick) -> str:
        return ", ".join(sorted({str(r.card["created"])[:10] for n in mixed for r in runs[n]
                                 if pick(r) and r.card.get("created")})) or "on dates not recorded"

    same = [n for n in runs if n not in mixed and runs[n]]
    text = (f"- **Seeds may not be interchangeable.** For {len(mixed)} of the {len(runs)} variants in a claim "
            f"({names(list(mixed))}), {which} a train_config without {names(sorted(missing))}, which its other "
            f"seeds' cards record: seed{'s' if len(olds) > 1 else ''} {', '.join(map(str, olds))} trained "
            f"{days(lambda r: r.seed in olds)}, the others {days(lambda r: r.seed not in olds)}. They were trained "
            "by different versions of the training code"
            + (f"; {names(same)} {'has' if len(same) == 1 else 'have'} one train_config for all "
               f"{'its' if len(same) == 1 else 'their'} seeds." if same else "."))
    if len(olds) == 1 and all(v == olds for v in mixed.values()):
        def beats(n: str, strict: bool) -> bool:
            first = next(r for r in runs[n] if r.seed == olds[0])
            return all(first.accuracy > o.accuracy if strict else first.accuracy >= o.accuracy
                       for o in runs[n] if o.seed != olds[0])

        best = sum(beats(n, True) for n in mixed)
        tied = sum(beats(n, False) for n in mixed) - best
        k = len(SEEDS)
        p = sps.binomtest(best, len(mixed), 1 / k, alternative="greater").pvalue
        text += (f" Of those {len(mixed)}, seed {olds[0]} is strictly the most accurate of its variant's seeds in "
                 f"{best}" + (f" and tied for it in {tied}" if tied else "") + f" (one-sided binomial p = {p:.2g} "
                 f"for {best} of {len(mixed)} against 1 in {k}; exploratory: looked at after seeing the data).")
    text += (" The tests below treat every variant's seeds as interchangeable runs of one procedure; if the code "
             "change altered training, they are not.")
    return [text]


def _untested_sentence(results: list[ClaimResult]) -> str:
    """What the report says of rows that could not be tested (no spread between seeds in either model)."""
    out = [r for r in results if not r.seeds.testable]
    if not out:
        return ("A row whose seeds show no spread in either model would not be tested (equal runs do not show "
                "that runs never vary) and would be left out of the family; there is none.")
    rows = ", ".join(f"`{r.a}` vs `{r.b}`" for r in out)
    return (f"{len(out)} row{'s' if len(out) != 1 else ''} could not be tested (no spread between seeds in either "
            f"model: {rows}): equal runs do not show that runs never vary, so no p-value or interval is given and "
            f"{'they are' if len(out) != 1 else 'it is'} left out of the family.")


def _either(values) -> str:
    return " or ".join(f"{v:,}" for v in sorted(values))


def _training_said(runs: dict[str, list[SeedRun]]) -> str:
    """"Small models, N training images, E epochs", counted from every run's card: the size of its
    training split (where the dataset can be read here) and the epochs it finished."""
    from wsviz.data.datasets import load_split
    from wsviz.errors import WsvizError

    sizes: dict[tuple, int | None] = {}
    epochs = set()
    for seeds in runs.values():
        for r in seeds:
            c = r.card
            done = c.get("epochs_done", c.get("epochs"))
            if done is not None:
                epochs.add(int(done))
            key = (c.get("dataset"), c.get("train_split", "train"), int(c.get("data_seed", 0)))
            if key not in sizes:
                try:
                    sizes[key] = len(load_split(key[0], key[1], seed=key[2]).labels)
                except (WsvizError, OSError, ValueError):  # a dataset this machine cannot read: not counted, not guessed
                    sizes[key] = None
    parts = ([f"{_either({v for v in sizes.values() if v is not None})} training images"]
             if any(v is not None for v in sizes.values()) else []) + ([f"{_either(epochs)} epochs"] if epochs else [])
    return ", ".join(["Small models", *parts])


def render_report(out: str | Path = "checkpoints") -> str:
    """The text of checkpoints/REPORT.md: the papers' claims tested over training seeds, from the shipped
    per-image predictions (every number computed here; nothing typed in). A test regenerates it
    and fails when the file differs (``tests/test_zoo_report.py``)."""
    import numpy as np

    from wsviz.analysis.stats import wilson_ci
    from wsviz.training.cards import card_float_params

    out = Path(out)
    runs: dict[str, list[SeedRun]] = {}
    results, m = claims_table(out, runs)  # reads each variant's seed files once, for the tables below too
    names = claimed()
    runs.update({n: seed_runs(out, n) for n in names if n not in runs})
    seeds_of = sorted({len(r) for r in runs.values() if r})
    lines = [
        "# What the shipped zoo shows", "",
        "Generated by `python -m wsviz.zoo report` from the shipped per-image predictions; do not edit by hand",
        "(`tests/test_zoo_report.py` regenerates it and fails if it differs, and recomputes the predictions of",
        f"the shipped weights). {_training_said(runs)}: sanity checks of the papers'",
        "claims at toy scale, not reproductions of their ImageNet/CIFAR numbers.", "",
        "## How to read it", "",
        f"- **Seeds.** Every variant in a claim was trained {', '.join(map(str, seeds_of))} times (training seeds "
        f"{', '.join(map(str, SEEDS))}: initialisation and batch order; the same training digits). Seed 0 ships with "
        "its weights; the others ship as their card and per-image test predictions "
        "(`<variant>/seeds/seed<k>/`), and `python -m wsviz.zoo retrain` retrains them all with the current code "
        "(the same networks only up to float-level differences, which training at lr 0.1 can amplify: retrained "
        "on 2026-12-02, `scale-sharesnet-unshared` seed 1 reached 96.5% against the shipped 95.7%).",
        *_seed_code_bullet({n: runs[n] for n in dict.fromkeys([*names, *(v for r in results for v in (r.a, r.b))])
                            if runs.get(n)}),
        "- **The test of a claim** is over training runs, the independent units: Welch's two-sided t-test on the "
        f"per-seed test accuracies (n = {_runs_per_row(results)} runs). This tests the architectures on this test "
        "set, not two trained networks (test-set sampling is not in the interval: every run is scored on the same "
        f"test images). {_welch_power_sentence(results, m)} Directional (\">\") claims are tested two-sided, not "
        "one-sided, like every row (a design choice; a one-sided test would halve the p-value of a difference in "
        "the claimed direction): now that the data are seen, the tests and the family are left as they are.",
        f"- **\"~\" claims** (the paper says A is as good as B) are tested for equivalence: two one-sided Welch "
        f"tests with a margin of ±{100 * MARGIN:g} point. The verdict is "
        f"\"equivalent within ±{100 * MARGIN:g} pt\", \"different\" or \"inconclusive\"; not finding a difference "
        "is never read as \"the same\".",
        f"- **One correction for all of it**: Holm over the {m} test{'s' if m != 1 else ''} below (the difference "
        f"test of each of the {len(results)} rows, and the equivalence test of each \"~\" row), family-wise error "
        f"{ALPHA:g}. Verdicts use the Holm-adjusted p-values. " + _untested_sentence(results),
        "- **Per image, per seed pair** (seed k of A against seed k of B): McNemar's test on the "
        f"{_test_images(results, runs)} paired test images, or for scale-averaged rows a sign-flip test clustered by "
        f"digit (the {len(SCALES)} rescaled copies of a digit are one unit, not {len(SCALES)}). These test two "
        "trained networks each; they are shown, not corrected, "
        "and do not decide a verdict.",
        "- **Intervals**: the difference of mean accuracies has Welch's 95% interval, not adjusted for the "
        "multiple tests (the p-values are Holm-adjusted, the intervals are not); each shipped checkpoint's "
        "accuracy has a Wilson 95% interval (it does not collapse at 0% or 100%).",
        "- **Parameters** are real-valued parameters, a shared weight counted once; f-RepeatNet's sign masks are "
        "counted apart, as bits (the paper stores them as one bit per entry).", "",
        "## Claims", "",
        "| claim | A | B | A mean ± sd | B mean ± sd | diff [95% CI, unadjusted] | p (Welch) | p Holm | "
        "equiv. p Holm | "
        "per-seed-pair p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.seeds
        lines.append(
            f"| {r.claim} | `{r.a}` | `{r.b}` | {_pct(s.mean_a)} ± {_pct(s.sd_a)} | {_pct(s.mean_b)} ± {_pct(s.sd_b)} | "
            f"{100 * s.diff:+.1f} {_interval(s)} | {_p(s.p_value)} | {_p(r.p_holm)} | "
            f"{_p(r.eq_holm)} | {', '.join(_p(p) for _, p in r.per_seed)} | **{r.verdict()}** |")
    lines += ["", "## Every variant, per seed", "",
              "| variant | params | sign-mask bits | MFLOPs | test accuracy per seed (%) | mean ± sd | "
              "seed 0, Wilson 95% CI |", "|---|---|---|---|---|---|---|"]
    for n in names:
        rs = runs[n]
        if not rs:
            continue
        accs = np.array([r.accuracy for r in rs])
        c0 = rs[0].card
        first = next((r for r in rs if r.seed == 0), None)
        wilson = "–"
        if first is not None:
            acc0, lo, hi = wilson_ci(first.correct)
            wilson = f"{_pct(acc0)} [{_pct(lo)}, {_pct(hi)}]"
        spread = f" ± {_pct(accs.std(ddof=1))}" if len(accs) > 1 else " (one seed)"
        bits = c0.get("sign_mask_params") or 0
        lines.append(f"| `{n}` | {card_float_params(c0):,} | {bits:,} | {c0['flops'] / 1e6:.1f} | "
                     + ", ".join(f"{_pct(a)} (seed {r.seed})" for a, r in zip(accs, rs))
                     + f" | {_pct(accs.mean())}{spread} | {wilson} |")
    group = [g for g in SCALE_GROUP if any(r.scale is not None for r in runs.get(g, []))]
    if group:
        lines += ["", "## Scale robustness (upright test digits shrunk by 0.3 ... 1.0), mean ± sd over seeds", "",
                  "Shrunk about the centre with `wsviz.data.resample.rescale`, the operator that makes the "
                  "MNIST-scale training data, so each column is exactly the protocol's images at that factor. "
                  "The scale-averaged comparisons are rows of the claims table above.", "",
                  "| model | " + " | ".join(f"{s:g}" for s in SCALES) + " | mean |",
                  "|---|" + "---|" * (len(SCALES) + 1)]
        for g in group:
            acc = np.array([(r.scale == r.scale_labels[None, :]).mean(axis=1) for r in runs[g] if r.scale is not None])
            sd = acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])
            means = acc.mean(axis=1)
            lines.append(f"| `{g}` | " + " | ".join(f"{_pct(m_)} ± {_pct(s_)}" for m_, s_ in zip(acc.mean(axis=0), sd))
                         + f" | {_pct(means.mean())} ± {_pct(means.std(ddof=1) if len(means) > 1 else 0.0)} |")
    for path in tying_results(out):
        lines += ([""] if lines[-1] else []) + tying_section(json.loads(path.read_text()))
    return "\n".join(lines).rstrip("\n") + "\n"


def _mean_sd(values, digits: int = 1) -> str:
    import statistics

    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _nonzero(weights: dict) -> dict:
    return {k: float(v) for k, v in weights.items() if v}


def _default_weights() -> dict:
    from wsviz.analysis.opportunities import DEFAULT_WEIGHTS

    return DEFAULT_WEIGHTS


def spearman_interval(rho: float, n: int) -> tuple[float, float]:
    """95% interval of a Spearman ρ over ``n`` pairs: Fisher z with Fieller et al.'s SE √(1.06/(n − 3))."""
    z, half = math.atanh(rho), 1.959963984540054 * math.sqrt(1.06 / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def ranking_evidence(res: dict) -> dict:
    """What bench_tie's published results (``checkpoints/tying.json``) say of the combined score's
    weights, for a page to quote: the model and number of candidate groups and seeds they were chosen
    on, the short fine-tune's steps, the mean ρ on val (where the weights were chosen) and on the test
    half for the combined score (with its 95% interval, ``rho_test_ci``, as REPORT.md gives it) and for
    the KL alone, and whether ``DEFAULT_WEIGHTS`` are still the weights chosen there (``current``)."""
    import statistics

    seeds = res["per_seed"]
    test = {k: statistics.mean(s["spearman_test"][k] for s in seeds) for k in seeds[0]["spearman_test"]}
    return {"model": res["checkpoint"], "groups": len(res["candidate_groups"]), "seeds": len(seeds),
            "steps": res["short_steps"], "rho_val": float(res["val_rho_chosen"]),
            "rho_test": test["combined (chosen on val)"], "kl_test": test["measured_kl"],
            "rho_test_ci": spearman_interval(test["combined (chosen on val)"], len(res["candidate_groups"])),
            "current": _nonzero(res["weights_chosen_on_val"]) == _nonzero(_default_weights())}


def tying_results(out: str | Path = "checkpoints") -> list[Path]:
    """bench_tie's published results in ``out``: the shipped twin's ``tying.json`` first, then every other
    checkpoint's ``tying-NAME.json`` (``bench_tie --checkpoint DIR --publish``)."""
    out = Path(out)
    return [p for p in [out / "tying.json"] if p.is_file()] + sorted(out.glob("tying-*.json"))


def _interval_sentence(ci: dict, what: str) -> str:
    return (f"{what} {ci['gap']:.2f} points, 95% bootstrap interval [{ci['low']:.2f}, {ci['high']:.2f}] "
            "(the test half's images resampled, every model's answers on an image together; seeds fixed)")


def _judge(point: bool, shown: bool | None, refuted: bool | None, yes: str = "met", no: str = "NOT met") -> str:
    """A target's verdict: plain only when an interval shows it (``shown``) or rules it out (``refuted``);
    otherwise said to be the point estimate's. ``shown`` None: no interval."""
    if shown is None:
        return f"{yes if point else no} in the point estimate; no interval is given"
    if shown:
        return yes
    if refuted:
        return no
    return f"{yes} in the point estimate, not shown" if point else f"{no} in the point estimate, not ruled out"


def _wilson_bound(a: list[float], b: list[float], n: int, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) of accuracies in % on the same ``n`` test images, and an interval of it that holds
    whatever the pairing: every accuracy's Wilson interval at level 1 - (1 - level)/k (Bonferroni over the k
    accuracies), so all hold together with probability at least ``level``; seeds fixed. Wider than a paired
    interval, which needs the per-image answers that bench_tie's results do not keep."""
    import statistics

    from scipy import stats as sps

    alpha = (1 - level) / (len(a) + len(b))

    def ci(acc: float) -> tuple[float, float]:
        c = sps.binomtest(round(acc * n / 100), n).proportion_ci(1 - alpha, method="wilson")
        return 100 * c.low, 100 * c.high

    la, ua = zip(*map(ci, a))
    lb, ub = zip(*map(ci, b))
    mean = statistics.mean
    return mean(a) - mean(b), mean(la) - mean(ub), mean(ua) - mean(lb)


def _bound_words(k: int, n: int) -> str:
    return (f"from each accuracy's Wilson interval on the {n:,}-image test half, Bonferroni over the {k} accuracies, "
            "so it holds whatever the pairing and is wide for it, as bench_tie's results keep no per-image answers "
            "for a paired interval; seeds fixed")


def _compute(res: dict) -> str:
    threads = res.get("threads", 1)
    return (f"Compute: {res['cpu_seconds'] / 60:.1f} CPU minutes, {res['wall_seconds'] / 60:.1f} min wall, "
            + ("one torch thread." if threads == 1 else f"{threads} torch threads."))


def tying_section(res: dict) -> list[str]:
    seeds = res["per_seed"]
    n = len(seeds)
    """REPORT.md's section on tying a trained model into a shared one, from ``benchmarks/bench_tie.py``'s
    results (``checkpoints/tying.json``): every number read from ``res``, the targets' verdicts computed."""
    import statistics

    inits = list(res["per_seed"][0]["after_tying"])
    name = res.get("checkpoint", "scale-sharesnet-unshared")
    twin = name == "scale-sharesnet-unshared"
    share = 100 * res["ft_steps"] / res["original_steps"]
    from wsviz.training.tying import DISTILL_TEMPERATURE, DISTILL_WEIGHT, FEATURE_DISTILL

    rec = res.get("recipe")
    lrs = ", ".join(f"{k}: {v:.1f}%" for k, v in res["lr_val"].items())
    if isinstance(rec, dict):  # the fields of finetune_config when the benchmark ran
        w, f = rec["distill_weight"], rec["feature_distill"]
        flags = f"--step-schedule --distill {rec['distill']:g} --distill-weight {w:g} --feature-distill {f:g} " \
                f"--average-last {res['average_last']}"
        recipe = (f"Fine-tuning: {res['ft_steps']} SGD steps ({share:.1f}% of the original), wsviz's recipe for a tied "
                  f"model (`{flags}`): a cosine annealed every step from lr {res['lr']} (chosen on val from {lrs}), "
                  f"{w:.0%} of the loss from the untied model's predictions (T = {rec['distill']:g}) and the rest from the "
                  f"labels, the tied blocks' outputs pulled to the untied model's (feature distillation, weight {f:g}), "
                  f"the last {res['average_last']} steps' weights averaged; the untied model fine-tuned the same way "
                  "(without the feature term: it has no tied blocks) is the control. From scratch: the same steps from "
                  f"the labels at the original recipe's lr {res['scratch_lr']}.")
        if (rec["distill"], w, f) != (DISTILL_TEMPERATURE, DISTILL_WEIGHT, FEATURE_DISTILL):
            recipe += " wsviz's recipe has changed since; this section has not been re-run with it."
    elif rec == "distill":
        recipe = (f"Fine-tuning: {res['ft_steps']} SGD steps ({share:.1f}% of the original), the recipe wsviz fine-tuned "
                  f"a tied model with when this ran (`--step-schedule --distill 4 --average-last {res['average_last']}`): "
                  f"a cosine annealed every step from lr {res['lr']} (chosen on val from {lrs}), distillation from the "
                  f"untied model's predictions (T = 4), the last {res['average_last']} steps' weights averaged; the "
                  "untied model fine-tuned the same way is the control. From scratch: the same steps from the labels at "
                  f"the original recipe's lr {res['scratch_lr']}. wsviz's recipe has changed since (half the loss from "
                  "the labels, feature distillation: `benchmarks/results/tie-recipe-plan.md`); this section has not "
                  "been re-run with it.")
    else:
        recipe = (f"Fine-tuning: {res['ft_steps']} SGD steps ({share:.1f}% of the original) at lr {res['lr']} (chosen on "
                  "val from " + ", ".join(f"{k}: {v:.1f}%" for k, v in res["lr_val"].items()) + "); from scratch: the "
                  f"same steps at the original recipe's lr {res['scratch_lr']}.")
    lines = ["## Tying a trained model into a shared one (`benchmarks/bench_tie.py`)" if twin else
             f"## Tying a trained model into a shared one: `{name}` on {res.get('dataset', '?')} (`benchmarks/bench_tie.py`)", "",
             f"{'Shipped plain' if twin else 'Plain'} model `{name}` ({res['params']['untied']:,} parameters, "
             f"{res['untied_full_test']:.1f}% on the full test split, {res['original_steps']} training steps) tied by "
             f"ShaResNet's rule into {seeds[0]['params_tied']:,} parameters"
             + (" (the shipped shared model's count). " if twin else ". ") +
             f"{n} seeds (calibration sample of {res['calibration']} training images, fine-tuning order, "
             "from-scratch initialisation, random groups); mean ± sd over seeds. The test split is halved: "
             f"choices on val ({res['val_n']} images), numbers below on the other half (test half) unless said.",
             "", recipe, "",
             "| model | accuracy (test half, %) |", "|---|---|",
             f"| untied (as trained) | {res['untied_test']:.1f} |",
             f"| untied, fine-tuned the same {res['ft_steps']} steps | {_mean_sd(s['untied_ft'] for s in seeds)} |"]
    for init in inits:
        lines.append(f"| tied, {init}, right after tying (BatchNorm re-estimated) | "
                     f"{_mean_sd(s['after_tying'][init] for s in seeds)} |")
    for init in inits:
        lines.append(f"| tied, {init}, + {res['ft_steps']}-step fine-tune | {_mean_sd(s['after_ft'][init] for s in seeds)} |")
    lines.append(f"| shared architecture from scratch, {res['ft_steps']} steps | {_mean_sd(s['scratch'] for s in seeds)} |")
    gap = [res["untied_test"] - s["after_ft"]["lstsq"] for s in seeds]
    beat = [s["after_ft"]["lstsq"] - s["scratch"] for s in seeds]
    control = [s["untied_ft"] - s["after_ft"]["lstsq"] for s in seeds]
    test_n = int(res.get("test_n", res["val_n"]))  # the test half: the other half of an even split
    ci = res.get("gap_ci")
    point = statistics.mean(gap) <= 0.5
    if ci is None:
        target = _judge(point, None, None)
    elif ci["high"] <= 0.5:
        target = "met (the whole 95% interval below is under 0.5)"
    elif ci["low"] > 0.5:
        target = "NOT met (the whole 95% interval below is over 0.5)"
    else:
        target = _judge(point, False, False) + (" (the 95% interval below reaches past 0.5)" if point else
                                                " (the 95% interval below reaches under 0.5)")
    tied = [s["after_ft"]["lstsq"] for s in seeds]
    d, lo, hi = _wilson_bound(tied, [s["scratch"] for s in seeds], test_n)
    lines += ["", f"Target \"within 0.5 points of the untied model\": lstsq + fine-tune is {_mean_sd(gap, 2)} points below it "
              f"— {target}. Below the untied model fine-tuned the same way: {_mean_sd(control)}. Target \"better "
              f"than from scratch\": {_mean_sd(beat)} points better — {_judge(d > 0, lo > 0, hi < 0)}: 95% interval "
              f"[{lo:.1f}, {hi:.1f}] ({_bound_words(2 * n, test_n)}).", ""]
    if "gap_ci" in res:
        ci, cc = res["gap_ci"], res["control_ci"]
        lines += [_interval_sentence(ci, "How sure: below the untied model, mean over seeds") + "; "
                  + ("the whole interval is under 0.5, so the target is shown at this confidence"
                     if ci["high"] <= 0.5 else "the interval reaches past 0.5, so the target is not shown at this "
                     "confidence" + (" (nor ruled out)" if ci["low"] <= 0.5 else " (and it is ruled out)"))
                  + ". " + _interval_sentence(cc, "Below the untied model fine-tuned the same way:") + ".", ""]
    itself = [res["untied_test"] - s["untied_ft"] for s in seeds]
    lines += [f"The untied model fine-tuned with the same {res['ft_steps']} steps is itself {_mean_sd(itself)} points "
              "below its as-trained accuracy" + (
                  f", so {'most' if statistics.mean(itself) > statistics.mean(gap) / 2 else 'part'} of the gap is the "
                  "fine-tune's, not the tie's" if statistics.mean(itself) > 0 else " (negative: above)")
              + f"; one image of the test half is {100 / max(res.get('val_n', 500), 1):.2g} points.", ""]
    if seeds[0].get("curve"):  # bench_tie --curve with no shares runs none
        shares = list(seeds[0]["curve"])
        lines += ["More fine-tuning (the same recipe, lstsq init), to say what the 0.5-point target takes:", "",
                  "| fine-tuning steps | share of the original | tied (test half, %) | below the untied model |",
                  "|---|---|---|---|",
                  f"| {res['ft_steps']} | {share:.0f}% | {_mean_sd(s['after_ft']['lstsq'] for s in seeds)} | {_mean_sd(gap)} |"]
        reached = None
        for k in shares:
            below = [res["untied_test"] - s["curve"][k]["tied"] for s in seeds]
            lines.append(f"| {seeds[0]['curve'][k]['steps']} | {100 * float(k):.0f}% | "
                         f"{_mean_sd(s['curve'][k]['tied'] for s in seeds)} | {_mean_sd(below)} |")
            if reached is None and statistics.mean(below) <= 0.5:
                reached = k
        first = statistics.mean(gap) <= 0.5
        later = "no interval is given for the longer fine-tunes (bench_tie's results keep no per-image answers)"
        if first:
            said = f"already at the {share:.0f}% budget in the point estimate" + (
                "; no interval is given." if ci is None else
                ", and shown (the whole 95% interval above is under 0.5)." if ci["high"] <= 0.5 else
                ", not shown (the 95% interval above reaches past 0.5).")
        elif reached:
            said = f"first at {100 * float(reached):.0f}% of the original steps in the point estimate; not shown: {later}."
        else:
            said = f"not within {100 * float(shares[-1]):.0f}% of the original steps either, in the point estimate; {later}."
        lines += ["", "Within 0.5 points: " + said, ""]
    if res.get("only_tie"):
        lines += [f"Ranking and budgeted choice: not run on `{name}` (`bench_tie --only-tie`).",
                  "", _compute(res), ""]
        return lines
    keys = list(seeds[0]["spearman_test"])
    lines += [f"### Ranking: Spearman between each score and the drop after a {res['short_steps']}-step fine-tune",
              "", f"All {len(res['candidate_groups'])} candidate groups (same-shape runs of blocks within a stage), "
              "each tied alone (lstsq) and fine-tuned; drop = untied model after the same fine-tune minus tied. "
              "Scores from the calibration sample; the three measured now (drop, loss rise, KL) cross-fitted: "
              "measured on val for the ρ on the test half, on the test half for the ρ on val (which chooses the "
              "combined score's weights), so a score never shares images with the drop it is judged against. "
              "Combined: weighted mean of "
              f"the scores' ranks; the library's default weights when this ran {res['weights_default']}; weights chosen on val from "
              f"{{0, 1, 2}}^{len(res['singles'])}: {res['weights_chosen_on_val']} (mean val ρ {res['val_rho_chosen']:.3f}; default "
              f"{res['val_rho_default']:.3f}). "
              + ("The library's default weights (`DEFAULT_WEIGHTS`) are now these val-chosen weights." if _nonzero(
                  res["weights_chosen_on_val"]) == _nonzero(_default_weights()) else "The library's default weights "
                 f"(`DEFAULT_WEIGHTS`) are now {_nonzero(_default_weights())}, not the weights chosen here."), "",
              "| score | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " | mean (test half) | mean (val) |",
              "|---|" + "---|" * (n + 2)]
    for k in keys:
        label = "combined (the default when this ran)" if k == "combined (library default)" else k
        lines.append(f"| {label} | " + " | ".join(f"{s['spearman_test'][k]:.2f}" for s in seeds)
                     + f" | {statistics.mean(s['spearman_test'][k] for s in seeds):.2f} | "
                     + f"{statistics.mean(s['spearman_val'][k] for s in seeds):.2f} |")
    comb = statistics.mean(s["spearman_test"]["combined (chosen on val)"] for s in seeds)
    others = {k: statistics.mean(s["spearman_test"][k] for s in seeds)
              for k in ("weight_similarity", "output_cka", "adjacent blocks")}
    groups = len(res["candidate_groups"])
    r_lo, r_hi = spearman_interval(comb, groups)
    lines += ["", f"Target ρ ≥ 0.7 for the combined score (its weights chosen on val, ρ on the test half): {comb:.2f} — "
              f"{_judge(comb >= 0.7, r_lo >= 0.7, r_hi < 0.7)}: 95% interval [{r_lo:.2f}, {r_hi:.2f}] (Fisher z, "
              f"SE √(1.06/(n − 3)) for Spearman's ρ with n = {groups} candidate groups, the mean over seeds taken as "
              "one ρ; the groups overlap, sharing layers, so they are not independent and the interval is if anything "
              "too narrow). Better than weight similarity, CKA and adjacency alone: "
              + ("yes" if all(comb > v for v in others.values()) else "NO") + " in the point estimates ("
              + ", ".join(f"{k} {v:.2f}" for k, v in others.items()) + "); no interval is given for these differences "
              f"(scores compared on the same {groups} groups are correlated).", ""]
    lines += ["### Budgeted choice at ShaResNet's parameter saving", "",
              "wsviz (`choose_groups`): the minimal disjoint candidate sets saving at least as much as ShaResNet's rule, "
              f"ranked by the sum of their groups' KL measured on val, the {res['verify']} best tied together "
              "and measured on val, the best of those kept; vs the rule, vs random disjoint groups added until they "
              "save as much; each tied "
              f"(lstsq) and fine-tuned {res['ft_steps']} steps. Drop = untied fine-tuned the same way minus this.", "",
              "| choice | seed | saves | right after tying | after fine-tune | drop |", "|---|---|---|---|---|---|"]
    for s in seeds:
        for name, b in s["budget"].items():
            lines.append(f"| {name} | {s['seed']} | {b['saving']:,} | {b['after_tying']:.1f} | {b['after_ft']:.1f} | "
                         f"{b['drop_after_ft']:+.1f} |")
    ws = [s["budget"]["wsviz"]["drop_after_ft"] for s in seeds]
    rule = [s["budget"]["sharesnet rule"]["drop_after_ft"] for s in seeds]
    rnd = [b["drop_after_ft"] for s in seeds for k, b in s["budget"].items() if k.startswith("random")]
    paired = [w - r for w, r in zip(ws, rule)]
    # drops are the untied fine-tuned model minus each choice, the same untied model per seed: a difference of
    # drops is the other way round a difference of the choices' accuracies, which the interval bounds
    after = {k: [b["after_ft"] for s in seeds for j, b in s["budget"].items() if j == k or (k == "random" and
                 j.startswith("random"))] for k in ("wsviz", "sharesnet rule", "random")}
    d_rule, lo_rule, hi_rule = _wilson_bound(after["sharesnet rule"], after["wsviz"], test_n)
    d_rnd, lo_rnd, hi_rnd = _wilson_bound(after["random"], after["wsviz"], test_n)
    images = ", ".join(f"{round(x * test_n / 100):+d}" for x in paired)
    lines += ["", f"Mean drop: wsviz {_mean_sd(ws)}, ShaResNet's rule {_mean_sd(rule)}, random {_mean_sd(rnd)}. "
              f"wsviz minus the rule: {d_rule:+.1f} points (per seed {images} images of the {test_n}-image test half, "
              f"every seed on the same images), 95% interval [{lo_rule:+.1f}, {hi_rule:+.1f}] "
              f"({_bound_words(2 * n, test_n)}) — wsviz loses less than the rule: "
              f"{_judge(d_rule < 0, hi_rule < 0, lo_rule > 0, 'yes', 'NO')}. wsviz minus random: {d_rnd:+.1f} points, "
              f"95% interval [{lo_rnd:+.1f}, {hi_rnd:+.1f}] (the same way, over {n + len(rnd)} accuracies) — wsviz "
              f"loses less than random: {_judge(d_rnd < 0, hi_rnd < 0, lo_rnd > 0, 'yes', 'NO')}. wsviz's groups save "
              f"{statistics.mean(s['budget']['wsviz']['saving'] for s in seeds):,.0f} parameters against the rule's "
              f"{statistics.mean(s['budget']['sharesnet rule']['saving'] for s in seeds):,.0f}.", "",
              "wsviz's groups per seed: " + "; ".join(
                  f"seed {s['seed']}: " + ", ".join(" + ".join(g) for g in s["budget"]["wsviz"]["groups"])
                  for s in seeds) + ".", "",
              _compute(res), ""]
    return lines


def report(out: str | Path = "checkpoints") -> Path:
    """Write :func:`render_report` to ``out/REPORT.md``."""
    path = Path(out) / "REPORT.md"
    path.write_text(render_report(out))
    return path


def write_all_predictions(out: str | Path = "checkpoints", log=print) -> list[Path]:
    """``predictions.npz`` for every seed folder of every zoo entry that has weights (after a retrain,
    or to refresh seed 0 from the shipped weights)."""
    written = []
    for e in ZOO:
        for seed in SEEDS:
            folder = seed_folder(out, e.name, seed)
            if (folder / "weights.safetensors").is_file() and (folder / "card.json").is_file():
                written.append(write_predictions(folder, e.name))
                log(f"{written[-1]}")
    return written


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
    r.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="training seeds (default: 0 for every entry, and 1 2 for the claimed ones)")
    t = sub.add_parser("table", help="regenerate --out/README.md from the cards")
    t.add_argument("--out", default="checkpoints")
    rp = sub.add_parser("report", help="write --out/REPORT.md: the papers' claims tested on the zoo")
    rp.add_argument("--out", default="checkpoints")
    pr = sub.add_parser("predictions", help="write predictions.npz beside every checkpoint that has weights")
    pr.add_argument("--out", default="checkpoints")
    sub.add_parser("list", help="list the zoo entries")
    args = ap.parse_args(argv)
    from wsviz.errors import WsvizError

    try:
        if args.cmd == "retrain":
            retrain(args.out, args.epochs, args.only, args.device, args.max_batches,
                    log=lambda s: print(s, flush=True), seeds=tuple(args.seeds) if args.seeds is not None else None)
        elif args.cmd == "table":
            print(write_table(args.out))
        elif args.cmd == "report":
            print(report(args.out))
        elif args.cmd == "predictions":
            write_all_predictions(args.out, log=lambda s: print(s, flush=True))
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
