"""Honest model comparisons: paired significance tests, bootstrap intervals, Pareto fronts.

Two models evaluated on the same test set make *paired* errors, so they are compared with
McNemar's test on the discordant samples and a paired bootstrap of the accuracy difference,
not by eyeballing two accuracies. :func:`fair_comparison` re-evaluates checkpoints on their
test split (rather than trusting the numbers in their cards) and keeps the predictions, so
every pair that saw the same test set can be tested with :func:`pairwise_significance`.

Bootstrap note: resampling n Bernoulli outcomes with replacement and counting the successes
is exactly a Binomial(n, acc) draw, and resampling n *pairs* is exactly a multinomial draw
over the four (a right?, b right?) cells. The bootstraps here draw those counts directly:
the same distribution as resampling an index matrix, in O(n_boot) time and memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as _sps

from wsviz.errors import WsvizError

EXACT_BELOW = 25  # discordant pairs below which McNemar uses the exact binomial test


# ------------------------------------------------------------------------------ validation
def _as_correct(x: Any, what: str) -> np.ndarray:
    """A 1-D boolean array from bools or 0/1 values; anything else is a user error."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise WsvizError(f"{what} must be a 1-D sequence of per-sample correctness (True/False), got shape {arr.shape}.")
    if arr.dtype == bool:
        return arr
    if arr.size and not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
        raise WsvizError(f"{what} must hold per-sample correctness (True/False or 0/1); got other values. "
                         "Pass `predictions == labels`, not the predictions themselves.")
    return arr.astype(bool)


