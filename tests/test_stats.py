"""Paired significance tests, bootstrap intervals, Pareto fronts and the fair checkpoint comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsviz.analysis.stats import (
    DiffCI,
    FairRow,
    bootstrap_accuracy_ci,
    bootstrap_diff_ci,
    compare_predictions,
    fair_comparison,
    mcnemar,
    newcombe_paired_ci,
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


def test_pairwise_significance_decides_from_holm_not_the_single_test_p():
    """Six models, 15 pairs: m1 beats m0 at McNemar p = 0.011 alone, but not after Holm over the 15 tests,
    so the pair is not called significant and its sentence says so (the page ticks `.significant`, the CLI
    prints the sentence)."""
    labels = np.arange(1000) % 10
    base = labels.copy()
    base[:100] = (base[:100] + 1) % 10  # wrong on the first 100
    better = base.copy()
    better[:20] = labels[:20]  # right on 20 of those
    better[100:106] = (labels[100:106] + 1) % 10  # and wrong on 6 others
    rows = [_row("m0", base, labels), _row("m1", better, labels)] + [_row(f"m{k}", base.copy(), labels)
                                                                     for k in range(2, 6)]
    pairs = pairwise_significance(rows)
    assert len(pairs) == 15
    p = next(p for p in pairs if (p.i, p.j) == (0, 1))
    c = p.comparison
    assert c.mcnemar.p_value < 0.05 < p.p_holm
    assert not c.significant and "significantly" not in c.summary
    assert c.summary.endswith(f"McNemar p = {_fmt_p(c.mcnemar.p_value)} (chi2; only m0 right on 6, only m1 right on "
                              f"20 of 1000), Holm-adjusted over 15 tests p = {_fmt_p(p.p_holm)}: no significant "
                              "difference at 0.05 after Holm.")
    # the same pair alone is significant, and its sentence says it is one test, not adjusted
    single = compare_predictions(base, better, labels, ("m0", "m1"))
    assert single.significant and single.summary.endswith(
        "m1 is significantly more accurate than m0 at 0.05 (one test, not adjusted for multiple comparisons).")
    # a difference that survives Holm is called significant after Holm
    rows[1] = _row("m1", labels.copy(), labels)  # right on all 100 that m0 gets wrong
    top = next(p for p in pairwise_significance(rows) if (p.i, p.j) == (0, 1))
    assert top.p_holm < 0.05 and top.comparison.significant
    assert top.comparison.summary.endswith("m1 is significantly more accurate than m0 at 0.05 after Holm.")


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


# ================================================================ reference values and laws
# Each statistic against an independent implementation on the same inputs (statsmodels, scipy,
# brute force), and the laws the math must obey as hypothesis properties.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy import stats as sps  # noqa: E402
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar  # noqa: E402
from statsmodels.stats.multitest import multipletests  # noqa: E402

from wsviz.analysis.stats import _fmt_p, _holm, _model_fits  # noqa: E402

cells = st.integers(0, 45)


@settings(max_examples=150, deadline=None)
@given(n01=cells, n10=cells, n11=st.integers(0, 15), n00=st.integers(0, 15))
def test_mcnemar_matches_statsmodels(n01, n10, n11, n00):
    r = mcnemar(*paired(n01, n10, n11, n00))
    n = n01 + n10
    assert (r.n01, r.n10) == (n01, n10)
    if n == 0:
        assert (r.statistic, r.p_value, r.method) == (0.0, 1.0, "exact")
        return
    exact = n < 25
    assert r.method == ("exact" if exact else "chi2")
    if not exact and n01 == n10:
        # statsmodels' corrected statistic is (|0| - 1)^2 / n here; wsviz clips the correction at
        # zero (documented), so equal discordant counts give no evidence at all: p = 1
        assert (r.statistic, r.p_value) == (0.0, 1.0)
        return
    ref = sm_mcnemar([[n11, n01], [n10, n00]], exact=exact, correction=True)
    assert r.statistic == pytest.approx(ref.statistic, rel=1e-12, abs=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=80), st.randoms(use_true_random=False))
def test_mcnemar_is_symmetric_in_its_two_models(a, rnd):
    b = [rnd.random() < 0.5 for _ in a]
    ab, ba = mcnemar(a, b), mcnemar(b, a)
    assert (ab.n01, ab.n10) == (ba.n10, ba.n01)
    assert (ab.statistic, ab.p_value, ab.method) == (ba.statistic, ba.p_value, ba.method)


p_values = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=12)


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(5)
    cases = [rng.random(m) ** 3 for m in (1, 2, 3, 5, 8, 12)] + [
        [0.01, 0.01, 0.02], [0.0, 0.5, 1.0], [0.2, 0.2, 0.2, 0.2], [1e-12, 0.04, 0.03, 0.5]]
    for p in cases:  # (statsmodels is slow per call: a fixed set of vectors, ties and ends included)
        np.testing.assert_allclose(_holm(list(p)), multipletests(p, method="holm")[1], rtol=1e-12, atol=1e-300)


@settings(max_examples=300, deadline=None)
@given(p_values)
def test_holm_obeys_its_laws(p):
    adj = np.array(_holm(p))
    raw, m = np.array(p), len(p)
    assert (adj >= raw).all()  # never below the raw p-value
    assert (adj <= np.minimum(1.0, m * raw) * (1 + 1e-12)).all()  # never above Bonferroni's
    order = np.argsort(raw, kind="stable")
    assert (np.diff(adj[order]) >= 0).all()  # monotone in the raw p-values


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04); original order kept
    assert _holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert _holm([0.5, 0.6]) == [1.0, 1.0] and _holm([]) == []


def test_bootstrap_accuracy_ci_endpoints_are_the_binomial_quantiles():
    """Resampling n outcomes with replacement is exactly Binomial(n, acc): the percentile interval's
    endpoints are that distribution's quantiles (scipy), up to Monte Carlo error."""
    n, k, alpha = 400, 200, 0.4
    acc, lo, hi = bootstrap_accuracy_ci(np.arange(n) < k, n_boot=40_000, alpha=alpha, seed=1)
    assert acc == 0.5
    ref_lo, ref_hi = (sps.binom.ppf(q, n, 0.5) / n for q in (alpha / 2, 1 - alpha / 2))
    assert lo == pytest.approx(ref_lo, abs=1.01 / n) and hi == pytest.approx(ref_hi, abs=1.01 / n)


