"""Paired significance tests, bootstrap intervals, Pareto fronts and the fair checkpoint comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsviz.analysis.stats import (
    FairRow,
    bootstrap_accuracy_ci,
    bootstrap_diff_ci,
    compare_predictions,
    fair_comparison,
    mcnemar,
    pairwise_significance,
    pareto_front,
)
from wsviz.errors import WsvizError


def paired(n01: int, n10: int, n11: int = 0, n00: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors with the given cells: n01 a-only right, n10 b-only right, n11 both, n00 neither."""
    a = np.array([True] * n01 + [False] * n10 + [True] * n11 + [False] * n00)
    b = np.array([False] * n01 + [True] * n10 + [True] * n11 + [False] * n00)
    return a, b


# --------------------------------------------------------------------------------- McNemar
def test_mcnemar_identical_correctness_gives_p_exactly_one():
    rng = np.random.default_rng(1)
    c = rng.random(500) < 0.8
    r = mcnemar(c, c.copy())
    assert (r.n01, r.n10) == (0, 0)
    assert r.p_value == 1.0


def test_mcnemar_exact_cases_by_hand():
    r = mcnemar(*paired(10, 0, n11=50, n00=5))
    assert (r.n01, r.n10, r.method) == (10, 0, "exact")
    assert r.p_value == pytest.approx(2 * 0.5 ** 10, rel=1e-12)
    # 7 vs 3: p = 2 * P(X <= 3), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45 + 120) / 1024
    assert mcnemar(*paired(7, 3, n11=20)).p_value == pytest.approx(352 / 1024, rel=1e-12)
    # equal discordant counts: no evidence either way
    assert mcnemar(*paired(6, 6)).p_value == pytest.approx(1.0)


def test_mcnemar_large_case_matches_the_chi2_formula_by_hand():
    r = mcnemar(*paired(40, 20, n11=900, n00=40))
    stat = (abs(40 - 20) - 1) ** 2 / 60
    assert r.method == "chi2"
    assert r.statistic == pytest.approx(stat, rel=1e-12)
    # chi-square with 1 df: P(X > s) = erfc(sqrt(s / 2))
    assert r.p_value == pytest.approx(math.erfc(math.sqrt(stat / 2)), rel=1e-9)


def test_mcnemar_switches_to_chi2_at_25_discordant_pairs():
    assert mcnemar(*paired(14, 10)).method == "exact"
    assert mcnemar(*paired(15, 10)).method == "chi2"


def test_mcnemar_is_symmetric_in_a_and_b():
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.6
    ab, ba = mcnemar(a, b), mcnemar(b, a)
    assert (ab.n01, ab.n10) == (ba.n10, ba.n01)
    assert ab.p_value == ba.p_value and ab.statistic == ba.statistic


def test_mcnemar_refuses_mismatched_lengths_and_non_boolean_input():
    with pytest.raises(WsvizError, match="different lengths"):
        mcnemar([True, False], [True])
    with pytest.raises(WsvizError, match="correctness"):
        mcnemar([3, 7, 1], [3, 7, 2])  # predictions, not correctness


# ------------------------------------------------------------------------------- bootstrap
def test_bootstrap_accuracy_ci_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    true_acc, hits, reps = 0.85, 0, 300
    for r in range(reps):
        acc, lo, hi = bootstrap_accuracy_ci(rng.random(500) < true_acc, n_boot=1000, seed=r)
        assert lo <= acc <= hi
        hits += lo <= true_acc <= hi
    assert 0.89 <= hits / reps <= 0.99


def test_bootstrap_accuracy_ci_shrinks_as_one_over_sqrt_n():
    def width(n: int) -> float:
        c = np.arange(n) % 10 != 0  # exactly 90% correct
        acc, lo, hi = bootstrap_accuracy_ci(c, n_boot=4000)
        assert acc == pytest.approx(0.9)
        return hi - lo

    ratio = width(400) / width(6400)  # 16x the samples: 4x narrower
    assert 3.4 < ratio < 4.7
    # and close to the normal approximation 2 * 1.96 * sqrt(p(1-p)/n)
    assert width(6400) == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 6400), rel=0.1)