def _as_labels(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise WsvizError(f"{what} must be a 1-D sequence of class indices, got shape {arr.shape}.")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if len(a) != len(b):
        raise WsvizError(f"{what} have different lengths ({len(a)} vs {len(b)}): a paired comparison needs "
                         "both models' results on the same test samples, in the same order.")


def _check_boot(n_boot: int, alpha: float) -> None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise WsvizError(f"n_boot must be a positive whole number (2000 is usual), got {n_boot!r}.")
    if not 0.0 < alpha < 1.0:
        raise WsvizError(f"alpha must lie strictly between 0 and 1 (0.05 for a 95% interval), got {alpha!r}.")


# -------------------------------------------------------------------------------- McNemar
@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired correctness: only samples where the two models disagree count."""

    n01: int  # a right, b wrong
    n10: int  # a wrong, b right
    statistic: float  # exact: min(n01, n10); chi2: continuity-corrected chi-square
    p_value: float
    method: str  # "exact" or "chi2"


def mcnemar(correct_a: Any, correct_b: Any) -> McNemarResult:
    """Two-sided McNemar test that models a and b have the same error rate on paired samples.

    Exact binomial test (p = 0.5) on the discordant pairs when there are fewer than
    ``EXACT_BELOW``, otherwise chi-square with continuity correction, df = 1. The correction
    is clipped at zero (``max(|n01 - n10| - 1, 0)``) so equal discordant counts give p = 1.
    """
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    _same_length(a, b, "correct_a and correct_b")
    n01 = int(np.count_nonzero(a & ~b))
    n10 = int(np.count_nonzero(~a & b))
    n = n01 + n10
    if n == 0:  # identical correctness: no evidence of any difference
        return McNemarResult(0, 0, 0.0, 1.0, "exact")
    if n < EXACT_BELOW:
        k = min(n01, n10)
        p = float(_sps.binomtest(k, n, 0.5, alternative="two-sided").pvalue)
        return McNemarResult(n01, n10, float(k), min(p, 1.0), "exact")
    stat = max(abs(n01 - n10) - 1, 0) ** 2 / n
    return McNemarResult(n01, n10, float(stat), float(_sps.chi2.sf(stat, df=1)), "chi2")


# ------------------------------------------------------------------------------ bootstrap
def _percentiles(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_accuracy_ci(correct: Any, n_boot: int = 2000, alpha: float = 0.05,
                          seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, lo, hi): percentile bootstrap interval at level 1 - alpha, reproducible by seed."""
    c = _as_correct(correct, "correct")
    _check_boot(n_boot, alpha)
    n = len(c)
    if n == 0:
        raise WsvizError("Cannot bootstrap an accuracy over zero samples: evaluate on a non-empty test set.")
    k = int(np.count_nonzero(c))
    acc = k / n
    rng = np.random.default_rng(seed)
    boots = rng.binomial(n, acc, size=n_boot) / n  # == mean of n samples drawn with replacement
    lo, hi = _percentiles(boots, alpha)
    return acc, lo, hi


@dataclass(frozen=True)
class DiffCI:
    """Accuracy difference a - b (fraction, not points) and its paired bootstrap interval."""

    diff: float
    lo: float
    hi: float
    alpha: float = 0.05


def bootstrap_diff_ci(correct_a: Any, correct_b: Any, n_boot: int = 2000, alpha: float = 0.05,
                      seed: int = 0) -> DiffCI:
    """Paired percentile bootstrap of acc_a - acc_b: both models are resampled on the same samples.

    Only the discordant cells move the difference, so a model against itself gives exactly
    [0, 0], and shared easy/hard samples do not widen the interval as an unpaired one would.
    """
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    _same_length(a, b, "correct_a and correct_b")
    _check_boot(n_boot, alpha)
    n = len(a)
    if n == 0:
        raise WsvizError("Cannot bootstrap an accuracy difference over zero samples: evaluate on a non-empty test set.")
    n01 = int(np.count_nonzero(a & ~b))
    n10 = int(np.count_nonzero(~a & b))
    diff = (n01 - n10) / n
    rng = np.random.default_rng(seed)
    # cells: a only right, b only right, both agree (right or wrong: they cancel in the difference)
    counts = rng.multinomial(n, [n01 / n, n10 / n, (n - n01 - n10) / n], size=n_boot)
    boots = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = _percentiles(boots, alpha)
    return DiffCI(diff, lo, hi, alpha)


# --------------------------------------------------------------------- comparing two models
@dataclass(frozen=True)
class Comparison:
    """Two models on the same test samples: accuracies, McNemar, paired CI, and one readable line."""

    name_a: str
    name_b: str
    n: int
    acc_a: float
    acc_b: float
    mcnemar: McNemarResult
    diff_ci: DiffCI
    alpha: float
    significant: bool  # McNemar p < alpha; from pairwise_significance: the Holm-adjusted p < alpha
    summary: str


def _pct_decimals(n: int) -> int:
    """1 decimal for up to ~2,000 samples (resolution 0.05 pts and coarser), 2 beyond."""
    return 1 if n <= 2000 else 2


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def compare_predictions(pred_a: Any, pred_b: Any, labels: Any, names: Sequence[str] = ("A", "B"), *,
                        alpha: float = 0.05) -> Comparison:
    """Compare two models' predictions on the same labelled samples: McNemar's test and Newcombe's
    paired score interval of the accuracy difference (proper at 0% and 100%, unlike a bootstrap)."""
    pa, pb, y = _as_labels(pred_a, "pred_a"), _as_labels(pred_b, "pred_b"), _as_labels(labels, "labels")
    _same_length(pa, y, "pred_a and labels")
    _same_length(pb, y, "pred_b and labels")
    if len(y) == 0:
        raise WsvizError("Cannot compare models on zero samples: evaluate on a non-empty test set.")
    if len(names) != 2:
        raise WsvizError(f"names must be two labels, one per model, got {list(names)!r}.")
    name_a, name_b = (str(s) for s in names)
    ca, cb = pa == y, pb == y
    n = len(y)
    acc_a, acc_b = float(ca.mean()), float(cb.mean())
    mc = mcnemar(ca, cb)
    ci = newcombe_paired_ci(ca, cb, alpha)
    significant = mc.p_value < alpha
    summary = _summary(name_a, name_b, n, acc_a, acc_b, mc, ci, alpha, significant, None)
    return Comparison(name_a, name_b, n, acc_a, acc_b, mc, ci, alpha, significant, summary)


def _summary(name_a: str, name_b: str, n: int, acc_a: float, acc_b: float, mc: McNemarResult, ci: DiffCI,
             alpha: float, significant: bool, holm_of: tuple[float, int] | None) -> str:
    """The readable line of a comparison. ``holm_of`` (Holm-adjusted p, number of tests) when the verdict is
    decided after Holm; None for a single test, which the line says is not adjusted."""
    d = _pct_decimals(n)
    level = f"{100 * (1 - alpha):g}%"
    after = " (one test, not adjusted for multiple comparisons)." if holm_of is None else " after Holm."
    if significant:
        better, worse = (name_a, name_b) if mc.n01 > mc.n10 else (name_b, name_a)
        verdict = f"{better} is significantly more accurate than {worse} at {alpha:g}{after}"
    else:
        verdict = f"no significant difference at {alpha:g}{after}"
    adjusted = "" if holm_of is None else (f", Holm-adjusted over {holm_of[1]} test{'s' if holm_of[1] != 1 else ''} "
                                           f"p = {_fmt_p(holm_of[0])}")
    return (f"{name_a} {100 * acc_a:.{d}f}% vs {name_b} {100 * acc_b:.{d}f}% "
            f"(diff {100 * ci.diff:+.{d}f} pts, {level} CI [{100 * ci.lo:+.{d}f}, {100 * ci.hi:+.{d}f}]); "
            f"McNemar p = {_fmt_p(mc.p_value)} ({mc.method}; only {name_a} right on {mc.n01}, "
            f"only {name_b} right on {mc.n10} of {n}){adjusted}: {verdict}")


# ------------------------------------------- intervals at the extremes, equivalence, clusters
def wilson_ci(correct: Any, alpha: float = 0.05) -> tuple[float, float, float]:
    """(accuracy, lo, hi): Wilson score interval (scipy's ``binomtest(...).proportion_ci``).

    Unlike a percentile bootstrap it does not collapse at 0% or 100% (1000/1000 correct gives
    [0.9962, 1], not [1, 1]).
    """
    c = _as_correct(correct, "correct")
    if not 0.0 < alpha < 1.0:
        raise WsvizError(f"alpha must lie strictly between 0 and 1 (0.05 for a 95% interval), got {alpha!r}.")
    if len(c) == 0:
        raise WsvizError("An accuracy over zero samples has no interval: evaluate on a non-empty test set.")
    k, n = int(np.count_nonzero(c)), len(c)
    ci = _sps.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return k / n, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests (TOST) that two models' accuracies differ by less than ``margin``."""

    diff: float  # accuracy of a minus accuracy of b (fraction)
    margin: float  # stated in advance, as a fraction (0.01 = 1 point)
    p_value: float  # the larger of the two one-sided p-values; NaN when no t-test applies (method "Newcombe")
    lo: float  # the (1 - 2 alpha) interval of the difference: equivalence iff it lies inside ±margin
    hi: float
    alpha: float
    method: str = "paired t"  # "paired t" (TOST), or "Newcombe" when every pair differs by the same amount

    @property
    def equivalent(self) -> bool:
        if self.method == "Newcombe":  # no t-test: the (1 - 2 alpha) interval decides, as TOST's does
            return -self.margin < self.lo and self.hi < self.margin
        return self.p_value < self.alpha

    def verdict(self, different: bool) -> str:
        """'equivalent within ±m pt', 'different' (given a significant difference test) or 'inconclusive'."""
        if self.equivalent:
            return f"equivalent within ±{100 * self.margin:g} pt"
        return "different" if different else "inconclusive"


def equivalence_test(correct_a: Any, correct_b: Any, margin: float = 0.01, alpha: float = 0.05) -> Equivalence:
    """Paired TOST on per-sample correctness: H0 |acc_a - acc_b| >= margin, rejected (equivalent) when
    both one-sided paired t-tests reject at ``alpha`` (the same as statsmodels' ``ttost_paired``).

    "No significant difference" is not "the same": only this test can say two models are equivalent,
    and only within a margin stated before looking.

    When every pair differs by the same amount (sd 0: most often the two models are right on exactly
    the same samples) the t statistic is undefined, and agreement on few samples is weak evidence (two
    agreeing samples are not equivalence within a point). Then no t-test is run (``p_value`` NaN,
    ``method`` "Newcombe") and the decision is TOST's in interval form: equivalent iff Newcombe's
    (1 - 2 alpha) paired score interval (:func:`newcombe_paired_ci`) lies inside ±margin.
    """
    a = _as_correct(correct_a, "correct_a").astype(float)
    b = _as_correct(correct_b, "correct_b").astype(float)
    _same_length(a, b, "correct_a and correct_b")
    if not 0.0 < margin < 1.0:
        raise WsvizError(f"margin must be a fraction between 0 and 1 (0.01 = one point), got {margin!r}.")
    if not 0.0 < alpha < 0.5:
        raise WsvizError(f"alpha must lie strictly between 0 and 0.5, got {alpha!r}.")
    d = a - b
    n = len(d)
    if n < 2:
        raise WsvizError("An equivalence test needs at least two paired samples.")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:  # no spread of the differences: no t-test; Newcombe's (1 - 2 alpha) interval decides
        ci = newcombe_paired_ci(a.astype(bool), b.astype(bool), 2 * alpha)
        return Equivalence(mean, margin, math.nan, ci.lo, ci.hi, alpha, "Newcombe")
    se = sd / math.sqrt(n)
    p_low = float(_sps.t.sf((mean + margin) / se, n - 1))  # H0: diff <= -margin
    p_high = float(_sps.t.cdf((mean - margin) / se, n - 1))  # H0: diff >= +margin
    half = float(_sps.t.ppf(1 - alpha, n - 1)) * se
    return Equivalence(mean, margin, max(p_low, p_high), mean - half, mean + half, alpha)


@dataclass(frozen=True)
class ClusteredTest:
    """A paired comparison whose samples come in clusters (rescaled copies of one image)."""

    diff: float  # mean over clusters of the within-cluster accuracy difference a - b
    p_value: float  # two-sided sign-flip permutation test over clusters
    clusters: int
    method: str  # "exact" (every sign pattern) or "monte carlo"


def clustered_sign_flip_test(correct_a: Any, correct_b: Any, clusters: Any, n_resamples: int = 9999,
                             seed: int = 0) -> ClusteredTest:
    """Two-sided test that a and b are equally accurate when samples are dependent within clusters.

    The unit of independence is the cluster (e.g. one test digit seen at 8 scales): each cluster's
    accuracy difference is one observation, and under H0 its sign is arbitrary, so the test flips
    the signs of the cluster differences (scipy's ``permutation_test``, exact for few clusters).
    Pooling the copies as independent pairs would overstate the evidence.
    """
    a = _as_correct(correct_a, "correct_a").astype(float)
    b = _as_correct(correct_b, "correct_b").astype(float)
    _same_length(a, b, "correct_a and correct_b")
    g = np.asarray(clusters)
    if g.shape != a.shape:
        raise WsvizError(f"clusters must give one cluster id per sample ({len(a)}), got shape {g.shape}.")
    ids, inverse = np.unique(g, return_inverse=True)
    if len(ids) < 2:
        raise WsvizError("A clustered test needs at least two clusters.")
    d = np.bincount(inverse, weights=a - b) / np.bincount(inverse)
    if not d.any():
        return ClusteredTest(0.0, 1.0, len(ids), "exact")
    exact = len(ids) <= 16
    res = _sps.permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided",
                                n_resamples=np.inf if exact else n_resamples, rng=np.random.default_rng(seed))
    return ClusteredTest(float(d.mean()), float(min(1.0, res.pvalue)), len(ids), "exact" if exact else "monte carlo")