def test_bootstrap_diff_ci_matches_brute_force_index_resampling():
    a, b = paired(40, 20, n11=400, n00=40)
    n, alpha, reps = len(a), 0.4, 20_000
    rng = np.random.default_rng(123)
    diffs = np.empty(reps)
    for r in range(reps):  # the textbook paired bootstrap: resample sample indices, both models together
        idx = rng.integers(0, n, n)
        diffs[r] = a[idx].mean() - b[idx].mean()
    ref_lo, ref_hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    d = bootstrap_diff_ci(a, b, n_boot=reps, alpha=alpha, seed=7)
    assert d.diff == pytest.approx(20 / n) and d.alpha == alpha
    assert d.lo == pytest.approx(ref_lo, abs=0.0015) and d.hi == pytest.approx(ref_hi, abs=0.0015)


def test_paired_bootstrap_covers_the_true_difference_at_its_nominal_rate():
    """Simulated pairs with a known difference of accuracies: the 90% interval covers it ~90% of the time."""
    rng = np.random.default_rng(11)
    p01, p10, reps, hits = 0.08, 0.04, 300, 0  # true acc_a - acc_b = 0.04
    for r in range(reps):
        u = rng.random(400)
        a = (u < p01) | (u >= p01 + p10) & (u < 0.8)
        b = (u >= p01) & (u < p01 + p10) | (u >= p01 + p10) & (u < 0.8)
        d = bootstrap_diff_ci(a, b, n_boot=800, alpha=0.1, seed=r)
        assert d.lo <= d.diff <= d.hi
        hits += d.lo <= p01 - p10 <= d.hi
    assert 0.84 <= hits / reps <= 0.96


def test_bootstrap_arguments_at_their_limits():
    c = np.arange(100) < 70
    assert bootstrap_accuracy_ci(c, n_boot=1)[0] == 0.7  # one resample is allowed
    assert bootstrap_accuracy_ci(c) == bootstrap_accuracy_ci(c, n_boot=2000, alpha=0.05, seed=0)  # the defaults
    a, b = paired(30, 10, n11=60)
    assert bootstrap_diff_ci(a, b) == bootstrap_diff_ci(a, b, n_boot=2000, alpha=0.05, seed=0)
    for alpha in (0.0, 1.0):
        with pytest.raises(WsvizError, match=r"alpha must lie strictly between 0 and 1 \(0.05 for a 95% interval\)"):
            bootstrap_accuracy_ci(c, alpha=alpha)
    with pytest.raises(WsvizError, match=r"^n_boot must be a positive whole number \(2000 is usual\), got 2.5\.$"):
        bootstrap_diff_ci(a, b, n_boot=2.5)
    with pytest.raises(WsvizError, match="^Cannot bootstrap an accuracy difference over zero samples: evaluate on a "
                                         "non-empty test set.$"):
        bootstrap_diff_ci([], [])
    assert bootstrap_diff_ci([True], [False]) == DiffCI(1.0, 1.0, 1.0, 0.05)  # one sample is enough