def test_bootstrap_is_reproducible_with_its_seed():
    c = np.random.default_rng(4).random(800) < 0.7
    assert bootstrap_accuracy_ci(c, seed=5) == bootstrap_accuracy_ci(c, seed=5)
    a, b = paired(30, 20, n11=700, n00=50)
    assert bootstrap_diff_ci(a, b, seed=5) == bootstrap_diff_ci(a, b, seed=5)
    assert bootstrap_diff_ci(a, b, seed=5) != bootstrap_diff_ci(a, b, seed=6)


def test_paired_diff_ci_of_a_model_against_itself_is_exactly_zero():
    c = np.random.default_rng(5).random(1000) < 0.9
    d = bootstrap_diff_ci(c, c)
    assert (d.diff, d.lo, d.hi) == (0.0, 0.0, 0.0)


def test_paired_diff_ci_is_paired():
    # a is right on 10 samples where b is wrong and never the other way round: the difference
    # cannot be negative in any resample, although both accuracies vary a lot on their own
    a, b = paired(10, 0, n11=600, n00=390)
    d = bootstrap_diff_ci(a, b)
    assert d.diff == pytest.approx(0.01)
    assert 0 < d.lo < d.diff < d.hi
    # width agrees with the paired normal approximation sqrt(p01 + p10 - (p01 - p10)^2 / n)
    a, b = paired(60, 30, n11=850, n00=60)
    d = bootstrap_diff_ci(a, b, n_boot=4000)
    se = math.sqrt((0.09 - 0.03 ** 2) / 1000)
    assert d.diff == pytest.approx(0.03)
    assert d.hi - d.lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_refuses_bad_arguments():
    with pytest.raises(WsvizError, match="different lengths"):
        bootstrap_diff_ci([True, False], [True])
    with pytest.raises(WsvizError, match="zero samples"):
        bootstrap_accuracy_ci([])
    with pytest.raises(WsvizError, match="alpha"):
        bootstrap_accuracy_ci([True, False], alpha=1.5)
    with pytest.raises(WsvizError, match="n_boot"):
        bootstrap_accuracy_ci([True, False], n_boot=0)


# -------------------------------------------------------------------- compare_predictions
def test_compare_predictions_summary_is_readable():
    labels = np.arange(1000) % 10
    a = labels.copy()
    b = labels.copy()
    a[:20] = (a[:20] + 1) % 10  # a wrong on 20
    b[20:33] = (b[20:33] + 1) % 10  # b wrong on 13 others
    c = compare_predictions(a, b, labels, names=("shared", "unshared"))
    assert c.acc_a == pytest.approx(0.98) and c.acc_b == pytest.approx(0.987)
    assert (c.mcnemar.n01, c.mcnemar.n10) == (13, 20)
    assert not c.significant
    assert "shared 98.0%" in c.summary and "unshared 98.7%" in c.summary
    assert "diff -0.7 pts" in c.summary and "95% CI" in c.summary
    assert f"p = {c.mcnemar.p_value:.2g}" in c.summary and "chi2" in c.summary
    assert "no significant difference at 0.05" in c.summary

    b[33:100] = (b[33:100] + 1) % 10  # now b is clearly worse
    c = compare_predictions(a, b, labels, names=("shared", "unshared"))
    assert c.significant and c.mcnemar.p_value < 1e-6
    assert "shared is significantly more accurate than unshared" in c.summary


