"""Which fine-tuning recipe brings a tied model closest to the untied one in 10% of the original steps?

A trained plain ResNet (default: the Fashion twin) is tied by ShaResNet's rule with the ``lstsq`` init
(``bench_tie.tied_model``: calibration sample of 512 training images per seed, BatchNorm re-estimated),
then fine-tuned by wsviz's recipe (``finetune_config``) with one or more of its settings changed
(``VARIANTS``; ``base`` is the recipe before it adopted ``kd+ce+feat3``), at ``bench_tie``'s budget and learning rate. Per variant and seed it keeps every
test image's answer, so each variant gets its gap to the untied model and its difference from
``base`` (the recipe as it is) with 95% paired BCa bootstrap intervals (``bench_tie.gap_interval``:
the images are the resampled units, the seeds are fixed), on the val half, the test half and, for a
checkpoint on which nothing was chosen, both together.

    python -m benchmarks.bench_tie_recipe [--checkpoint benchmarks/checkpoints/fashion-sharesnet-unshared]
        [--seeds 0 1 2] [--variants base T2 ...] [--lr 0.03] [--threads 2] [--tag screen]

How it was used (``results/tie-recipe-plan.md``, four plans, each written before its run): the variants
were screened on the first Fashion twin's **val** half and measured on all 10,000 test images of a twin
on which nothing had been chosen (``fashion-sharesnet-unshared-seed1``, then ``-seed2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_tie as B
from wsviz.analysis.opportunities import sharesnet_rule
from wsviz.training.checkpoint import load_checkpoint
from wsviz.training.loop import TrainConfig, train
from wsviz.training.tying import finetune_config

ROOT = Path(__file__).resolve().parents[1]
# changes to wsviz's recipe (distillation at T = 4 from the untied model, cosine per step, the last 15
# steps averaged, SGD momentum 0.9, weight decay 1e-4), as TrainConfig fields
VARIANTS: dict[str, dict] = {
    "base": {},
    "kd+ce": {"distill_weight": 0.5},  # half the loss from the labels
    "T2": {"distill": 2.0},
    "T1": {"distill": 1.0},
    "avg50": {"average_last": 50},  # half the fine-tune averaged
    "wd0": {"weight_decay": 0.0},
    "adam": {"optimizer": "adam", "lr": 1e-3},
    "lr0.05": {"lr": 0.05},
    "mom0.95": {"momentum": 0.95},
    "T2+ce": {"distill": 2.0, "distill_weight": 0.5},
    "T3": {"distill": 3.0},
    "T1.5": {"distill": 1.5},
    # gradual tying: each member starts as its own trained kernel, W + delta_m (delta_m = w_m - W, W the
    # lstsq kernel), and delta_m is faded out linearly over the first K steps (ramp_in); from step K on
    # the model is the tied one, which is what is kept
    "ramp50": {"ramp": 50},
    "ramp85": {"ramp": 85},
    # feature distillation (FitNets-style, Romero et al. 2015): besides the predictions, the output of every
    # block holding a tied conv is pulled towards the untied model's output of the same block, by the weight
    # times the mean over those blocks of ||student - teacher||^2 / ||teacher||^2
    # (wsviz.training.tying.feature_distillation; the result files name the field "feat")
    "feat1": {"feature_distill": 1.0},
    "feat3": {"feature_distill": 3.0},
    "feat10": {"feature_distill": 10.0},
    # the two changes that gained on both twins, together (results/tie-recipe-plan.md, fourth plan); adopted
    # by the plan on the third twin, so it is now wsviz's recipe (finetune_config)
    "kd+ce+feat3": {"distill_weight": 0.5, "feature_distill": 3.0},
}
# "base" is the recipe the four screens started from, so that their results reproduce: wsviz's recipe before
# it adopted kd+ce+feat3 (predictions only, no feature distillation)
SCREENED_FROM = {"distill_weight": 1.0, "feature_distill": 0.0}


def ramp_in(tied, plain, groups, steps: int):
    """Hooks that make every member of ``groups`` in ``tied`` apply W + (1 - a) delta_m, with delta_m its
    own kernel in ``plain`` minus the tied kernel W as it is now (fixed, never trained) and a = min(1,
    s / ``steps``) after s optimiser steps; returns (on_step for train(), remove()). A conv is linear in
    its weight, so the hook adds conv(x, (1 - a) delta_m) to the member's output."""
    import torch.nn.functional as F

    state = {"a": 0.0}
    hooks = []
    for group in groups:
        w = tied.get_submodule(group[0]).weight.detach().clone()
        for path in group:
            member, delta = tied.get_submodule(path), plain.get_submodule(path).weight.detach() - w

            def hook(mod, inputs, out, delta=delta):
                if state["a"] >= 1:
                    return out
                src = getattr(mod, "source", mod)
                return out + (1 - state["a"]) * F.conv2d(inputs[0], delta, None, mod.stride, mod.padding,
                                                         mod.dilation, src.groups)
            hooks.append(member.register_forward_hook(hook))
    count = {"s": 0}

    def on_step(epoch, step, loss):
        count["s"] += 1
        state["a"] = min(1.0, count["s"] / steps)

    def remove():
        for h in hooks:
            h.remove()
    return on_step, remove


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "benchmarks" / "checkpoints" / "fashion-sharesnet-unshared"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--lr", type=float, default=0.03, help="the recipe's rate (bench_tie chose 0.03 on the Fashion "
                                                           "twin's val half)")
    ap.add_argument("--scratch", nargs="*", default=[],
                    help="checkpoints of the tied (shared) architecture trained from scratch with the plain model's "
                         "own recipe and steps, one per seed: what the shared architecture reaches with 10x the budget")
    ap.add_argument("--tag", default="", help="appended to the result files' names")
    B.run_arguments(ap)
    args = ap.parse_args(argv)
    if "base" not in args.variants:
        args.variants.insert(0, "base")
    torch.set_num_threads(args.threads)
    t0, wall0 = time.process_time(), time.time()
    ckpt = Path(args.checkpoint)
    plain, card, train_data, val, test, augment = B.load_plain(ckpt)
    dataset, n_train = card["dataset"], len(train_data[1])
    per_epoch = max(1, n_train // TrainConfig.batch_size)
    original = B.original_steps(card, n_train)
    steps = args.steps or B.budget_steps(original)
    if steps > per_epoch:
        raise SystemExit(f"{steps} steps are more than one epoch ({per_epoch}): this benchmark fine-tunes within one")
    rule = sharesnet_rule(plain)
    res = {"checkpoint": ckpt.name, "dataset": dataset, "rule_groups": [list(g) for g in rule], "steps": steps,
           "original_steps": original, "lr": args.lr, "seeds": args.seeds, "variants": {v: VARIANTS[v] for v in args.variants},
           "untied": {"val": B.acc(plain, val), "test": B.acc(plain, test)}, "per_seed": []}
    ft = dataclasses.replace(finetune_config(1, args.lr, max_batches=steps, augment=augment), **SCREENED_FROM)
    for v in args.variants:  # refused before any fine-tuning
        ramp = VARIANTS[v].get("ramp", 0)
        if ramp > steps - VARIANTS[v].get("average_last", ft.average_last):
            raise SystemExit(f"{v}: the ramp of {ramp} steps must end before the "
                             f"{VARIANTS[v].get('average_last', ft.average_last)} averaged steps of {steps}")
    n_tied = sum(p.numel() for p in plain.parameters()) - B.saving(plain, rule)
    scratch_models = []
    for d in args.scratch:  # the shared architecture trained from scratch for all the original steps
        m, sc = load_checkpoint(d)
        if sum(p.numel() for p in m.parameters()) != n_tied:
            raise SystemExit(f"{d} has {sum(p.numel() for p in m.parameters()):,} parameters, the tied model "
                             f"{n_tied:,}: not the same shared architecture")
        scratch_models.append((Path(d).name, m, sc))
    right = {v: {"val": [], "test": []} for v in args.variants}
    for seed in args.seeds:
        cal = train_data[0][B.calibration_indices(n_train, seed)]
        tied = B.tied_model(plain, rule, "lstsq", cal)
        s = {"seed": seed, "tied_val": B.acc(tied, val)}
        for v in args.variants:
            m = B.tied_model(plain, rule, "lstsq", cal)
            change = dict(VARIANTS[v])
            ramp = change.pop("ramp", 0)
            cfg = dataclasses.replace(ft, seed=seed, **change)
            on_step, remove = ramp_in(m, plain, rule, ramp) if ramp else (None, None)
            train(m, train_data, val, cfg, teacher=plain, on_step=on_step)
            if remove:
                remove()
            for half, data in (("val", val), ("test", test)):
                answers = B.correct(m, data)
                right[v][half].append(answers)
                s[f"{v}_{half}"] = 100 * float(answers.mean())
            B.log(f"seed {seed} {v}: val {s[f'{v}_val']:.2f}")
        res["per_seed"].append(s)
    untied = {"val": B.correct(plain, val), "test": B.correct(plain, test)}
    untied["all"] = np.concatenate([untied["val"], untied["test"]])
    for v in args.variants:
        right[v]["all"] = [np.concatenate([a, b]) for a, b in zip(right[v]["val"], right[v]["test"])]
    scratch = {"val": [], "test": []}
    if scratch_models:
        res["scratch"] = []
        for name, m, sc in scratch_models:
            for half, data in (("val", val), ("test", test)):
                scratch[half].append(B.correct(m, data))
            res["scratch"].append({"checkpoint": name, "command": sc.get("command"),
                                   "val": 100 * float(scratch["val"][-1].mean()),
                                   "test": 100 * float(scratch["test"][-1].mean())})
        scratch["all"] = [np.concatenate([a, b]) for a, b in zip(scratch["val"], scratch["test"])]
        res["scratch_gap_to_untied"] = {h: B.gap_interval([untied[h]], scratch[h]) for h in ("val", "test", "all")}
        res["base_minus_scratch"] = {h: B.gap_interval(right["base"][h], scratch[h]) for h in ("val", "test", "all")}
    halves_ = ("val", "test", "all")
    res["mean"] = {v: {h: statistics.mean(s[f"{v}_{h}"] for s in res["per_seed"]) for h in ("val", "test")}
                   for v in args.variants}
    res["gap_to_untied"] = {v: {h: B.gap_interval([untied[h]], right[v][h]) for h in halves_} for v in args.variants}
    res["minus_base"] = {v: {h: B.gap_interval(right[v][h], right["base"][h]) for h in halves_}
                         for v in args.variants if v != "base"}
    res["cpu_seconds"], res["wall_seconds"] = time.process_time() - t0, time.time() - wall0
    stem = f"tie-recipe-{ckpt.name}{'-' + args.tag if args.tag else ''}"
    B.write_results(args.out, stem, res, report(res))
    # every model's answer on every test image (val half, then test half), to recompute any interval
    answers = {f"{v}_seed{seed}": a for v in args.variants for seed, a in zip(args.seeds, right[v]["all"])}
    answers["untied"] = untied["all"]
    answers.update({f"scratch_{i}": a for i, a in enumerate(scratch["all"])} if scratch_models else {})
    np.savez_compressed(Path(args.out) / f"{stem}-answers.npz", **answers)
    return res


def report(res: dict) -> list[str]:
    n = len(res["per_seed"])

    def sd(v, half):
        vals = [s[f"{v}_{half}"] for s in res["per_seed"]]
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals) if n > 1 else 0:.2f}"

    def ci(d):
        return f"{d['gap']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

    lines = [f"## Fine-tuning recipes for a tied model: {res['checkpoint']} tied by ShaResNet's rule (lstsq, {n} seeds)",
             "", f"Untied: val {res['untied']['val']:.2f}, test {res['untied']['test']:.2f}. Each variant: "
             f"{res['steps']} steps from lr {res['lr']} (unless it says otherwise), wsviz's recipe with the change named. "
             "Accuracy mean ± sd over seeds; intervals: 95% paired BCa bootstrap over the images, seeds fixed, "
             f"{len(res['variants'])} variants and {len(res['minus_base'])} comparisons with base, none corrected for "
             "multiplicity.", "",
             "| variant | change | val | test | untied minus variant, val | test | all 10,000 | variant minus base, val | test | all |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, change in res["variants"].items():
        gaps = res["gap_to_untied"][v]
        diff = res["minus_base"].get(v)
        lines.append(f"| {v} | {change or 'none'} | {sd(v, 'val')} | {sd(v, 'test')} | {ci(gaps['val'])} | "
                     f"{ci(gaps['test'])} | {ci(gaps['all'])} | " +
                     (" | ".join(ci(diff[h]) for h in ("val", "test", "all")) if diff else "– | – | –") + " |")
    if res.get("scratch"):
        sc = res["scratch"]
        lines += ["", f"**The shared architecture trained from scratch** with the plain model's own recipe and all its "
                  f"{res['original_steps']} steps, {len(sc)} seeds "
                  f"({', '.join(s['checkpoint'] for s in sc)}):",
                  "", "| | val | test | untied minus it, val | test | all | base recipe (10%) minus it, val | test | all |",
                  "|---|---|---|---|---|---|---|---|---|"]
        vals, tests = [s["val"] for s in sc], [s["test"] for s in sc]
        sdv = statistics.stdev(vals) if len(sc) > 1 else 0
        sdt = statistics.stdev(tests) if len(sc) > 1 else 0
        lines.append(f"| from scratch, 100% of the steps | {statistics.mean(vals):.2f} ± {sdv:.2f} | "
                     f"{statistics.mean(tests):.2f} ± {sdt:.2f} | " +
                     " | ".join(ci(res["scratch_gap_to_untied"][h]) for h in ("val", "test", "all")) + " | " +
                     " | ".join(ci(res["base_minus_scratch"][h]) for h in ("val", "test", "all")) + " |")
    lines += ["", "The 'all' columns are a fresh test only on a checkpoint where nothing was chosen (the second twin); "
              "on the first twin the recipe's lr was chosen on val and the variants are screened on val.",
              f"{res['cpu_seconds'] / 60:.1f} CPU min, {res['wall_seconds'] / 60:.1f} min wall."]
    return lines


if __name__ == "__main__":
    main()
