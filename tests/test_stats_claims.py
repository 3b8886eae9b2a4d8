"""Statistics a reviewer would accept, each checked against an independent implementation:
Wilson intervals (statsmodels), paired TOST equivalence (statsmodels' ttost_paired), a sign-flip
test clustered by image (brute-force enumeration), Holm (statsmodels)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW, ttost_ind, ttost_paired

from wsviz.analysis.stats import (
    ClusteredTest,
    Equivalence,
    FairRow,
    bootstrap_accuracy_ci,
    bootstrap_diff_ci,
    clustered_sign_flip_test,
    compare_over_seeds,
    equivalence_test,
    group_by_test_set,
    holm,
    mcnemar,
    newcombe_paired_ci,
    wilson_ci,
)
from wsviz.errors import WsvizError


@pytest.mark.parametrize("k,n", [(0, 1000), (1000, 1000), (957, 1000), (3, 20), (1, 1)])
def test_wilson_matches_statsmodels_and_never_collapses(k, n):
    correct = np.r_[np.ones(k, bool), np.zeros(n - k, bool)]
    acc, lo, hi = wilson_ci(correct)
    ref_lo, ref_hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert acc == k / n and lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12)
    assert lo < hi  # a percentile bootstrap gives [1, 1] at 1000/1000
    if k == n:
        assert bootstrap_accuracy_ci(correct)[1:] == (1.0, 1.0) and lo < 0.997


def test_equivalence_matches_statsmodels_ttost_paired():
    rng = np.random.default_rng(0)
    base = rng.random(1000) < 0.95
    flip = rng.random(1000) < 0.03
    other = np.where(flip, ~base, base)
    for margin in (0.005, 0.01, 0.03):
        res = equivalence_test(base, other, margin=margin)
        ref_p, _, _ = ttost_paired(base.astype(float), other.astype(float), -margin, margin)
        assert res.p_value == pytest.approx(ref_p, rel=1e-9)
        assert res.equivalent == (res.lo > -margin and res.hi < margin)  # TOST = the 90% CI inside ±margin
    assert equivalence_test(base, other, margin=0.05).verdict(False) == "equivalent within ±5 pt"
    assert equivalence_test(base, other, margin=0.001).verdict(False) == "inconclusive"
    worse = np.where(rng.random(1000) < 0.2, False, base)
    far = equivalence_test(base, worse, margin=0.01)
    assert not far.equivalent and far.verdict(mcnemar(base, worse).p_value < 0.05) == "different"
    same = equivalence_test(base, base, margin=0.01)
    assert same.equivalent and same.diff == 0.0
    with pytest.raises(WsvizError):
        equivalence_test(base, other, margin=0.0)


def _brute_sign_flip(d: np.ndarray) -> float:
    obs = abs(d.mean())
    hits = [abs((np.array(s) * d).mean()) >= obs - 1e-12 for s in itertools.product((-1, 1), repeat=len(d))]
    return float(np.mean(hits))


def test_clustered_test_is_the_sign_flip_over_clusters():
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(12), 8)  # 12 digits, each at 8 scales
    a = rng.random(96) < 0.9
    b = rng.random(96) < 0.7
    res = clustered_sign_flip_test(a, b, clusters)
    d = np.array([(a[clusters == j].astype(float) - b[clusters == j]).mean() for j in range(12)])
    assert res.method == "exact" and res.clusters == 12
    assert res.diff == pytest.approx(d.mean()) and res.p_value == pytest.approx(_brute_sign_flip(d), abs=1e-12)


def test_copies_of_one_image_are_not_independent_evidence():
    """A difference seen on 15 digits, each copied 8 times: pooled McNemar counts 120 pairs and
    finds it highly significant; clustered by digit, the evidence is that of the 15 digits."""
    clusters = np.repeat(np.arange(40), 8)
    per_digit_a = np.r_[np.ones(15, bool), np.ones(25, bool)]
    per_digit_b = np.r_[np.zeros(15, bool), np.ones(25, bool)]
    per_digit_b[20:25] = False
    per_digit_b[15:20] = True
    a, b = per_digit_a[clusters], per_digit_b[clusters]
    b[::8] = ~b[::8]  # some within-digit variation
    pooled = mcnemar(a, b).p_value
    clustered = clustered_sign_flip_test(a, b, clusters, n_resamples=20000).p_value
    assert pooled < 1e-6 and clustered > 100 * pooled


def test_holm_matches_statsmodels():
    p = [0.04, 0.046, 0.001, 0.3, 0.0015, 0.028, 0.7, 0.09]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-12)


# ------------------------------------------------ every argument checked, every field filled
# (written against the mutation run of issue 18: each assertion below failed for some planted bug)

TWO_ARGS = {  # the functions taking two correctness vectors, called with their other arguments at defaults
    "bootstrap_diff_ci": lambda a, b: bootstrap_diff_ci(a, b, n_boot=10),
    "equivalence_test": lambda a, b: equivalence_test(a, b),
    "newcombe_paired_ci": lambda a, b: newcombe_paired_ci(a, b),
    "clustered_sign_flip_test": lambda a, b: clustered_sign_flip_test(a, b, np.arange(len(a)) % 2),
}


@pytest.mark.parametrize("name", sorted(TWO_ARGS))
def test_paired_functions_name_the_argument_that_is_wrong(name):
    fn, good = TWO_ARGS[name], [True, False, True, True]
    with pytest.raises(WsvizError, match=r"^correct_a must hold per-sample correctness \(True/False or 0/1\)"):
        fn([0, 2, 1, 1], good)
    with pytest.raises(WsvizError, match=r"^correct_b must hold per-sample correctness \(True/False or 0/1\)"):
        fn(good, [0, 2, 1, 1])
    with pytest.raises(WsvizError, match=r"^correct_a and correct_b have different lengths \(4 vs 3\): a paired "):
        fn(good, good[:3])


def test_newcombe_interval_default_level_and_zero_samples():
    a, b = np.arange(50) < 40, np.arange(50) % 5 > 0
    assert newcombe_paired_ci(a, b) == newcombe_paired_ci(a, b, 0.05)
    with pytest.raises(WsvizError, match=r"^A difference over zero samples has no interval: evaluate on a non-empty "
                                         r"test set\.$"):
        newcombe_paired_ci([], [])


def test_correctness_must_be_numbers_not_objects_equal_to_them():
    from decimal import Decimal

    with pytest.raises(WsvizError, match=r"^correct must hold per-sample correctness"):
        wilson_ci(np.array([Decimal(1), Decimal(0)], dtype=object))


def test_wilson_interval_arguments_and_messages():
    with pytest.raises(WsvizError, match=r"^correct must hold per-sample correctness"):
        wilson_ci([0, 3])
    for alpha in (0.0, 1.0):
        with pytest.raises(WsvizError, match=r"^alpha must lie strictly between 0 and 1 \(0\.05 for a 95% interval\), "
                                             rf"got {alpha}\.$"):
            wilson_ci([True, False], alpha=alpha)
    with pytest.raises(WsvizError, match=r"^An accuracy over zero samples has no interval: evaluate on a non-empty "
                                         r"test set\.$"):
        wilson_ci([])
    acc, lo, hi = wilson_ci(np.arange(40) < 31, alpha=0.1)  # another level: statsmodels' 90% Wilson interval
    assert acc == 31 / 40 and (lo, hi) == pytest.approx(proportion_confint(31, 40, alpha=0.1, method="wilson"),
                                                       abs=1e-12)


def test_equivalence_arguments_fields_and_interval():
    a = np.r_[np.ones(30, bool), np.zeros(10, bool)]
    b = np.roll(a, 3)
    assert equivalence_test(a, b) == equivalence_test(a, b, margin=0.01, alpha=0.05)  # the defaults
    for margin in (0.0, 1.0):
        with pytest.raises(WsvizError, match=r"^margin must be a fraction between 0 and 1 \(0\.01 = one point\), "
                                             rf"got {margin}\.$"):
            equivalence_test(a, b, margin=margin)
    for alpha in (0.0, 0.5):
        with pytest.raises(WsvizError, match=rf"^alpha must lie strictly between 0 and 0\.5, got {alpha}\.$"):
            equivalence_test(a, b, alpha=alpha)
    with pytest.raises(WsvizError, match=r"^An equivalence test needs at least two paired samples\.$"):
        equivalence_test([True], [False])
    # two samples are enough: d = (1, 0), mean 0.5, sd sqrt(0.5), df 1 (ttost_paired by statsmodels)
    two = equivalence_test([True, False], [False, False], margin=0.6)
    assert two.p_value == pytest.approx(ttost_paired(np.array([1.0, 0.0]), np.zeros(2), -0.6, 0.6)[0], rel=1e-12)
    # b better by 5 of 40 and a better by 5 of 40: each one-sided test is the larger once; the interval is
    # the (1 - 2 alpha) t interval of the paired differences
    for x, y in ((a, np.r_[np.ones(35, bool), np.zeros(5, bool)]), (np.r_[np.ones(35, bool), np.zeros(5, bool)], a)):
        for alpha in (0.05, 0.1):
            r = equivalence_test(x, y, margin=0.2, alpha=alpha)
            d = x.astype(float) - y
            assert r.p_value == pytest.approx(ttost_paired(x.astype(float), y.astype(float), -0.2, 0.2)[0], rel=1e-9)
            assert (r.lo, r.hi) == pytest.approx(DescrStatsW(d).tconfint_mean(alpha=2 * alpha), rel=1e-12)
            assert (r.diff, r.margin, r.alpha) == (pytest.approx(d.mean()), 0.2, alpha)
    # every pair agrees exactly (sd 0): no t-test; decided by Newcombe's (1 - 2 alpha) paired interval inside
    # ±margin, so agreement on 40 samples is not equivalence within 2 points, and p is NaN (no t-test ran)
    same = equivalence_test(a, a, margin=0.02, alpha=0.1)
    ref = newcombe_paired_ci(a, a, alpha=0.2)
    assert isinstance(same, Equivalence) and (same.diff, same.lo, same.hi, same.method) == (0.0, ref.lo, ref.hi,
                                                                                            "Newcombe")
    assert np.isnan(same.p_value) and same.lo < -0.02 and not same.equivalent
    assert same.verdict(False) == "inconclusive"
    opposite = equivalence_test(np.zeros(5, bool), np.ones(5, bool), margin=0.5)
    assert opposite.diff == -1.0 and opposite.hi < -0.5 and not opposite.equivalent
    assert opposite.verdict(True) == "different" and opposite.verdict(False) == "inconclusive"
    # the reviewer's case: two samples that agree are not "equivalent within 1 pt" (p was 0)
    tiny = equivalence_test([True, False], [True, False])
    assert not tiny.equivalent and tiny.verdict(False) == "inconclusive"
    # many agreeing samples do show equivalence, by the interval
    many = equivalence_test(np.arange(2000) % 20 > 0, np.arange(2000) % 20 > 0, margin=0.01)
    assert many.equivalent and -0.01 < many.lo <= 0.0 <= many.hi < 0.01


def _sign_flip_exact(d: np.ndarray) -> float:
    """Every sign pattern at once (2^k rows): the share whose |mean| is at least the observed one."""
    signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
    return float(np.mean(np.abs((signs * d).mean(axis=1)) >= abs(d.mean()) - 1e-12))


def test_clustered_test_arguments_exact_limit_and_monte_carlo():
    with pytest.raises(WsvizError, match=r"^clusters must give one cluster id per sample \(4\), got shape \(3,\)\.$"):
        clustered_sign_flip_test([True] * 4, [False] * 4, [0, 1, 2])
    with pytest.raises(WsvizError, match=r"^A clustered test needs at least two clusters\.$"):
        clustered_sign_flip_test([True, False], [False, False], [7, 7])
    # two clusters are enough: differences (1, 0) -> signs give means 0.5 or -0.5 every time: p = 1
    assert clustered_sign_flip_test([True, False], [False, False], [0, 1]) == ClusteredTest(0.5, 1.0, 2, "exact")
    # no cluster differs: nothing to test
    assert clustered_sign_flip_test([True, False] * 3, [True, False] * 3, [0, 0, 1, 1, 2, 2]) == ClusteredTest(
        0.0, 1.0, 3, "exact")
    rng = np.random.default_rng(5)
    for k, method in ((16, "exact"), (17, "monte carlo")):
        clusters = np.repeat(np.arange(k), 4)
        a, b = rng.random(4 * k) < 0.8, rng.random(4 * k) < 0.6
        d = (a.astype(float) - b).reshape(k, 4).mean(axis=1)
        res = clustered_sign_flip_test(a, b, clusters)
        assert (res.method, res.clusters, res.diff) == (method, k, pytest.approx(d.mean(), abs=1e-15))
        if method == "exact":  # all 65,536 sign patterns, not a sample of them
            assert res.p_value == pytest.approx(_sign_flip_exact(d), abs=1e-12)
        else:  # 9,999 random sign patterns drawn from seed 0 (scipy's own Monte Carlo test)
            ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=9999,
                                       rng=np.random.default_rng(0)).pvalue
            assert res.p_value == ref and res.p_value != pytest.approx(_sign_flip_exact(d), abs=1e-9)
            assert res == clustered_sign_flip_test(a, b, clusters, n_resamples=9999, seed=0)  # the defaults
            other = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=500,
                                         rng=np.random.default_rng(3)).pvalue
            assert clustered_sign_flip_test(a, b, clusters, n_resamples=500, seed=3).p_value == other != ref


def test_seed_comparison_arguments_and_messages():
    message = (r"^A comparison over seeds needs at least two runs of each model, got {} and {}: train more seeds "
               r"\(python -m wsviz\.zoo retrain --seeds 1 2\)\.$")
    with pytest.raises(WsvizError, match=message.format(1, 2)):
        compare_over_seeds([0.9], [0.9, 0.8])
    with pytest.raises(WsvizError, match=message.format(2, 1)):
        compare_over_seeds([0.9, 0.8], [0.9])
    with pytest.raises(WsvizError, match=message.format(4, 2)):  # a table of runs, not one accuracy per seed
        compare_over_seeds([[0.9, 0.8], [0.9, 0.8]], [0.9, 0.8])
    with pytest.raises(WsvizError, match=message.format(2, 4)):
        compare_over_seeds([0.9, 0.8], [[0.9, 0.8], [0.9, 0.8]])
    for alpha in (0.0, 0.5):
        with pytest.raises(WsvizError, match=rf"^alpha must lie strictly between 0 and 0\.5, got {alpha}\.$"):
            compare_over_seeds([0.9, 0.8], [0.9, 0.8], alpha=alpha)
    for margin in (0.0, 1.0):
        with pytest.raises(WsvizError, match=r"^margin must be a fraction between 0 and 1 \(0\.01 = one point\), "
                                             rf"got {margin}\.$"):
            compare_over_seeds([0.9, 0.8], [0.9, 0.8], margin=margin)
    # accuracies read as text (a CSV column) are numbers all the same
    assert compare_over_seeds(["0.91", "0.93", "0.92"], ["0.9", "0.95"]) == compare_over_seeds([0.91, 0.93, 0.92],
                                                                                                [0.9, 0.95])


def test_seed_comparison_fields_and_both_one_sided_tests():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.95, 0.96]  # unequal sizes and spreads: Welch, not the pooled t-test
    for x, y in ((a, b), (b, a)):  # each one-sided test is the larger one once
        r = compare_over_seeds(x, y, margin=0.05, alpha=0.1)
        ref = sps.ttest_ind(x, y, equal_var=False)
        ci = ref.confidence_interval(0.9)
        assert (r.mean_a, r.sd_a, r.n_a) == (pytest.approx(np.mean(x)), pytest.approx(np.std(x, ddof=1)), len(x))
        assert (r.mean_b, r.sd_b, r.n_b) == (pytest.approx(np.mean(y)), pytest.approx(np.std(y, ddof=1)), len(y))
        assert (r.p_value, r.lo, r.hi) == (pytest.approx(ref.pvalue), pytest.approx(ci.low), pytest.approx(ci.high))
        assert (r.margin, r.alpha) == (0.05, 0.1)
        p_sm = ttost_ind(np.array(x), np.array(y), -0.05, 0.05, usevar="unequal")[0]
        assert r.equivalence_p == pytest.approx(p_sm, rel=1e-9)
    # one model without spread is still estimated (Welch copes with one zero variance)
    r = compare_over_seeds([0.5, 0.625, 0.875], [0.5, 0.5, 0.5])
    assert r.p_value == pytest.approx(sps.ttest_ind([0.5, 0.625, 0.875], [0.5, 0.5, 0.5], equal_var=False).pvalue)
    assert r.lo < r.diff < r.hi
    # no spread in either model: equal runs do not mean runs never vary, so nothing is tested (NaN, with why)
    r = compare_over_seeds([0.5, 0.5], [0.25, 0.25], margin=0.25)
    assert r.diff == 0.25 and all(np.isnan(x) for x in (r.lo, r.hi, r.p_value, r.equivalence_p))
    assert not r.testable and r.reason == "no spread between seeds"
    assert np.isnan(compare_over_seeds([0.5, 0.5], [0.25, 0.25], margin=0.3).equivalence_p)
    assert compare_over_seeds([0.5, 0.5], [0.25, 0.25]).equivalence_p is None
    assert compare_over_seeds([0.5, 0.625], [0.25, 0.25]).testable


@pytest.mark.parametrize("x,y", [(0.962, 0.961), (0.9, 0.9), (0.951, 0.95), (0.07, 0.03)])
def test_equal_seed_accuracies_are_not_tested_whatever_their_float_rounding(x, y):
    """Three equal accuracies k/1000 can have a float sd of ~1e-16 (0.962 does): the no-spread case must
    not slip through to scipy, which then calls 0.962 vs 0.961 different at p ~ 1e-27."""
    r = compare_over_seeds([x] * 3, [y] * 3, margin=0.01)
    assert not r.testable and np.isnan(r.p_value) and np.isnan(r.equivalence_p)
    assert np.isnan(r.lo) and np.isnan(r.hi) and r.diff == pytest.approx(x - y)


def test_holm_leaves_untested_p_values_out_of_the_family():
    nan = float("nan")
    got = holm([0.01, nan, 0.04])
    assert np.isnan(got[1]) and got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.04)
    assert holm([nan, nan]) == pytest.approx([nan, nan], nan_ok=True)


def _row(name: str, dataset: str, seed: int, labels) -> FairRow:
    return FairRow(name, name, "m", dataset, seed, 0.5, None, dataset, True, 1, 1, 1,
                   np.zeros(len(labels), dtype=int), np.asarray(labels))


def test_group_by_test_set_groups_rows_and_gives_each_skipped_pair_its_reason():
    rows = [_row("a", "mnist5k", 0, [0, 1]), _row("b", "mnist5k", 1, [0, 1]), _row("c", "mnist5k", 0, [0, 1]),
            _row("d", "folder:x", 0, [1, 1]), _row("e", "mnist5k", 0, [1, 0])]
    groups, skipped = group_by_test_set(rows)
    assert [(g.dataset, g.data_seed, g.rows) for g in groups] == [
        ("mnist5k", 0, (0, 2)), ("mnist5k", 1, (1,)), ("folder:x", 0, (3,)), ("mnist5k", 0, (4,))]
    assert groups[1].label == "mnist5k (realisation 1)"
    reasons = {(s.i, s.j): s.reason for s in skipped}
    assert sorted(reasons) == [(0, 1), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    assert reasons[(0, 1)] == ("different test sets: a on mnist5k (realisation 0), b on mnist5k (realisation 1); "
                               "evaluate both on one dataset (fair_comparison(dataset=...)) to compare them")
    assert reasons[(1, 3)] == ("different test sets: b on mnist5k (realisation 1), d on folder:x (realisation 0); "
                               "evaluate both on one dataset (fair_comparison(dataset=...)) to compare them")
    assert reasons[(2, 4)] == ("both name mnist5k (realisation 0) but their test labels differ (different data on "
                               "disk?)")
    assert group_by_test_set([]) == ([], [])
