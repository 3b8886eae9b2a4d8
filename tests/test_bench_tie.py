"""bench_tie pointed at any checkpoint (issue 19, "on CIFAR-10 when a user points the recipe at
it"): the original steps, the rule and the from-scratch baseline come from the checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_tie import TWIN, from_scratch, gap_interval, original_steps  # noqa: E402
from wsviz.analysis.opportunities import sharesnet_rule  # noqa: E402
from wsviz.models import summarize  # noqa: E402
from wsviz.models.tie import tie  # noqa: E402
from wsviz.training.checkpoint import load_checkpoint  # noqa: E402


def test_original_steps_come_from_the_card():
    _, card = load_checkpoint(TWIN)
    assert original_steps(card, 4000) == 12 * 31  # 12 epochs of whole batches of 128
    assert original_steps({"epochs_done": 3, "train_config": {"batch_size": 100}}, 50_000) == 1500
    assert original_steps({"epochs_done": 2, "train_config": {"batch_size": 512}}, 100) == 2  # one short batch
    # epochs capped with --max-batches (the Fashion-MNIST twin: 10 epochs of 100 of its 468 batches)
    assert original_steps({"epochs_done": 10, "train_config": {"batch_size": 128, "max_batches": 100}}, 60_000) == 1000
    assert original_steps({"epochs_done": 10, "train_config": {"batch_size": 128, "max_batches": 500}}, 4000) == 310
    with pytest.raises(SystemExit, match="does not say how it was trained"):
        original_steps({}, 4000)


def test_from_scratch_is_the_tied_architecture_with_fresh_weights():
    plain, card = load_checkpoint(TWIN)
    rule = sharesnet_rule(plain)
    tied = tie(plain, rule, "mean")
    fresh = from_scratch(card, tied, rule, 0)
    assert summarize(fresh).unique_params == summarize(tied).unique_params == 223_610
    a, b = fresh.get_submodule("stages.1.1.conv2").weight, tied.get_submodule("stages.1.1.conv2").weight
    assert not torch.allclose(a, b)
    assert fresh.get_submodule("stages.1.2.conv2").weight is fresh.get_submodule("stages.1.1.conv2").weight
    assert torch.equal(from_scratch(card, tied, rule, 0).get_submodule("stages.0.0.conv1").weight,
                       fresh.get_submodule("stages.0.0.conv1").weight)  # the seed fixes it
    # a model the registry cannot build (an adopted one): its modules' own initialisation, re-run
    other = from_scratch({"model": "no-such-model"}, tied, rule, 1)
    assert summarize(other).unique_params == 223_610
    assert not torch.allclose(other.get_submodule("stages.1.1.conv2").weight, b)


def test_the_gap_interval_resamples_images_with_every_models_answers_together():
    """The 0.5-point target's uncertainty: tied models that agree with the untied one on all but a few
    of 5,000 images differ from it by little, however hard the images are; only a paired bootstrap
    (each image's answers resampled together) says so. Resampled apart, the same answers would give
    an interval about the width of the accuracy's own sampling error (±0.8 points at 90%)."""
    rng = np.random.default_rng(0)
    untied = rng.random(5000) < 0.9
    tied = []
    for k in range(3):  # each seed's tied model gets 10 + k of the untied model's right answers wrong
        t = untied.copy()
        t[np.flatnonzero(untied)[rng.choice(int(untied.sum()), 10 + k, replace=False)]] = False
        tied.append(t)
    ci = gap_interval([untied], tied)
    assert ci["gap"] == pytest.approx(100 * 11 / 5000)  # 0.22 points: the mean over seeds
    assert 0 < ci["low"] < ci["gap"] < ci["high"] < 0.5  # paired: tight, and all of it above 0
    # several references (the untied model fine-tuned per seed): their mean is the reference
    ci2 = gap_interval(tied, [untied])
    assert ci2["gap"] == pytest.approx(-ci["gap"]) and ci2["high"] < 0
    # models that disagree with it on many images (a tenth, flipped) get a wide interval
    noisy = [np.where(rng.random(5000) < 0.1, ~untied, untied) for _ in range(3)]
    wide = gap_interval([untied], noisy)
    assert wide["high"] - wide["low"] > 0.5 and wide["low"] < wide["gap"] < wide["high"]


@pytest.mark.parametrize("n, p_ref, p_other", [(300, 0.97, 0.8), (600, 0.6, 0.55), (451, 0.99, 0.99)])
def test_the_gap_interval_is_scipys_bca_of_the_per_image_differences(n, p_ref, p_other):
    """The closed-form jackknife gives scipy's BCa interval of the per-image differences exactly (scipy
    computes it the slow way; skewed cases included, where a wrong acceleration moves the ends)."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(n)
    ref = [rng.random(n) < p_ref]
    others = [rng.random(n) < p_other - 0.02 * k for k in range(3)]
    d = 100 * (ref[0].astype(float) - np.mean([o.astype(float) for o in others], axis=0))
    want = bootstrap((d,), np.mean, vectorized=True, n_resamples=9_999, method="BCa",
                     random_state=np.random.default_rng(0)).confidence_interval
    got = gap_interval(ref, others)
    assert got["gap"] == pytest.approx(d.mean())
    assert (got["low"], got["high"]) == (pytest.approx(want.low, abs=1e-9), pytest.approx(want.high, abs=1e-9))


@pytest.mark.parametrize("name, seed", [("fashion-sharesnet-unshared", 0), ("fashion-sharesnet-unshared-seed1", 1),
                                        ("fashion-sharesnet-unshared-seed2", 2)])
def test_the_fashion_mnist_twin_ships_with_its_training_recorded(name, seed):
    """The plain models behind REPORT.md's Fashion-MNIST tying section (seed 0) and the fresh check of
    lstsq-bn (seed 1, benchmarks/results/tie-init-confirmation-plan.md) and of the combined recipe (seed 2,
    results/tie-recipe-plan.md, fourth plan): the same architecture as the shipped twin, trained 10 epochs of 100 batches (1,000 steps, so its 10% budget is 100 steps)."""
    plain, card = load_checkpoint(ROOT / "benchmarks" / "checkpoints" / name)
    assert card["dataset"] == "fashion-mnist" and card["config"]["shared"] is False
    assert card["train_config"]["seed"] == seed
    first = load_checkpoint(ROOT / "benchmarks" / "checkpoints" / "fashion-sharesnet-unshared")[1]
    assert card["train_config"] == {**first["train_config"], "seed": seed} and card["config"] == first["config"]
    assert summarize(plain).unique_params == 271_994
    assert original_steps(card, 60_000) == 1000
    assert summarize(tie(plain, sharesnet_rule(plain), "mean")).unique_params == 223_610


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shared_architecture_from_scratch_ships_with_its_training_recorded(seed):
    """bench_tie_recipe's reference (results/tie-recipe-plan.md): the Fashion twin's command with
    shared=true, so the architecture the rule ties it into, trained from scratch for all 1,000 steps."""
    model, card = load_checkpoint(ROOT / "benchmarks" / "checkpoints" / f"fashion-sharesnet-shared-seed{seed}")
    twin = load_checkpoint(ROOT / "benchmarks" / "checkpoints" / "fashion-sharesnet-unshared")[1]
    assert card["config"] == {**twin["config"], "shared": True} and card["dataset"] == "fashion-mnist"
    assert card["train_config"] == {**twin["train_config"], "seed": seed}
    assert summarize(model).unique_params == 223_610 and original_steps(card, 60_000) == 1000


def test_the_init_comparison_runs_and_decides_on_val_only(tmp_path):
    """bench_tie_init end to end on the shipped mnist5k twin (1 fine-tuning step): both inits measured
    on both halves, lstsq-bn's difference on each half with its interval, and the verdict follows val."""
    from benchmarks import bench_tie_init as BI

    res = BI.main(["--checkpoint", str(TWIN), "--seeds", "0", "--steps", "1",
                   "--threads", "1", "--out", str(tmp_path)])
    assert (tmp_path / "tie-init-scale-sharesnet-unshared.json").is_file()
    s = res["per_seed"][0]
    assert set(s["lstsq"]) == set(s["lstsq-bn"]) == {"tied_val", "tied_test", "ft_val", "ft_test"}
    d = res["difference"]["val"]
    assert d["low"] <= d["gap"] <= d["high"]
    assert abs(d["gap"] - (s["lstsq-bn"]["ft_val"] - s["lstsq"]["ft_val"])) < 1e-6
    assert res["adopt"] == (d["gap"] >= BI.ADOPT)
    both = res["difference"]["all"]  # equal halves: the mean of the two halves' differences
    assert abs(both["gap"] - (d["gap"] + res["difference"]["test"]["gap"]) / 2) < 1e-6
    g = res["gap_to_untied"]["lstsq-bn"]["test"]
    assert abs(g["gap"] - (res["untied"]["test"] - s["lstsq-bn"]["ft_test"])) < 1e-6 and g["low"] <= g["gap"] <= g["high"]
    md = (tmp_path / "tie-init-scale-sharesnet-unshared.md").read_text()
    assert ("does not pass" in md) != res["adopt"]
    flipped = dict(res, adopt=not res["adopt"])
    assert ("does not pass" in "\n".join(BI.report(flipped))) == res["adopt"]


def test_gradual_tying_hooks_start_at_the_untied_model_and_end_at_the_tied_one():
    """bench_tie_recipe's ramp: after 0 of K steps every member applies its own trained kernel (the
    model computes the untied model's outputs), half-way it is between, after K steps the tied model
    alone, and removing the hooks changes nothing then."""
    from benchmarks.bench_tie_recipe import ramp_in

    plain, _ = load_checkpoint(TWIN)
    rule = sharesnet_rule(plain)
    tied = tie(plain, rule, "mean")  # BatchNorm left as trained: only the kernels differ
    x = torch.randn(16, 1, 28, 28)
    plain.eval(), tied.eval()
    with torch.no_grad():
        free, bare = plain(x), tied(x)
        on_step, remove = ramp_in(tied, plain, rule, 2)
        assert torch.allclose(tied(x), free, atol=1e-4)
        on_step(1, 1, 0.0)
        half = tied(x)
        assert not torch.allclose(half, free, atol=1e-2) and not torch.allclose(half, bare, atol=1e-2)
        on_step(1, 2, 0.0)
        assert torch.equal(tied(x), bare)
        remove()
        assert torch.equal(tied(x), bare)


def test_the_recipe_comparison_runs_with_its_from_scratch_reference(tmp_path, monkeypatch):
    """bench_tie_recipe end to end on the mnist5k twin (6 steps, one seed): each variant's gap to the
    untied model and difference from base with intervals on val, test and both; the shipped shared
    model (trained from scratch) as the reference; a ramp that would end inside the averaged steps
    and a reference of another architecture are refused."""
    from benchmarks import bench_tie_recipe as BR

    monkeypatch.setitem(BR.VARIANTS, "ramp3", {"ramp": 3, "average_last": 2})  # steps 4-6 averaged
    monkeypatch.setitem(BR.VARIANTS, "ramp5", {"ramp": 5, "average_last": 2})
    args = ["--checkpoint", str(TWIN), "--seeds", "0", "--steps", "6", "--threads", "1", "--out", str(tmp_path)]
    res = BR.main([*args, "--variants", "T2", "ramp3", "--scratch", str(ROOT / "checkpoints" / "scale-sharesnet")])
    assert list(res["variants"]) == ["base", "T2", "ramp3"]  # base is always measured
    for v in ("base", "T2", "ramp3"):
        for half in ("val", "test", "all"):
            g = res["gap_to_untied"][v][half]
            assert g["low"] <= g["gap"] <= g["high"]
    assert set(res["minus_base"]) == {"T2", "ramp3"}
    (sc,) = res["scratch"]
    assert sc["checkpoint"] == "scale-sharesnet" and 90 < sc["test"] < 100
    # the shared model trained from scratch is what it is on both halves: untied minus it, on all 1,000 images
    assert res["scratch_gap_to_untied"]["all"]["gap"] == pytest.approx(
        res["untied"]["val"] / 2 + res["untied"]["test"] / 2 - sc["val"] / 2 - sc["test"] / 2)
    assert "from scratch, 100% of the steps" in (tmp_path / "tie-recipe-scale-sharesnet-unshared.md").read_text()
    with pytest.raises(SystemExit, match="must end before the 2 averaged steps of 6"):
        BR.main([*args, "--variants", "ramp5"])
    with pytest.raises(SystemExit, match="not the same shared architecture"):
        BR.main([*args, "--variants", "T2", "--scratch", str(ROOT / "checkpoints" / "scale-resnet20")])


def test_the_results_record_the_recipe_the_fine_tunes_ran_with():
    """bench_tie's results (and REPORT.md's flags line) say the averaging the 10% fine-tune really used:
    finetune_config caps it at the fine-tune's epoch, so a short budget averages fewer than 15 steps."""
    from benchmarks import bench_tie as B
    from wsviz.training.tying import AVERAGE_LAST, DISTILL_TEMPERATURE, DISTILL_WEIGHT, FEATURE_DISTILL

    cfg = B.finetune_settings(4000, 37, 0.01)  # the mnist5k twin: 31 steps an epoch, so 2 epochs of 18
    assert (cfg.epochs, cfg.max_batches, cfg.average_last) == (2, 18, AVERAGE_LAST)
    assert (cfg.distill, cfg.distill_weight, cfg.feature_distill) == (DISTILL_TEMPERATURE, DISTILL_WEIGHT, FEATURE_DISTILL)
    short = B.finetune_settings(4000, 6, 0.01)
    assert (short.epochs, short.max_batches, short.average_last) == (1, 6, 6)
    plain = B.finetune_settings(4000, 6, 0.01, distill=False)
    assert (plain.distill, plain.average_last, plain.feature_distill) == (0, 0, 0)


def test_the_written_results_carry_the_averaging_of_their_own_budget(tmp_path):
    """write() records the recipe from the fine-tune's own settings: the published twin's results with a
    6-step budget say 6 steps averaged (not the recipe's constant 15), in the JSON and the flags line."""
    import argparse
    import json
    import time

    from benchmarks import bench_tie as B

    res = json.loads((ROOT / "checkpoints" / "tying.json").read_text())
    res.update(n_train=4000, ft_steps=6)
    args = argparse.Namespace(out=str(tmp_path), smoke=True, publish=False, only_tie=False)
    B.write(res, args, TWIN, time.process_time(), time.time())
    out = json.loads((tmp_path / "tie.json").read_text())
    assert out["average_last"] == 6 and out["recipe"]["feature_distill"] == 3.0
    assert "--average-last 6`" in (tmp_path / "tie.md").read_text()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fresh_mnist5k_twins_ship_with_their_training_recorded(seed):
    """bench_tie_twins' fresh twins (results/tie-mnist5k-twins-plan.md): the shipped twin's zoo command
    with training seed 1 or 2 (its architecture, 372 steps, the ShaResNet rule's 223,610 parameters).
    They are not the zoo's own seed 1 and 2 networks (the plan's amendment: retraining does not
    reproduce those bit for bit), so their accuracy is their own card's, recomputed here."""
    from wsviz.data.datasets import load_split
    from wsviz.training.loop import evaluate

    plain, card = load_checkpoint(ROOT / "benchmarks" / "checkpoints" / f"scale-sharesnet-unshared-seed{seed}")
    shipped = load_checkpoint(TWIN)[1]
    assert card["config"] == shipped["config"] and card["dataset"] == shipped["dataset"]
    keep = {k: v for k, v in card["train_config"].items() if k in shipped["train_config"]}
    assert keep == {**shipped["train_config"], "seed": seed}
    assert original_steps(card, 4000) == 372
    assert summarize(tie(plain, sharesnet_rule(plain), "mean")).unique_params == 223_610
    te = load_split(card["dataset"], "test", seed=card.get("data_seed", 0))
    with torch.no_grad():
        _, acc, _ = evaluate(plain, te.images, te.labels)
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-9)


