"""Statistics a reviewer would accept, each checked against an independent implementation:
Wilson intervals (statsmodels), paired TOST equivalence (statsmodels' ttost_paired), a sign-flip
test clustered by image (brute-force enumeration), Holm (statsmodels)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import ttost_paired

from wsviz.analysis.stats import (
    bootstrap_accuracy_ci,
    clustered_sign_flip_test,
    equivalence_test,
    holm,
    mcnemar,
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