def test_correctness_inputs_and_the_messages_for_wrong_ones():
    as_bool = mcnemar(*paired(7, 3, n11=20))
    ints = [np.asarray(v, dtype=int) for v in paired(7, 3, n11=20)]
    floats = [np.asarray(v, dtype=float) for v in paired(7, 3, n11=20)]
    assert mcnemar(*ints) == as_bool and mcnemar(*floats) == as_bool  # 0/1 values are correctness too
    assert bootstrap_accuracy_ci([1, 0, 1, 1]) == bootstrap_accuracy_ci([True, False, True, True])
    with pytest.raises(WsvizError, match=r"^correct_b must hold per-sample correctness \(True/False or 0/1\); got "
                                         r"other values\. Pass `predictions == labels`, not the predictions themselves\.$"):
        mcnemar([1, 0, 1], [1, 2, 0])
    with pytest.raises(WsvizError, match=r"^correct_a must hold per-sample correctness"):
        mcnemar(["yes", "no"], [True, False])
    with pytest.raises(WsvizError, match=r"^correct must hold per-sample correctness"):
        bootstrap_accuracy_ci([0.5, 1.0])
    with pytest.raises(WsvizError, match=r"^correct_a must be a 1-D sequence of per-sample correctness \(True/False\), "
                                         r"got shape \(2, 2\)\.$"):
        bootstrap_diff_ci([[True, False], [True, True]], [True, False])
    with pytest.raises(WsvizError, match=r"^correct_b must be a 1-D"):
        mcnemar([True, False], [[True, False]])
    with pytest.raises(WsvizError, match=r"^correct_a and correct_b have different lengths \(2 vs 1\): a paired "
                                         r"comparison needs both models' results on the same test samples, in the same "
                                         r"order\.$"):
        mcnemar([True, False], [True])
    with pytest.raises(WsvizError, match=r"^correct_a and correct_b have different lengths \(1 vs 2\)"):
        bootstrap_diff_ci([True], [True, False])
    with pytest.raises(WsvizError, match=r"^Cannot bootstrap an accuracy over zero samples: evaluate on a non-empty "
                                         r"test set\.$"):
        bootstrap_accuracy_ci(np.array([], dtype=bool))


def test_mcnemar_exact_statistic_and_p_value_stay_in_range():
    r = mcnemar(*paired(3, 3))
    assert (r.statistic, r.p_value, r.method) == (3.0, 1.0, "exact")  # p is clipped at 1, never above
    r = mcnemar(*paired(13, 12))  # 25 discordant: chi2, |13 - 12| - 1 = 0 -> statistic 0, p 1
    assert (r.statistic, r.p_value, r.method) == (0.0, 1.0, "chi2")


def test_compare_predictions_summary_in_full():
    labels = np.arange(1000) % 10
    a, b = labels.copy(), labels.copy()
    a[:20] = (a[:20] + 1) % 10
    b[20:100] = (b[20:100] + 1) % 10
    c = compare_predictions(a, b, labels, names=("shared", "unshared"), alpha=0.1)
    assert (c.n, c.alpha) == (1000, 0.1)
    assert c.diff_ci == newcombe_paired_ci(a == labels, b == labels, alpha=0.1)
    assert c.summary == (
        f"shared 98.0% vs unshared 92.0% (diff +6.0 pts, 90% CI [{100 * c.diff_ci.lo:+.1f}, {100 * c.diff_ci.hi:+.1f}]); "
        f"McNemar p = {c.mcnemar.p_value:.1e} (chi2; only shared right on 80, only unshared right on 20 of 1000): "
        "shared is significantly more accurate than unshared at 0.1 (one test, not adjusted for multiple comparisons).")
    assert 4.0 < 100 * c.diff_ci.lo < 6.0 < 100 * c.diff_ci.hi < 8.0
    # the other way round: the better model is named first in the verdict
    r = compare_predictions(b, a, labels, names=("unshared", "shared"))
    assert r.summary.endswith("shared is significantly more accurate than unshared at 0.05 (one test, not adjusted "
                              "for multiple comparisons).")
    # significance is p < alpha, strictly
    assert not compare_predictions(a, b, labels, alpha=c.mcnemar.p_value).significant
    # more than 2,000 samples: two decimals; up to 2,000: one
    big = np.arange(2001) % 10
    # (the interval does not collapse at 100%: Newcombe's, from two Wilson intervals)
    assert "A 100.00% vs B 100.00% (diff +0.00 pts, 95% CI [-0.19, +0.19])" in compare_predictions(big, big, big).summary
    two_k = np.arange(2000) % 10
    assert "A 100.0% vs B 100.0% (diff +0.0 pts, 95% CI [-0.2, +0.2])" in compare_predictions(two_k, two_k, two_k).summary
    assert _fmt_p(1e-3) == "0.001" and _fmt_p(0.05) == "0.05" and _fmt_p(9.9e-4) == "9.9e-04"