def test_the_twins_benchmark_pools_fresh_twins_and_keeps_the_others_apart(tmp_path):
    """bench_tie_twins end to end (1 step, one seed; the shipped twin stands in for both kinds): the
    pooled gap is the mean of the twins' gaps over all test images, each with its interval, and a
    not-fresh twin is reported but never pooled."""
    from benchmarks import bench_tie_twins as BT

    res = BT.main(["--fresh", str(TWIN), str(TWIN), "--not-fresh", str(TWIN), "--seeds", "0", "--steps", "1",
                   "--threads", "1", "--out", str(tmp_path)])
    one, pool = res["per_twin"][0], res["pooled"]
    assert pool["images"] == 1000 and len(pool["twins"]) == 2 and len(res["not_fresh"]) == 1
    g = one["gap"]
    assert g["gap"] == pytest.approx(one["untied_acc"][0] - one["tied_acc"][0][0]) and g["low"] <= g["gap"] <= g["high"]
    assert pool["gap"]["gap"] == pytest.approx(statistics_mean(s["gap"]["gap"] for s in res["per_twin"]))
    md = (tmp_path / "tie-twins-scale-sharesnet-unshared.md").read_text()
    assert "(not fresh)" in md and "Pooled over the fresh twins" in md
    # the verdict follows the numbers
    shown = dict(res, pooled={**pool, "gap": {"gap": 0.2, "low": 0.1, "high": 0.4}})
    assert "target is shown" in "\n".join(BT.report(shown))
    missed = dict(res, pooled={**pool, "gap": {"gap": 1.2, "low": 0.6, "high": 1.9}})
    assert "NOT met and ruled out" in "\n".join(BT.report(missed))


def statistics_mean(values):
    import statistics

    return statistics.mean(values)