def newcombe_paired_ci(correct_a: Any, correct_b: Any, alpha: float = 0.05) -> DiffCI:
    """Newcombe's score interval for the difference of two paired accuracies (his method 10, 1998).

    Built from the two Wilson intervals and the correlation of the pairs; unlike a percentile
    bootstrap it stays a proper interval at 0% and 100% (two models right on every sample give
    a diff of 0 inside an interval of non-zero width).
    """
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    _same_length(a, b, "correct_a and correct_b")
    if len(a) == 0:
        raise WsvizError("A difference over zero samples has no interval: evaluate on a non-empty test set.")
    n = len(a)
    both = int(np.count_nonzero(a & b))
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    neither = n - both - only_a - only_b
    p1, l1, u1 = wilson_ci(a, alpha)
    p2, l2, u2 = wilson_ci(b, alpha)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    if margins == 0:
        phi = 0.0
    else:
        num = both * neither - only_a * only_b
        # Newcombe's continuity correction of the correlation, applied when it is positive
        num = max(num - n / 2, 0.0) if num > 0 else num
        phi = num / math.sqrt(margins)
    d = p1 - p2
    lo = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return DiffCI(d, max(lo, -1.0), min(hi, 1.0), alpha)


@dataclass(frozen=True)
class SeedComparison:
    """Two architectures compared over independently trained runs (one accuracy per training seed).

    The unit is the training run, so this tests the architectures on the test set the runs were scored
    on, not two trained networks; when every run is scored on the same test images, test-set sampling
    is not in the interval. ``p_value``: Welch's two-sided t-test; ``equivalence_p``: two one-sided
    Welch tests within ``margin`` (None when no margin was given).

    Not ``testable`` (``reason`` says why) when neither model's accuracies vary between seeds: a few
    equal runs do not show that runs never vary, so p, interval and equivalence p are NaN.
    """

    mean_a: float
    sd_a: float
    n_a: int
    mean_b: float
    sd_b: float
    n_b: int
    diff: float
    lo: float  # (1 - alpha) Welch interval of the difference of means
    hi: float
    p_value: float
    margin: float | None
    equivalence_p: float | None
    alpha: float
    df: float = math.nan  # Welch-Satterthwaite degrees of freedom
    reason: str = ""  # why nothing was tested ("" when tested)

    @property
    def testable(self) -> bool:
        return not self.reason