def test_compare_predictions_says_what_is_wrong_with_its_input():
    y = np.arange(10) % 3
    with pytest.raises(WsvizError, match=r"^pred_b and labels have different lengths \(9 vs 10\)"):
        compare_predictions(y, y[:9], y)
    with pytest.raises(WsvizError, match=r"^pred_a and labels have different lengths \(9 vs 10\)"):
        compare_predictions(y[:9], y, y)
    with pytest.raises(WsvizError, match=r"^Cannot compare models on zero samples: evaluate on a non-empty test set\.$"):
        compare_predictions([], [], [])
    with pytest.raises(WsvizError, match=r"^names must be two labels, one per model, got \['only'\]\.$"):
        compare_predictions(y, y, y, names=("only",))
    for args, what in (((y[None], y, y), "pred_a"), ((y, y[None], y), "pred_b"), ((y, y, y[None]), "labels")):
        with pytest.raises(WsvizError, match=rf"^{what} must be a 1-D sequence of class indices, got shape \(1, 10\)\.$"):
            compare_predictions(*args)


def test_pairwise_significance_passes_its_options_and_skips_other_test_sets():
    labels = np.arange(300) % 10
    good, bad = labels.copy(), labels.copy()
    bad[:50] = (bad[:50] + 1) % 10
    rows = [_row("good", good, labels), _row("elsewhere", good, labels, dataset="mnist5k-rot"),
            _row("bad", bad, labels), _row("also-bad", bad, labels)]
    pairs = pairwise_significance(rows, alpha=0.1)
    assert [(p.i, p.j) for p in pairs] == [(0, 2), (0, 3), (2, 3)]  # the row on another test set is skipped, not the rest
    assert all((p.dataset, p.data_seed) == ("mnist5k", 0) for p in pairs)
    ref = compare_predictions(good, bad, labels, ("good", "bad"), alpha=0.1)
    got = pairs[0].comparison
    # the same test and interval; the verdict and its sentence are Holm's over the 3 pairs, at alpha 0.1
    assert (got.mcnemar, got.diff_ci, got.alpha, got.acc_a, got.acc_b) == (ref.mcnemar, ref.diff_ci, 0.1, ref.acc_a,
                                                                        ref.acc_b) and ref.alpha == 0.1
    assert got.significant == (pairs[0].p_holm < 0.1) and got.summary.endswith(" at 0.1 after Holm.")
    assert f"Holm-adjusted over 3 tests p = {_fmt_p(pairs[0].p_holm)}" in got.summary


def test_pareto_front_skips_missing_values_wherever_they_are():
    nan = float("nan")
    rows = [{"unique_params": None, "accuracy": 1.0}, {"unique_params": nan, "accuracy": 1.0},
            {"unique_params": 10, "accuracy": nan}, {"unique_params": 5, "accuracy": None},
            {"unique_params": 100, "accuracy": 0.9}, {"unique_params": 200, "accuracy": 0.95},
            {"unique_params": 150, "accuracy": 0.8}]
    assert pareto_front(rows) == [4, 5]


def test_model_fits_names_every_mismatch():
    from torch import nn

    with pytest.raises(WsvizError) as info:
        _model_fits(nn.Linear(2, 2), "cifar100", "ck")  # a module without wsviz's config
    assert str(info.value) == ("The checkpoint ck (?) cannot be evaluated on cifar100: it takes None-channel images, "
                               "cifar100 has 3; it predicts None classes, cifar100 has 100. Compare it on its own "
                               "dataset (dataset=None) or pick checkpoints trained for that dataset.")


