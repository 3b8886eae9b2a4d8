"""Proof of issue 19: tie a trained plain ResNet into its shared form, fine-tune briefly, and check
that wsviz's ranking of where to share predicts what sharing costs.

Data: the shipped ``mnist5k-scale`` (4,000 train / 1,000 test) and the shipped trained plain model
``checkpoints/scale-sharesnet-unshared`` (``sharesnet_wrn_digits``, shared=false, 96.4%, 12 epochs
of 31 steps = 372 steps). The test split is cut in two stratified halves: **val** (even indices)
chooses everything that is chosen (the fine-tuning learning rate, the weights of the combined
score, the budgeted groups), **test** (odd indices) is only reported. Calibration images (lstsq
kernels, BatchNorm statistics, the four scores) come from the training split.

Per seed (calibration sample, fine-tuning order, from-scratch initialisation, random groups):

1. ShaResNet's rule (``sharesnet_rule``: blocks 2..n of each stage share conv2): accuracy right after
   tying for each init; after fine-tuning with 10% of the original steps (37 of 372) by wsviz's
   recipe (``finetune_config``: per-step cosine, half distillation from the untied model and half
   the labels, feature distillation of the tied blocks, the last 15 steps averaged), and with 25%
   and 50% of them; the same shared architecture trained from scratch
   for the same steps; the untied model (as is, and after the same fine-tune).
2. Ranking: every candidate group is tied alone (lstsq) and fine-tuned for a fixed short run; its
   drop is the untied model's accuracy after the same run minus the tied one's. Spearman between
   each score and that drop on the test half (scores computed on calibration + val data), for the
   combined predicted cost vs weight similarity, output CKA, gradient conflict, the drop, loss rise
   and KL right after tying and "adjacent blocks" (cost = number of blocks spanned) alone.
3. Budget: at ShaResNet's parameter saving (48,384), ``choose_groups`` (disjoint sets ranked by
   the sum of their groups' measured KL divergence from the untied model's predictions on val,
   ``by="measured_kl"``, its default; the best few sets tied together and measured on val) vs
   ShaResNet's rule vs random disjoint groups saving as much; each tied and fine-tuned like (1).

    python -m benchmarks.bench_tie --threads 2 --publish   # the published run: checkpoints/tying.json, 24 min
    python -m benchmarks.bench_tie [--seeds 0 1 2] [--out benchmarks/results] [--threads 2]
    python -m benchmarks.bench_tie --checkpoint DIR [--data-root ROOT]   # your own plain ResNet (e.g. CIFAR-10)
    python -m benchmarks.bench_tie --checkpoint benchmarks/checkpoints/fashion-sharesnet-unshared --only-tie \
        --curve 0.25 --lrs 0.01 0.03 0.1 --threads 2 --publish

The last is the 0.5-point target measured where a test can resolve it: the same architecture trained
on Fashion-MNIST (``python -m wsviz.train --model sharesnet_wrn_digits --dataset fashion-mnist
--epochs 10 --max-batches 100 --set shared=false``, 90.96%; 10,000 test images, so halves of 5,000,
where one image is 0.02 points rather than mnist5k's 0.2). Its lr grid is moved up one step because
on the default grid val chose 0.03, the grid's edge (0.1 then scored lower on val). With the per-image answers of every model the gap gets a
95% bootstrap interval over the test half's images (``gap_interval``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from wsviz.analysis.opportunities import (
    COST_SIGN,
    DEFAULT_WEIGHTS,
    candidate_groups,
    choose_groups,
    find_opportunities,
    group_saving,
    predicted_costs,
    sharesnet_rule,
)
from wsviz.data.datasets import fit_to, load_split
from wsviz.errors import WsvizError
from wsviz.models import create_model, summarize
from wsviz.models.registry import input_shape
from wsviz.models.tie import apply_ties, reestimate_batchnorm, tie
from wsviz.training.checkpoint import load_checkpoint
from wsviz.training.loop import TrainConfig, evaluate, train
from wsviz.training.tying import finetune_config
from wsviz.zoo import tying_section

ROOT = Path(__file__).resolve().parents[1]
TWIN = ROOT / "checkpoints" / "scale-sharesnet-unshared"
ORIGINAL_STEPS = FT_STEPS = 0  # set by main() from the checkpoint's card: original_steps(card, n) and 10% of it
SHORT_STEPS = 8  # the fixed short fine-tune of the ranking experiment
SHORT_LR = 0.003  # its rate: chosen on val when the ranking's scores were (bench run of 2026-11-30), then kept fixed
BUDGET_CURVE: tuple[float, ...] = (0.25, 0.5)  # --curve; shares of the original steps also tried (beside the 10% budget), to say what it takes
CALIBRATION = 512
LRS = (0.003, 0.01, 0.03)  # fine-tuning learning rates tried on val (seed 0, ShaResNet's rule, lstsq)
SCRATCH_LR = 0.1  # the original recipe's
INITS = ("medoid", "mean", "lstsq")
SINGLE = ("weight_similarity", "output_cka", "gradient_conflict", "measured_drop", "measured_loss", "measured_kl")
N_RANDOM = 2
AUGMENT = "none"  # the checkpoint's training augmentation, which fine-tuning keeps
VERIFY = 8  # the best-predicted sets choose_groups ties together and measures on val


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def halves(dataset: str = "mnist5k-scale", split: str = "test", data_root=None):
    """The test split cut in two halves by alternate index (stratified where it is class-sorted)."""
    te = load_split(dataset, split, data_root=data_root)
    return (te.images[0::2], te.labels[0::2]), (te.images[1::2], te.labels[1::2])


def load_plain(checkpoint):
    """(plain model, its card, train (images, labels) at its input shape, val half, test half, the
    card's training augmentation): what the tying benchmarks start from, for any checkpoint."""
    plain, card = load_checkpoint(Path(checkpoint))
    dataset = card["dataset"]
    tr = load_split(dataset, card.get("train_split", "train"))
    c, h, _ = input_shape(plain)
    val, test = ((fit_to(x, c, h), y) for x, y in halves(dataset, card.get("test_split", "test")))
    return (plain, card, (fit_to(tr.images, c, h), tr.labels), val, test,
            (card.get("train_config") or {}).get("augment", "none"))


def calibration_indices(n_train: int, seed: int) -> torch.Tensor:
    """The seed's calibration sample: ``CALIBRATION`` training indices in a fixed random order."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:CALIBRATION]


def budget_steps(original: int) -> int:
    """The issue's fine-tuning budget: 10% of the original training steps (at least one)."""
    return max(1, original // 10)


def run_arguments(ap) -> None:
    """The options every tying benchmark takes: seeds, fine-tuning steps, torch threads, output folder."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: 10%% of the original)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))


def write_results(out, stem: str, res: dict, lines: list[str]) -> None:
    """``res`` as ``out/stem.json`` and the report ``lines`` as ``out/stem.md`` (also printed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    md = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(md)
    print(md)


def original_steps(card: dict, n_train: int) -> int:
    """The optimiser steps the checkpoint was trained with: its epochs times the batches the training
    loop makes of ``n_train`` images (whole batches only, at least one; at most ``max_batches``)."""
    cfg = card.get("train_config") or {}
    epochs, bs = card.get("epochs_done") or cfg.get("epochs"), cfg.get("batch_size")
    if not epochs or not bs:
        raise SystemExit("the checkpoint's card does not say how it was trained (train_config epochs and batch_size); "
                         "the fine-tuning budget is a share of its training steps")
    per_epoch = max(1, n_train // int(bs))
    if cfg.get("max_batches"):  # epochs capped at --max-batches batches
        per_epoch = min(per_epoch, int(cfg["max_batches"]))
    return int(epochs) * per_epoch


def from_scratch(card: dict, tied, groups, seed: int):
    """The tied model's architecture with fresh weights: the registry's model of the card, built with
    its own initialisation and tied like ``tied``; a model the registry cannot build (an adopted one)
    gets every module's ``reset_parameters`` re-run instead."""
    torch.manual_seed(seed)
    try:
        model = create_model(card["model"], **card.get("config", {}))
    except WsvizError:  # not a registry model
        model = tie_free_copy(tied)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return model
    return apply_ties(model, [list(g) for g in groups])


def acc(model, data) -> float:
    return 100 * evaluate(model, *data)[1]


def correct(model, data) -> np.ndarray:
    """Per image of ``data``: does ``model`` classify it right (the unit the test's confidence intervals
    resample)."""
    return (evaluate(model, *data)[2] == data[1]).numpy()


def gap_interval(reference: list[np.ndarray], others: list[np.ndarray], level: float = 0.95, seed: int = 0) -> dict:
    """Percentage points by which the models of ``reference`` beat those of ``others`` on average (each a
    list of per-image correctness arrays on the same images: one model, or one per seed), and its
    ``level`` bootstrap interval (BCa, 9,999 resamples of the test images, every model's answers on an
    image kept together: the images are the independent units, the seeds are fixed).
    Returns {"gap", "low", "high"}.

    The statistic is a mean over images of one number per image (the reference models' share of right
    answers on it minus the others'), so resampling the images resamples that one array. scipy draws
    the resamples; the BCa correction (Efron & Tibshirani 1993, 14.3, as scipy's ``bootstrap`` computes
    it) takes its acceleration from the jackknife of a mean, which is closed-form: scipy's own jackknife
    re-evaluates the statistic on n leave-one-out samples, O(n^2) (about a minute for 10,000 images)."""
    from scipy.special import ndtr, ndtri
    from scipy.stats import bootstrap

    d = 100 * (np.mean([np.asarray(a, dtype=float) for a in reference], axis=0)
               - np.mean([np.asarray(a, dtype=float) for a in others], axis=0))
    theta, n = float(d.mean()), len(d)
    if np.all(d == d[0]):  # every image the same difference: nothing to resample
        return {"gap": theta, "low": theta, "high": theta}
    boot = bootstrap((d,), np.mean, vectorized=True, n_resamples=9_999, method="percentile",
                     random_state=np.random.default_rng(seed)).bootstrap_distribution
    z0 = ndtri(((boot < theta).sum() + (boot <= theta).sum()) / (2 * len(boot)))
    jack = (d.sum() - d) / (n - 1)  # the mean without image i
    u = (n - 1) * (jack.mean() - jack)
    accel = (u ** 3).sum() / n ** 3 / (6 * ((u ** 2).sum() / n ** 2) ** 1.5)
    z = ndtri(np.array([(1 - level) / 2, (1 + level) / 2]))
    low, high = np.percentile(boot, 100 * ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    return {"gap": theta, "low": float(low), "high": float(high)}


def finetune(model, train_data, val, steps: int, lr: float, seed: int, teacher=None):
    """At most ``steps`` SGD steps, in place; returns the model. With a ``teacher``, the recipe wsviz
    fine-tunes a tied model with (``finetune_config``; ``python -m wsviz.train --init-from UNTIED --tie ...
    --step-schedule --distill 4 --distill-weight 0.5 --feature-distill 3 --average-last 15``): a cosine
    annealed every step, half the loss from the untied model's predictions (T = 4) and half from the
    labels, the tied blocks' outputs pulled to the untied model's, the last 15 steps' weights averaged;
    a model with nothing tied (the untied control) gets it without the feature term, having no tied
    blocks to match. Without a teacher: the labels, a constant
    rate for one epoch (the ranking's short fine-tune, kept as it was when its scores were chosen; and
    from scratch, at the original recipe's rate). ``steps`` beyond one epoch run as whole epochs of
    equal length (``epochs * per_epoch <= steps``)."""
    cfg = finetune_settings(len(train_data[1]), steps, lr, seed, distill=teacher is not None)
    if teacher is not None and not (getattr(model, "wsviz_tie", None) or {}).get("groups"):
        cfg = dataclasses.replace(cfg, feature_distill=0.0)
    train(model, train_data, val, cfg, teacher=teacher)
    return model


def finetune_settings(n_train: int, steps: int, lr: float, seed: int = 0, distill: bool = True) -> TrainConfig:
    """The TrainConfig :func:`finetune` runs ``steps`` steps with on ``n_train`` training images: with
    ``distill``, wsviz's recipe (``finetune_config``), else a constant rate from the labels."""
    per_epoch = max(1, n_train // TrainConfig.batch_size)
    epochs = -(-steps // per_epoch)
    cap = steps // epochs
    if not distill:
        return TrainConfig(epochs=epochs, lr=lr, max_batches=cap, seed=seed, augment=AUGMENT)
    return finetune_config(epochs, lr, max_batches=cap, seed=seed, augment=AUGMENT)


def tied_model(model, groups, init, cal):
    return reestimate_batchnorm(tie(model, [list(g) for g in groups], init=init, images=cal), cal)


def saving(model, groups) -> int:
    return sum(group_saving(model, g) for g in groups)


def parser() -> argparse.ArgumentParser:
    """bench_tie's command line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--checkpoint", default=str(TWIN),
                    help="the trained plain model to tie (default: the shipped twin); its card names the dataset, e.g. "
                         "a CIFAR-10 ResNet trained with python -m wsviz.train --dataset cifar10")
    ap.add_argument("--data-root", default=None, help="where the card's dataset lives (torchvision's folder layout)")
    ap.add_argument("--rule", choices=["cifar", "imagenet"], default="cifar",
                    help="ShaResNet's rule to compare with: the authors' CIFAR rule (first block of a stage unshared) "
                         "or their ImageNet rule")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--only-tie", action="store_true",
                    help="run part 1 only (the rule tied and fine-tuned: the 0.5-point target), not the ranking and the "
                         "budgeted choice")
    ap.add_argument("--curve", type=float, nargs="*", default=[0.25, 0.5],
                    help="more shares of the original steps to fine-tune with, beside the 10%% budget (default 0.25 0.5)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03],
                    help="fine-tuning learning rates to choose from on val (default 0.003 0.01 0.03); widen the grid "
                         "when the best is at its edge")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the published runs)")
    ap.add_argument("--smoke", action="store_true", help="a few steps and groups, to check the script runs")
    ap.add_argument("--publish", action="store_true",
                    help="also write checkpoints/tying.json (the shipped twin) or checkpoints/tying-NAME.json (another "
                         "checkpoint), from which checkpoints/REPORT.md's sections are rendered")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.publish and args.only_tie and Path(args.checkpoint).resolve() == TWIN.resolve():
        ap.error("--publish with --only-tie would replace the shipped twin's full results (checkpoints/tying.json)")
    global FT_STEPS, SHORT_STEPS, LRS, N_RANDOM, ORIGINAL_STEPS, AUGMENT, BUDGET_CURVE
    torch.set_num_threads(args.threads)
    t_start = time.process_time()
    wall0 = time.time()
    ckpt = Path(args.checkpoint)
    plain, card = load_checkpoint(ckpt)
    dataset = card["dataset"]
    tr = load_split(dataset, card.get("train_split", "train"), data_root=args.data_root)
    c, h, _ = input_shape(plain)
    tr = type(tr)(fit_to(tr.images, c, h), tr.labels)  # model-ready floats, once (calibration feeds them as they are)
    train_data = (tr.images, tr.labels)
    val, test = ((fit_to(x, c, h), y) for x, y in halves(dataset, card.get("test_split", "test"), args.data_root))
    ORIGINAL_STEPS = original_steps(card, len(tr.labels))
    FT_STEPS = budget_steps(ORIGINAL_STEPS)  # the budget: at most 10% of the original steps
    AUGMENT = (card.get("train_config") or {}).get("augment", "none")
    BUDGET_CURVE, LRS = tuple(args.curve), tuple(args.lrs)
    rule = sharesnet_rule(plain, imagenet=args.rule == "imagenet")
    if args.smoke:
        FT_STEPS, SHORT_STEPS, LRS, N_RANDOM = 1, 1, (0.01,), 1
        BUDGET_CURVE = (0.005,)
    groups = candidate_groups(plain)
    if args.smoke:
        groups = groups[:3] + [g for g in rule if g not in groups[:3]]
    log(f"{ckpt.name} on {dataset}: {len(groups)} candidate groups; val {len(val[1])} / test {len(test[1])} images; "
        f"{ORIGINAL_STEPS} original steps, fine-tuning {FT_STEPS}")
    res = {"checkpoint": ckpt.name, "dataset": dataset, "only_tie": args.only_tie, "rule": args.rule, "rule_groups": [list(g) for g in rule],
           "seeds": args.seeds, "candidate_groups": [list(g) for g in groups], "ft_steps": FT_STEPS,
           "original_steps": ORIGINAL_STEPS, "short_steps": SHORT_STEPS, "calibration": CALIBRATION,
           "untied_full_test": 100 * card["test_accuracy"], "untied_val": acc(plain, val), "untied_test": acc(plain, test), "val_n": len(val[1]), "n_train": len(tr.labels),
           "params": {"untied": summarize(plain).unique_params}}

    # -- choose the fine-tuning learning rate on val (seed 0, ShaResNet's rule, lstsq) --------------
    cal0 = tr.images[calibration_indices(len(tr.labels), 0)]
    lr_val = {}
    for lr in LRS:
        m = finetune(tied_model(plain, rule, "lstsq", cal0), train_data, val, FT_STEPS, lr, 0, plain)
        lr_val[lr] = acc(m, val)
        log(f"lr {lr}: val {lr_val[lr]:.1f}")
    lr = max(LRS, key=lambda k: (lr_val[k], -k))
    res["lr_val"], res["lr"] = {str(k): v for k, v in lr_val.items()}, lr

    per_seed = []
    right = {"untied": correct(plain, test), "tied": [], "untied_ft": []}  # per test image, per seed
    for seed in args.seeds:
        s = {"seed": seed}
        cal_idx = calibration_indices(len(tr.labels), seed)
        cal, cal_y = tr.images[cal_idx], tr.labels[cal_idx]

        # 1. ShaResNet's rule ------------------------------------------------------------------
        s["after_tying"], s["after_ft"] = {}, {}
        for init in INITS:
            m = tied_model(plain, rule, init, cal)
            s["after_tying"][init] = acc(m, test)
            m = finetune(m, train_data, val, FT_STEPS, lr, seed, plain)
            s["after_ft"][init] = acc(m, test)
            if init == "lstsq":
                right["tied"].append(correct(m, test))
            log(f"seed {seed} {init}: tied {s['after_tying'][init]:.1f} -> fine-tuned {s['after_ft'][init]:.1f}")
        s["params_tied"] = summarize(m).unique_params
        scratch = from_scratch(card, m, rule, seed)
        s["params_scratch"] = summarize(scratch).unique_params
        s["scratch"] = acc(finetune(scratch, train_data, val, FT_STEPS, SCRATCH_LR, seed), test)
        untied_ft = finetune(reestimate_batchnorm(tie_free_copy(plain), cal), train_data, val, FT_STEPS, lr, seed, plain)
        s["untied_ft"] = acc(untied_ft, test)
        right["untied_ft"].append(correct(untied_ft, test))
        s["curve"] = {}  # more fine-tuning: what it takes to come within 0.5 points
        for share in BUDGET_CURVE:
            steps = max(1, int(ORIGINAL_STEPS * share))
            m = finetune(tied_model(plain, rule, "lstsq", cal), train_data, val, steps, lr, seed, plain)
            s["curve"][str(share)] = {"steps": steps, "tied": acc(m, test)}
            log(f"seed {seed}: {share:.0%} of the steps ({steps}): tied {s['curve'][str(share)]['tied']:.1f}")
        log(f"seed {seed}: scratch {s['scratch']:.1f}, untied fine-tuned {s['untied_ft']:.1f}")
        if args.only_tie:
            res.setdefault("per_seed", []).append(s)
            continue

        # 2. ranking ---------------------------------------------------------------------------
        # cross-fitted: the scores that are judged against the test half's drops are measured on val, and
        # those that choose the combined score's weights against val's drops are measured on the test half,
        # so a score and the drop it is judged against never share images (and their noise)
        rows = find_opportunities(plain, cal, cal_y, groups=groups, held_out=val).rows
        rows = sorted(rows, key=lambda r: groups.index(r.group))
        rows_t = find_opportunities(plain, cal, cal_y, groups=groups, held_out=test).rows
        rows_t = sorted(rows_t, key=lambda r: groups.index(r.group))
        base = finetune(reestimate_batchnorm(tie_free_copy(plain), cal), train_data, val, SHORT_STEPS, SHORT_LR, seed)
        base_val, base_test = acc(base, val), acc(base, test)
        drops_val, drops_test = [], []
        for g in groups:
            m = finetune(tied_model(plain, [g], "lstsq", cal), train_data, val, SHORT_STEPS, SHORT_LR, seed)
            drops_val.append(base_val - acc(m, val))
            drops_test.append(base_test - acc(m, test))
        log(f"seed {seed}: short fine-tune drops (test) {np.round(drops_test, 1).tolist()}")
        s["scores"] = {k: [getattr(r, k) for r in rows] for k in SINGLE}
        s["scores_on_test"] = {k: [getattr(r, k) for r in rows_t] for k in SINGLE}
        s["drops_val"], s["drops_test"] = drops_val, drops_test
        s["params_saved"] = [r.params_saved for r in rows]
        per_seed.append((s, rows, rows_t))
        res.setdefault("per_seed", []).append(s)

    # the 0.5-point target's gap with its uncertainty over test images: tied (lstsq, fine-tuned) below the
    # untied model as trained, and below the untied model fine-tuned the same way
    res["gap_ci"] = gap_interval([right["untied"]], right["tied"])
    res["control_ci"] = gap_interval(right["untied_ft"], right["tied"])
    if args.only_tie:
        return write(res, args, ckpt, t_start, wall0)

    # -- choose the combined score's weights on val: each score's rank weighted 0, 1 or 2 ---------
    grid = [dict(zip(SINGLE, w)) for w in itertools.product((0, 1, 2), repeat=len(SINGLE)) if any(w)]

    def val_rho(weights):
        return statistics.mean(spearmanr(predicted_costs(rows_t, weights), s["drops_val"])[0]
                               for s, _, rows_t in per_seed)

    best = max(grid, key=lambda w: (round(val_rho(w), 6), -sum(w.values())))
    res["weights_chosen_on_val"], res["weights_default"] = best, DEFAULT_WEIGHTS
    res["val_rho_chosen"], res["val_rho_default"] = val_rho(best), val_rho(DEFAULT_WEIGHTS)
    log(f"weights chosen on val {best} (val rho {val_rho(best):.3f}; library default {DEFAULT_WEIGHTS} "
        f"{val_rho(DEFAULT_WEIGHTS):.3f})")

    # -- ranking quality on the test half --------------------------------------------------------
    spans = [len(g) - 1 for g in groups]

    def costs_of(rows, scores):
        costs = {"combined (library default)": predicted_costs(rows),
                 "combined (chosen on val)": predicted_costs(rows, best),
                 "adjacent blocks": spans}
        costs.update({k: (COST_SIGN[k] * np.asarray(scores[k])).tolist() for k in SINGLE})
        return costs

    for s, rows, rows_t in per_seed:
        s["spearman_test"] = {k: float(spearmanr(v, s["drops_test"])[0])
                              for k, v in costs_of(rows, s["scores"]).items()}
        s["spearman_val"] = {k: float(spearmanr(v, s["drops_val"])[0])
                             for k, v in costs_of(rows_t, s["scores_on_test"]).items()}

    # 3. budgeted choice -------------------------------------------------------------------------
    budget = saving(plain, rule)
    for s, rows, _ in per_seed:
        seed = s["seed"]
        cal = tr.images[calibration_indices(len(tr.labels), seed)]
        # the library's choice: KL measured on val added up, the best sets tied together and measured on val
        choices = choose_groups(plain, rows, budget, cal, val, verify=VERIFY)
        s["budget_candidates"] = [{"groups": [list(g) for g in c.groups], "saving": c.params_saved,
                                   "predicted_kl_val": c.predicted, "measured_kl_val": c.measured_kl,
                                   "measured_drop_val": c.measured_drop} for c in choices]
        pick = choices[0].groups
        rng = np.random.default_rng(seed)
        randoms = []
        for _ in range(N_RANDOM):  # random groups added until they save as much as the rule
            order, chosen = rng.permutation(len(groups)), []
            for i in order:
                if all(not set(groups[i]) & set(groups[j]) for j in chosen):
                    chosen.append(int(i))
                if saving(plain, [groups[j] for j in chosen]) >= budget:
                    break
            randoms.append(chosen)
        s["budget"] = {}
        for name, chosen in [("wsviz", list(pick)), ("sharesnet rule", rule),
                             *[(f"random {k + 1}", [groups[i] for i in c]) for k, c in enumerate(randoms)]]:
            m = tied_model(plain, chosen, "lstsq", cal)
            a0 = acc(m, test)
            a1 = acc(finetune(m, train_data, val, FT_STEPS, lr, seed, plain), test)
            s["budget"][name] = {"groups": [list(g) for g in chosen], "saving": saving(plain, chosen),
                                 "after_tying": a0, "after_ft": a1, "drop_after_ft": s["untied_ft"] - a1}
            log(f"seed {seed} budget {name}: saves {saving(plain, chosen):,}, tied {a0:.1f}, fine-tuned {a1:.1f}")

    return write(res, args, ckpt, t_start, wall0)


def write(res: dict, args, ckpt: Path, t_start: float, wall0: float) -> None:
    res["scratch_lr"], res["verify"], res["singles"] = SCRATCH_LR, VERIFY, list(SINGLE)
    # the recipe as the fine-tunes of the 10% budget ran it (finetune_config's fields, the average capped by an epoch)
    cfg = finetune_settings(res["n_train"], res["ft_steps"], res["lr"])
    res["short_lr"], res["average_last"] = SHORT_LR, cfg.average_last
    res["recipe"] = {"distill": cfg.distill, "distill_weight": cfg.distill_weight, "feature_distill": cfg.feature_distill}
    res["cpu_seconds"], res["threads"] = time.process_time() - t_start, torch.get_num_threads()
    res["wall_seconds"] = time.time() - wall0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1)
    stem = f"tie-{ckpt.name}" if ckpt.resolve() != TWIN.resolve() else "tie-only" if args.only_tie else "tie"
    (out / f"{stem}.json").write_text(text)
    if not args.smoke and args.publish:  # REPORT.md's sections are rendered from these copies (wsviz.zoo.tying_results)
        (ROOT / "checkpoints" / ("tying.json" if stem == "tie" else f"tying-{ckpt.name}.json")).write_text(text)
    md = "\n".join(tying_section(res)) + "\n"
    (out / f"{stem}.md").write_text(md)
    print(md)


def tie_free_copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