def test_compare_predictions_refuses_mismatched_lengths():
    with pytest.raises(WsvizError, match="different lengths"):
        compare_predictions([1, 2, 3], [1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------- Pareto front
def test_pareto_front_on_a_constructed_example():
    rows = [
        {"name": "big", "unique_params": 1000, "accuracy": 0.99},
        {"name": "mid", "unique_params": 500, "accuracy": 0.97},
        {"name": "mid-worse", "unique_params": 600, "accuracy": 0.96},  # dominated by mid
        {"name": "tiny", "unique_params": 100, "accuracy": 0.90},
        {"name": "tiny-twin", "unique_params": 100, "accuracy": 0.90},  # a tie: both kept
        {"name": "tiny-worse", "unique_params": 100, "accuracy": 0.80},  # same size, less accurate
        {"name": "unknown", "unique_params": None, "accuracy": 1.0},  # cannot be placed
    ]
    assert pareto_front(rows) == [3, 4, 1, 0]  # by increasing size
    # any pair of fields: the most accurate model per FLOP budget
    flops = [{"flops": 10, "acc": 0.5}, {"flops": 20, "acc": 0.5}, {"flops": 30, "acc": 0.7}]
    assert pareto_front(flops, x="flops", y="acc") == [0, 2]
    assert pareto_front([]) == []


# ---------------------------------------------------------------------- fair comparison
def _row(name: str, preds: np.ndarray, labels: np.ndarray, dataset: str = "mnist5k") -> FairRow:
    return FairRow(name, name, "resnet_digits", dataset, 0, float((preds == labels).mean()), None, dataset, True,
                   1, 1, 1, preds, labels)


def test_pairwise_significance_pairs_only_rows_on_the_same_test_set_and_adjusts_p():
    labels = np.arange(200) % 10
    good, bad = labels.copy(), labels.copy()
    bad[:60] = (bad[:60] + 1) % 10
    rows = [_row("good", good, labels), _row("bad", bad, labels), _row("also-good", good, labels),
            _row("elsewhere", good, labels, dataset="mnist5k-rot")]
    pairs = pairwise_significance(rows)
    assert [(p.i, p.j) for p in pairs] == [(0, 1), (0, 2), (1, 2)]
    assert all(p.p_holm >= p.comparison.mcnemar.p_value for p in pairs)
    assert pairs[1].comparison.mcnemar.p_value == 1.0 and pairs[1].p_holm == 1.0
    # Holm: the smallest of m p-values is multiplied by m
    smallest = min(pairs, key=lambda p: p.comparison.mcnemar.p_value)
    assert smallest.p_holm == pytest.approx(min(1.0, 3 * smallest.comparison.mcnemar.p_value))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    from wsviz.training.loop import TrainConfig
    from wsviz.training.run import run_training

    root = tmp_path_factory.mktemp("ckpts")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=5)
    cards = [run_training("resnet_digits", "mnist5k", root / "a", cfg, overrides={"base_width": 8, "depth": 8}),
             run_training("resnet_digits", "mnist5k", root / "b", cfg, overrides={"base_width": 4, "depth": 8})]
    return root, cards


def test_fair_comparison_reevaluates_real_checkpoints(two_checkpoints):
    root, cards = two_checkpoints
    rows = fair_comparison([root / "a", str(root / "b")])
    assert [r.name for r in rows] == ["a", "b"]
    for row, card in zip(rows, cards):
        assert row.accuracy == pytest.approx(card["test_accuracy"], abs=1e-9)
        assert row.card_accuracy == card["test_accuracy"]
        assert (row.unique_params, row.effective_params, row.flops) == (
            card["unique_params"], card["effective_params"], card["flops"])
        assert (row.model, row.dataset, row.data_seed, row.complete) == ("resnet_digits", "mnist5k", 0, True)
        assert row.predictions.shape == (1000,)
        assert float((row.predictions == row.labels).mean()) == row.accuracy
    assert rows[0].unique_params > rows[1].unique_params  # base_width 8 vs 4

    pairs = pairwise_significance(rows)
    assert len(pairs) == 1
    c = pairs[0].comparison
    assert (pairs[0].i, pairs[0].j, c.name_a, c.name_b) == (0, 1, "a", "b")
    assert c.acc_a == rows[0].accuracy and c.acc_b == rows[1].accuracy
    assert "a " in c.summary and " b " in c.summary and "McNemar p =" in c.summary
    front = pareto_front(rows)
    assert 1 in front and (0 in front) == (rows[0].accuracy > rows[1].accuracy)


def test_fair_comparison_on_another_dataset_uses_one_common_test_set(two_checkpoints):
    root, _ = two_checkpoints
    rows = fair_comparison([root / "a", root / "b"], dataset="mnist5k-rot")
    assert all(r.dataset == "mnist5k-rot" and r.card_dataset == "mnist5k" and r.data_seed == 0 for r in rows)
    assert rows[0].labels is rows[1].labels  # the split was loaded once and shared
    assert len(pairwise_significance(rows)) == 1
    with pytest.raises(WsvizError, match=r"1-channel images, cifar10 has 3"):
        fair_comparison([root / "a"], dataset="cifar10")


def test_fair_comparison_says_what_is_wrong_with_its_input(tmp_path):
    with pytest.raises(WsvizError, match="No checkpoints"):
        fair_comparison([])
    with pytest.raises(WsvizError, match="does not exist"):
        fair_comparison([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(WsvizError, match="not a wsviz checkpoint"):
        fair_comparison([tmp_path / "empty"])