def test_fair_comparison_reads_the_cards_counts_seed_and_state(two_checkpoints, tmp_path):
    import json
    import shutil

    from wsviz.data.datasets import load_split
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.loop import evaluate

    root, cards = two_checkpoints
    for sub in ("x", "y"):
        shutil.copytree(root / "a", tmp_path / sub / "a")
    edited = tmp_path / "x" / "a" / "card.json"
    card = json.loads(edited.read_text())
    card.update(unique_params=123, effective_params=456, flops=789, complete=False, data_seed=1)
    edited.write_text(json.dumps(card))
    bare = tmp_path / "y" / "a" / "card.json"
    card = json.loads(bare.read_text())
    for key in ("unique_params", "effective_params", "flops", "complete"):
        card.pop(key, None)
    bare.write_text(json.dumps(card))
    rows = fair_comparison([tmp_path / "x" / "a", tmp_path / "y" / "a"])
    assert [r.name for r in rows] == ["x/a", "y/a"]  # same folder name: the parent tells them apart
    assert [r.path for r in rows] == [str(tmp_path / "x" / "a"), str(tmp_path / "y" / "a")]
    x, y = rows
    assert (x.unique_params, x.effective_params, x.flops, x.complete, x.data_seed) == (123, 456, 789, False, 1)
    assert (y.unique_params, y.effective_params, y.flops) == (  # counted afresh, as the training counted them
        cards[0]["unique_params"], cards[0]["effective_params"], cards[0]["flops"])
    assert (y.complete, y.data_seed) == (True, 0)
    # an explicit realisation: every checkpoint is evaluated on that one test set
    model, _ = load_checkpoint(root / "a")
    te = load_split("mnist5k-rot", "test", seed=1)
    _, acc, _ = evaluate(model, te.images, te.labels)
    row = fair_comparison([root / "a"], dataset="mnist5k-rot", data_seed=1)[0]
    assert (row.data_seed, row.accuracy) == (1, pytest.approx(acc))
    card = json.loads(bare.read_text())
    card.pop("dataset")
    bare.write_text(json.dumps(card))
    with pytest.raises(WsvizError, match=r"names no dataset; pass dataset=\.\.\. to say where to evaluate it\.$"):
        fair_comparison([tmp_path / "y" / "a"])


def test_fair_comparison_messages_in_full(tmp_path):
    with pytest.raises(WsvizError, match=r"^No checkpoints to compare: give at least one checkpoint folder\.$"):
        fair_comparison([])
    with pytest.raises(WsvizError, match=r"does not exist; give folders that hold card\.json and "
                                         r"weights\.safetensors \(as written by wsviz\.train\)\.$"):
        fair_comparison([tmp_path / "missing"])