NO_SPREAD = 1e-9  # accuracies (fractions) closer than this are equal: 0.962 three times has a float sd of 1e-16


def compare_over_seeds(acc_a: Sequence[float], acc_b: Sequence[float], margin: float | None = None,
                       alpha: float = 0.05) -> SeedComparison:
    """Welch's t-test (scipy) on per-seed accuracies, its interval, and with ``margin`` the TOST
    equivalence test (both one-sided Welch tests, as statsmodels' ``ttost_ind(usevar='unequal')``).

    When neither model's accuracies spread (range under ``NO_SPREAD``) nothing is tested: p, interval
    and equivalence p are NaN and ``reason`` is "no spread between seeds" (exact float equality would
    miss equal accuracies with a 1e-16 float sd and let scipy return p ~ 1e-27)."""
    a = np.asarray(acc_a, dtype=float)
    b = np.asarray(acc_b, dtype=float)
    if a.ndim != 1 or b.ndim != 1 or len(a) < 2 or len(b) < 2:
        raise WsvizError(f"A comparison over seeds needs at least two runs of each model, got {a.size} and {b.size}: "
                         "train more seeds (python -m wsviz.zoo retrain --seeds 1 2).")
    if not 0.0 < alpha < 0.5:
        raise WsvizError(f"alpha must lie strictly between 0 and 0.5, got {alpha!r}.")
    if margin is not None and not 0.0 < margin < 1.0:
        raise WsvizError(f"margin must be a fraction between 0 and 1 (0.01 = one point), got {margin!r}.")
    d = float(a.mean() - b.mean())
    sd_a, sd_b = float(a.std(ddof=1)), float(b.std(ddof=1))
    if np.ptp(a) < NO_SPREAD and np.ptp(b) < NO_SPREAD:  # equal runs: no estimate of the run-to-run spread
        nan = math.nan
        return SeedComparison(float(a.mean()), 0.0, len(a), float(b.mean()), 0.0, len(b), d, nan, nan, nan, margin,
                              None if margin is None else nan, alpha, nan, "no spread between seeds")
    res = _sps.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(1 - alpha)
    p, lo, hi = float(res.pvalue), float(ci.low), float(ci.high)
    eq = None
    if margin is not None:
        p_low = _sps.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
        p_high = _sps.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
        eq = float(max(p_low, p_high))
    return SeedComparison(float(a.mean()), sd_a, len(a), float(b.mean()), sd_b, len(b), d, lo, hi, p, margin, eq,
                          alpha, float(res.df))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values: family-wise error over every test given, in their order.
    A NaN (a test that could not be run) stays NaN and is not counted in the family."""
    return _holm(list(p_values))


# ------------------------------------------------------------------------ fair comparison
@dataclass
class FairRow:
    """One checkpoint re-evaluated on a test split; accounting as recorded in its card."""

    name: str  # folder name (parent/name where two folders share a name)
    path: str
    model: str
    dataset: str  # the dataset it was evaluated on
    data_seed: int
    accuracy: float  # re-evaluated, not read from the card
    card_accuracy: float | None  # what the card claims (on the card's own dataset)
    card_dataset: str
    complete: bool  # False while training is still running or was cut short
    unique_params: int | None
    effective_params: int | None
    flops: int | None
    predictions: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    float_params: int | None = None  # the papers' count: f-RepeatNet's sign masks are bits, not parameters
    split_images: int | None = None  # the whole test split's size (len(labels) fewer under a limit)


@dataclass(frozen=True)
class PairSignificance:
    """One pair of :class:`FairRow` (by index) tested on their common test set."""

    i: int
    j: int
    dataset: str
    data_seed: int
    comparison: Comparison
    p_holm: float  # McNemar p, Holm-adjusted over every pair returned by the same call


def _model_fits(model: Any, dataset: str, folder: Path) -> None:
    from wsviz.data.datasets import dataset_info

    info = dataset_info(dataset)
    cfg = getattr(model, "wsviz_config", {})
    problems = []
    if cfg.get("in_channels") != info.channels:
        problems.append(f"it takes {cfg.get('in_channels')}-channel images, {dataset} has {info.channels}")
    if cfg.get("num_classes") != info.num_classes:
        problems.append(f"it predicts {cfg.get('num_classes')} classes, {dataset} has {info.num_classes}")
    if problems:
        raise WsvizError(f"The checkpoint {folder} ({getattr(model, 'wsviz_name', '?')}) cannot be evaluated on "
                         f"{dataset}: {'; '.join(problems)}. Compare it on its own dataset (dataset=None) or pick "
                         "checkpoints trained for that dataset.")


def fair_comparison(checkpoints: Sequence[str | Path], dataset: str | None = None, device: str = "cpu", *,
                    data_seed: int | None = None, batch_size: int = 512, workers: int = 0, loader: str = "auto",
                    cache: Any = None, progress: Any = None, limit: int | None = None) -> list[FairRow]:
    """Re-evaluate every checkpoint on a test split and collect accuracy, parameters and FLOPs.

    By default each checkpoint is evaluated on its card's dataset with the card's
    ``data_seed`` (so accuracy should reproduce the card). With ``dataset`` every checkpoint
    is evaluated on that dataset's test split, realisation ``data_seed`` (default 0) for all,
    so the results are paired. Parameters and FLOPs are the card's (counted by the same
    accounting for every model); a card without them is counted afresh.

    The test split is read in batches (:mod:`wsviz.analysis.streaming`): image folders are
    streamed at the model's input size with its recipe's evaluation transform (``workers``
    loader processes), in-memory sets sliced (``loader`` forces either); only the predictions
    are kept. Under torchrun each rank evaluates its share. ``cache`` (a
    :class:`~wsviz.analysis.cache.PredictionCache`) reuses known predictions;
    ``progress(done, total, text)`` is called after each batch. ``limit``: only that many test
    images, spread over the split (the same ones for every checkpoint on one test set; the card's
    accuracy is then of a different, whole split); None or 0: all.
    """
    from wsviz.analysis.streaming import predict_variants
    from wsviz.data.stream import eval_data, spread_indices
    from wsviz.training.checkpoint import load_checkpoint

    if limit is not None and limit < 0:
        raise WsvizError(f"limit must be 0 (all) or a positive number of images, not {limit}.")
    folders = [Path(c) for c in checkpoints]
    if not folders:
        raise WsvizError("No checkpoints to compare: give at least one checkpoint folder.")
    for f in folders:
        if not f.is_dir():
            raise WsvizError(f"Checkpoint folder {f} does not exist; give folders that hold card.json and "
                             "weights.safetensors (as written by wsviz.train).")
    names = [f.name for f in folders]
    names = [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]
    splits: dict[tuple, Any] = {}
    sizes: dict[tuple, int] = {}
    split_labels: dict[tuple, np.ndarray] = {}
    rows = []
    for folder, name in zip(folders, names):
        model, card = load_checkpoint(folder, device=device)
        ds = dataset or card.get("dataset")
        if not ds:
            raise WsvizError(f"The card in {folder} names no dataset; pass dataset=... to say where to evaluate it.")
        seed = data_seed if data_seed is not None else (0 if dataset else int(card.get("data_seed", 0)))
        if dataset:
            _model_fits(model, ds, folder)
        augment = str((card.get("train_config") or {}).get("augment", "none"))
        key = (ds, seed) + ((model.wsviz_config.get("input_size"), augment) if ds.startswith("folder:") else ())
        if key not in splits:
            full = eval_data(ds, "test", seed=seed, size=key[2] if len(key) > 2 else None,
                             augment=augment if len(key) > 2 else "none")
            sizes[key] = len(full)
            splits[key] = full.subset(spread_indices(len(full), limit)) if limit and limit < len(full) else full
        ps = predict_variants({name: model}, splits[key], batch_size=batch_size, workers=workers, loader=loader,
                              cache=cache, progress=progress)
        preds = ps.predictions[(name, "identity")]
        labels = split_labels.setdefault(key, ps.labels)  # one array per test set, shared by its rows
        from wsviz.training.cards import card_float_params

        counts = {k: card.get(k) for k in ("unique_params", "effective_params", "flops")}
        counts["float_params"] = card_float_params(card)
        if any(v is None for v in counts.values()):
            from wsviz.models import summarize

            s = summarize(model)
            counts = {"unique_params": s.unique_params, "effective_params": s.effective_params, "flops": s.flops,
                      "float_params": s.float_params}
        rows.append(FairRow(
            name=name, path=str(folder), model=card["model"], dataset=ds, data_seed=seed,
            accuracy=float((preds == labels).mean()), card_accuracy=card.get("test_accuracy"),
            card_dataset=str(card.get("dataset")), complete=bool(card.get("complete", True)), predictions=preds,
            labels=labels, split_images=sizes[key], **counts,
        ))
        del model
    return rows


@dataclass(frozen=True)
class TestSetGroup:
    """Rows (by index) evaluated on one test set: only these can be compared with each other."""

    dataset: str
    data_seed: int
    rows: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.dataset} (realisation {self.data_seed})"


@dataclass(frozen=True)
class SkippedPair:
    """A pair that is not compared, and why."""

    i: int
    j: int
    reason: str


def _same_test_set(a: FairRow, b: FairRow) -> bool:
    return (a.dataset, a.data_seed) == (b.dataset, b.data_seed) and np.array_equal(a.labels, b.labels)


def group_by_test_set(rows: Sequence[FairRow]) -> tuple[list[TestSetGroup], list[SkippedPair]]:
    """Groups of rows evaluated on the same test set, and every pair across groups with the reason
    it is not compared: accuracies on different test sets are not comparable on one axis, and
    their errors are not on the same images, so no paired test applies."""
    groups: list[TestSetGroup] = []
    for k, r in enumerate(rows):
        for g_i, g in enumerate(groups):
            if _same_test_set(rows[g.rows[0]], r):
                groups[g_i] = TestSetGroup(g.dataset, g.data_seed, g.rows + (k,))
                break
        else:
            groups.append(TestSetGroup(r.dataset, r.data_seed, (k,)))
    where = {k: g for g in groups for k in g.rows}
    skipped = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            gi, gj = where[i], where[j]
            if gi is gj:
                continue
            if (gi.dataset, gi.data_seed) == (gj.dataset, gj.data_seed):
                why = f"both name {gi.label} but their test labels differ (different data on disk?)"
            else:
                why = (f"different test sets: {rows[i].name} on {gi.label}, {rows[j].name} on {gj.label}; "
                       "evaluate both on one dataset (fair_comparison(dataset=...)) to compare them")
            skipped.append(SkippedPair(i, j, why))
    return groups, skipped


def _holm(p: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error over all tests given); NaN entries (tests
    not run) stay NaN and are left out of the family."""
    tested = [k for k in range(len(p)) if not math.isnan(p[k])]
    m = len(tested)
    order = sorted(tested, key=lambda k: p[k])
    adjusted = [math.nan] * len(p)
    running = 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[k]))
        adjusted[k] = running
    return adjusted