def test_fair_comparison_reads_each_test_set_as_its_model_and_card_say(monkeypatch, tmp_path):
    """The calls fair_comparison makes, recorded with stand-ins for the checkpoint loader, the data and
    the evaluation loop: an image folder is read at the model's input size with the card's augment
    preset; a built-in dataset at its own size, plainly; one read per test set; every option passed on."""
    from pathlib import Path
    from types import SimpleNamespace

    import wsviz.analysis.streaming as streaming
    import wsviz.data.stream as stream
    import wsviz.training.checkpoint as checkpoint

    cards = {"f1": {"dataset": "folder:/imgs", "train_config": {"augment": "imagenet"}, "data_seed": 3},
             "f2": {"dataset": "folder:/imgs", "train_config": {"augment": "imagenet"}, "data_seed": 3},
             "m1": {"dataset": "mnist5k", "train_config": {"augment": "imagenet"}},
             "m2": {"dataset": "mnist5k", "train_config": None},
             "f3": {"dataset": "folder:/imgs"}}
    calls = {"load": [], "data": [], "predict": []}

    def load(folder, device="cpu"):
        calls["load"].append((Path(folder).name, device))
        model = SimpleNamespace(wsviz_config={"input_size": 40, "in_channels": 1, "num_classes": 10},
                                wsviz_name="stand-in")
        card = {"model": "m", "unique_params": 1, "effective_params": 2, "flops": 3, "float_params": 1}
        return model, card | cards[Path(folder).name]

    def data(name, split="test", *, size=None, augment="none", seed=0):
        calls["data"].append((name, split, size, augment, seed))
        return f"split {len(calls['data'])}"

    def predict(models, source, *, batch_size, workers, loader, cache, progress):
        (name,) = models
        calls["predict"].append((name, source, batch_size, workers, loader, cache, progress))
        labels = np.array([1, 1, 1]) if source == "split 1" else np.array([1, 1, 0])  # each test set its own
        return SimpleNamespace(predictions={(name, "identity"): np.array([1, 0, 1])}, labels=labels)

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    monkeypatch.setattr(stream, "eval_data", data)
    monkeypatch.setattr(streaming, "predict_variants", predict)
    for name in cards:
        (tmp_path / name).mkdir()
    rows = fair_comparison([tmp_path / n for n in cards], device="cuda:3")
    assert calls["load"] == [(n, "cuda:3") for n in cards]
    assert calls["data"] == [("folder:/imgs", "test", 40, "imagenet", 3),  # f1 and f2 share one read
                             ("mnist5k", "test", None, "none", 0),  # m1 and m2: the card's augment is for training
                             ("folder:/imgs", "test", 40, "none", 0)]  # f3: no train_config, plain letterbox
    assert [p[1:] for p in calls["predict"]] == [
        (s, 512, 0, "auto", None, None) for s in ("split 1", "split 1", "split 2", "split 2", "split 3")]
    assert [(r.name, r.dataset, r.data_seed, r.accuracy) for r in rows] == [
        (n, cards[n]["dataset"], 3 if n in ("f1", "f2") else 0, pytest.approx(2 / 3 if n in ("f1", "f2") else 1 / 3))
        for n in cards]
    assert rows[0].labels is rows[1].labels and rows[2].labels is rows[3].labels  # one array per test set
    assert [r.labels.tolist() for r in rows] == [[1, 1, 1]] * 2 + [[1, 1, 0]] * 3
    calls = {"load": [], "data": [], "predict": []}
    progress, cache = (lambda *a: None), object()
    rows = fair_comparison([tmp_path / "f1", tmp_path / "m1"], dataset="mnist5k", batch_size=7, workers=2,
                           loader="stream", cache=cache, progress=progress)
    assert calls["data"] == [("mnist5k", "test", None, "none", 0)]  # a dataset given: realisation 0, not the card's 3
    assert [p[2:] for p in calls["predict"]] == [(7, 2, "stream", cache, progress)] * 2
    with pytest.raises(WsvizError) as info:
        fair_comparison([tmp_path / "f1"], dataset="cifar100")
    assert str(info.value).startswith(f"The checkpoint {tmp_path / 'f1'} (stand-in) cannot be evaluated on cifar100: "
                                      "it takes 1-channel images, cifar100 has 3; it predicts 10 classes, cifar100 "
                                      "has 100.")


def test_bootstrap_defaults_are_2000_resamples_from_seed_0():
    """On 100,000 samples the interval's ends move with every extra resample and every other seed,
    so a call with the defaults must be the call with 2000 and 0 spelled out (and no other)."""
    c = np.arange(100_000) < 70_123
    d = np.roll(c, 20_000)
    assert bootstrap_accuracy_ci(c) == bootstrap_accuracy_ci(c, n_boot=2000, seed=0)
    assert bootstrap_diff_ci(c, d) == bootstrap_diff_ci(c, d, n_boot=2000, seed=0)
    for changed in ({"n_boot": 2001}, {"seed": 1}):  # the test can tell: these differ
        assert bootstrap_accuracy_ci(c) != bootstrap_accuracy_ci(c, **changed)
        assert bootstrap_diff_ci(c, d) != bootstrap_diff_ci(c, d, **changed)


def test_compare_predictions_prints_the_intervals_upper_end_at_one_hundred_percent():
    y = np.ones(10, dtype=int)
    c = compare_predictions(y, 0 * y, y)  # A right on all 10, B on none: the interval reaches +100 pts
    assert c.diff_ci.hi == 1.0
    assert c.summary.startswith(f"A 100.0% vs B 0.0% (diff +100.0 pts, 95% CI [{100 * c.diff_ci.lo:+.1f}, +100.0]); ")


def test_pareto_front_on_float_axes():
    rows = [{"flops": 2.5, "accuracy": 0.9}, {"flops": 1.5, "accuracy": 0.8}, {"flops": 3.0, "accuracy": 0.85}]
    assert pareto_front(rows, x="flops") == [1, 0]