def pairwise_significance(rows: Sequence[FairRow], *, alpha: float = 0.05) -> list[PairSignificance]:
    """Paired tests for every pair of rows evaluated on the same test set (dataset and data seed).

    Rows on different test sets are never paired: their errors are not on the same samples
    (:func:`group_by_test_set` lists those pairs with the reason). ``p_holm`` corrects for
    testing many pairs at once, and decides: each pair's ``comparison.significant`` is
    ``p_holm < alpha`` and its summary gives both p-values and a verdict "after Holm".
    """
    pairs = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i], rows[j]
            if not _same_test_set(a, b):
                continue
            comp = compare_predictions(a.predictions, b.predictions, a.labels, (a.name, b.name), alpha=alpha)
            pairs.append((i, j, a.dataset, a.data_seed, comp))
    adjusted = _holm([c.mcnemar.p_value for *_, c in pairs])
    out = []
    for (i, j, ds, s, c), p in zip(pairs, adjusted):
        significant = p < alpha
        c = replace(c, significant=significant, summary=_summary(
            c.name_a, c.name_b, c.n, c.acc_a, c.acc_b, c.mcnemar, c.diff_ci, alpha, significant, (p, len(pairs))))
        out.append(PairSignificance(i, j, ds, s, c, p))
    return out


# ---------------------------------------------------------------------------- Pareto front
def _get(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, dict) else getattr(row, key)


def pareto_front(rows: Sequence[Any], x: str = "unique_params", y: str = "accuracy") -> list[int]:
    """Indices of rows no other row dominates (x lower-or-equal and y higher-or-equal, one strictly).

    Rows may be dataclasses or dicts. Rows missing x or y (None, NaN) are left out. Indices
    come in order of increasing x, ready to draw as a line; tied points are all kept.
    """
    pts = []
    for k, r in enumerate(rows):
        xv, yv = _get(r, x), _get(r, y)
        if xv is None or yv is None or (isinstance(xv, float) and math.isnan(xv)) or (
                isinstance(yv, float) and math.isnan(yv)):
            continue
        pts.append((k, float(xv), float(yv)))
    front = [(k, xv, yv) for k, xv, yv in pts
             if not any(xo <= xv and yo >= yv and (xo < xv or yo > yv) for _, xo, yo in pts)]
    return [k for k, _, _ in sorted(front, key=lambda t: (t[1], -t[2], t[0]))]
