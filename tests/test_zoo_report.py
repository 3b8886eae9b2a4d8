"""The claims report: seeds, the tests over seeds, one Holm family, equivalence for "~" claims, and a
REPORT.md that cannot go stale; f-RepeatNet counted as its paper counts it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import ttost_ind

from wsviz import zoo
from wsviz.analysis.stats import compare_over_seeds, newcombe_paired_ci, wilson_ci
from wsviz.errors import WsvizError

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"


# ------------------------------------------------------------------ statistics over seeds
def test_compare_over_seeds_is_welch_and_its_tost_matches_statsmodels():
    a, b = [0.957, 0.961, 0.949], [0.946, 0.952, 0.950]
    r = compare_over_seeds(a, b, margin=0.01)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    ci = ref.confidence_interval(0.95)
    assert (r.lo, r.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert r.diff == pytest.approx(np.mean(a) - np.mean(b))
    p_sm, _, _ = ttost_ind(np.array(a), np.array(b), -0.01, 0.01, usevar="unequal")
    assert r.equivalence_p == pytest.approx(p_sm, rel=1e-9)
    # Welch by hand (Satterthwaite df): the same p
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert r.p_value == pytest.approx(2 * sps.t.sf(abs(t), df), rel=1e-9)
    assert compare_over_seeds(a, b).equivalence_p is None  # no margin, no equivalence test


def test_equivalence_over_seeds_needs_a_tight_spread_not_just_no_difference():
    tight = compare_over_seeds([0.950, 0.951, 0.949], [0.951, 0.950, 0.950], margin=0.01)
    loose = compare_over_seeds([0.93, 0.97, 0.95], [0.96, 0.94, 0.95], margin=0.01)
    assert tight.equivalence_p < 0.05 and tight.p_value > 0.05
    assert loose.p_value > 0.05 and loose.equivalence_p > 0.05  # no difference found, and not "the same"
    with pytest.raises(WsvizError, match="at least two runs"):
        compare_over_seeds([0.9], [0.9, 0.8])
    same = compare_over_seeds([0.9, 0.9], [0.9, 0.9], margin=0.01)  # no spread: nothing to estimate it from
    assert not same.testable and np.isnan(same.p_value) and np.isnan(same.equivalence_p)


def _newcombe_by_hand(both, only_a, only_b, neither, z=sps.norm.ppf(0.975)):
    """Newcombe (1998) method 10 from the four cell counts, Wilson intervals by formula (not scipy)."""
    n = both + only_a + only_b + neither

    def wilson(k):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return p, centre - half, centre + half

    p1, l1, u1 = wilson(both + only_a)
    p2, l2, u2 = wilson(both + only_b)
    big_a = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    b = both * neither - only_a * only_b
    c = b - n / 2 if b > n / 2 else (b if b < 0 else 0.0)
    phi = c / math.sqrt(big_a) if big_a else 0.0
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2),
            d + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))


@pytest.mark.parametrize("cells", [(900, 30, 20, 50), (5, 3, 1, 1), (1000, 0, 0, 0), (0, 0, 0, 40), (10, 10, 10, 10),
                                   (40, 1, 6, 3),
                                   (30, 0, 10, 0),  # b always right: no correlation (phi = 0), both terms count
                                   (2, 1, 1, 1),  # both * neither - only_a * only_b = 1 <= n / 2: corrected to 0
                                   (1, 5, 5, 1),  # negative: not corrected
                                   (0, 1, 0, 0)])  # one sample
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_newcombe_paired_interval_matches_the_formula_and_never_collapses(cells, alpha):
    both, only_a, only_b, neither = cells
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    ci = newcombe_paired_ci(a, b, alpha)
    lo, hi = _newcombe_by_hand(*cells, z=sps.norm.ppf(1 - alpha / 2))
    assert (ci.lo, ci.hi, ci.alpha) == (pytest.approx(max(lo, -1)), pytest.approx(min(hi, 1)), alpha)
    assert ci.lo <= ci.diff <= ci.hi and ci.hi - ci.lo > 0  # 1000/1000 against 1000/1000 is not [0, 0]


def test_wilson_interval_does_not_collapse_at_the_extremes():
    acc, lo, hi = wilson_ci(np.ones(1000, bool))
    assert acc == 1.0 and hi == 1.0 and lo == pytest.approx(0.99617, abs=1e-5)
    acc, lo, hi = wilson_ci(np.zeros(1000, bool))
    assert acc == 0.0 and lo == 0.0 and hi == pytest.approx(1 - 0.99617, abs=1e-5)


# ------------------------------------------------------------------ the claims table logic
def _fake_zoo(tmp_path, accs: dict[str, list[float]], n: int = 1000, scale: bool = False) -> Path:
    """Seed folders with a card and predictions whose accuracies are exactly ``accs``."""
    labels = np.arange(n) % 10
    rng = np.random.default_rng(0)
    for name, seeds in accs.items():
        for seed, acc in enumerate(seeds):
            folder = zoo.seed_folder(tmp_path, name, seed)
            folder.mkdir(parents=True)
            wrong = rng.permutation(n)[: round((1 - acc) * n)]
            pred = labels.copy()
            pred[wrong] = (pred[wrong] + 1) % 10
            arrays = {"test": pred, "labels": labels}
            if scale:
                arrays |= {"scale": np.stack([pred] * len(zoo.SCALES)), "scale_labels": labels}
            np.savez(folder / zoo.PREDICTIONS, **arrays)
            (folder / "card.json").write_text(json.dumps(
                {"model": "m", "dataset": "d", "test_accuracy": acc, "unique_params": 100, "effective_params": 200,
                 "sign_mask_params": 0, "flops": 1_000_000, "train_config": {"seed": seed}}))
    return tmp_path


def test_claims_are_tested_over_seeds_with_one_holm_family(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CLAIMS", [
        ("A ~ B", "a", "b", "~"), ("C > D", "c", "d", ">"), ("E > F", "e", "f", ">"), ("G vs H", "g", "h", "vs")])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [])
    out = _fake_zoo(tmp_path, {
        "a": [0.950, 0.951, 0.949], "b": [0.951, 0.950, 0.950],  # equivalent within 1 pt
        "c": [0.97, 0.971, 0.969], "d": [0.90, 0.902, 0.899],  # clearly better
        "e": [0.90, 0.902, 0.899], "f": [0.97, 0.971, 0.969],  # clearly worse: the claim is contradicted
        "g": [0.93, 0.97, 0.95], "h": [0.96, 0.94, 0.95],  # no difference shown
    })
    results, m = zoo.claims_table(out)
    assert m == 4 + 1  # every claim's difference test, and the one "~" claim's equivalence test
    verdicts = {r.claim: r.verdict() for r in results}
    assert verdicts == {"A ~ B": "equivalent within ±1 pt", "C > D": "supported (A > B)",
                        "E > F": "contradicted (B > A)", "G vs H": "inconclusive"}
    family = [r.seeds.p_value for r in results] + [results[0].seeds.equivalence_p]
    order = np.argsort(family)
    expected = np.maximum.accumulate([min(1.0, (len(family) - k) * family[i]) for k, i in enumerate(order)])
    got = [r.p_holm for r in results] + [results[0].eq_holm]
    assert np.allclose([got[i] for i in order], expected)
    assert all(g >= p for g, p in zip(got, family))
    # the per-image evidence: McNemar per seed pair, one p-value per seed
    assert [s for s, _ in results[1].per_seed] == [0, 1, 2]
    text = zoo.render_report(out)
    assert "Holm over the 5 tests below" in text and "**equivalent within ±1 pt**" in text


def test_a_claim_without_spread_between_seeds_is_not_tested_nor_counted_in_holm(tmp_path, monkeypatch):
    """rot-steerable-c8 scored 96.2, 96.2, 96.1: three equal runs of both models would have given p ~ 1e-27
    ('supported') from float noise. Such a row says 'cannot test' and leaves the Holm family, said in the report."""
    monkeypatch.setattr(zoo, "CLAIMS", [("A > B", "a", "b", ">"), ("C ~ D", "c", "d", "~"), ("E > F", "e", "f", ">")])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [])
    out = _fake_zoo(tmp_path, {"a": [0.962] * 3, "b": [0.961] * 3, "c": [0.95] * 3, "d": [0.95] * 3,
                               "e": [0.97, 0.971, 0.969], "f": [0.90, 0.902, 0.899]})
    results, m = zoo.claims_table(out)
    assert m == 1  # only E > F's difference test: the two rows without spread and C ~ D's equivalence are out
    verdicts = {r.claim: r.verdict() for r in results}
    assert verdicts == {"A > B": "cannot test: no spread between seeds", "C ~ D": "cannot test: no spread between seeds",
                        "E > F": "supported (A > B)"}
    e = results[2]
    assert e.p_holm == pytest.approx(e.seeds.p_value)  # a family of one: not multiplied by 3
    assert np.isnan(results[0].p_holm) and np.isnan(results[1].eq_holm)
    text = zoo.render_report(out)
    assert "Holm over the 1 test below" in text
    assert "2 rows could not be tested (no spread between seeds in either model: `a` vs `b`, `c` vs `d`)" in text
    assert "**cannot test: no spread between seeds**" in text and "nan" not in text


def test_how_to_read_it_computes_its_numbers_and_claims_no_more_than_the_tests_give(tmp_path, monkeypatch):
    """Runs per model, test images and the |t| a row needs are computed, not typed ('n = 3 vs 3',
    '1,000 paired test images'); the Welch test covers the architectures on this test set only; its
    intervals are unadjusted; nothing is said of when the margin was fixed, which git cannot show."""
    monkeypatch.setattr(zoo, "CLAIMS", [("C > D", "c", "d", ">"), ("G vs H", "g", "h", "vs")])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [])
    out = _fake_zoo(tmp_path, {"c": [0.97, 0.975, 0.965], "d": [0.90, 0.91],  # two seeds of d only
                               "g": [0.93, 0.97, 0.95], "h": [0.96, 0.94, 0.95]}, n=200)
    results, m = zoo.claims_table(out)
    text = zoo.render_report(out)
    assert "n = 3 vs 2 or 3 vs 3 runs" in text and "n = 3 vs 3)" not in text and "With 3 runs each" not in text
    assert "McNemar's test on the 200 paired test images" in text and "1,000 paired" not in text
    assert "the architectures on this test set, not two trained networks (test-set sampling is not in the " \
           "interval: every run is scored on the same test images)" in text
    assert "fixed before" not in text and "well above the seed-to-seed spread" not in text
    dfs = sorted(r.seeds.df for r in results)
    need = [sps.t.ppf(1 - zoo.ALPHA / (2 * m), df) for df in dfs]
    assert (f"{dfs[0]:.1f} to {dfs[-1]:.1f} degrees of freedom here, so at the first Holm step "
            f"(p < {zoo.ALPHA:g}/{m}) a row needs |t| ≥ {need[-1]:.1f} (at {dfs[-1]:.1f} df) to {need[0]:.1f} "
            f"(at {dfs[0]:.1f} df)") in text
    assert "tested two-sided, not one-sided" in text and "now that the data are seen" in text
    assert "| diff [95% CI, unadjusted] |" in text and "Welch's 95% interval, not adjusted" in text


def test_the_report_says_which_variants_seeds_were_trained_by_different_code(tmp_path, monkeypatch):
    """Seed 0 of most shipped variants was trained days before seeds 1 and 2, by code whose train_config lacks
    fields added since (augment, warmup_epochs, ...): the report must not say the seeds are runs of the same
    commands; it names the variants, the fields and the dates, and says how often that seed is the best."""
    monkeypatch.setattr(zoo, "CLAIMS", [("A > B", "a", "b", ">"), ("C > D", "c", "d", ">")])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [])
    out = _fake_zoo(tmp_path, {"a": [0.97, 0.95, 0.96], "b": [0.90, 0.91, 0.92], "c": [0.93, 0.97, 0.95],
                               "d": [0.96, 0.94, 0.95]})
    for name in "abc":  # d's seeds all share one train_config
        for seed in zoo.SEEDS:
            card = zoo.seed_folder(out, name, seed) / "card.json"
            c = json.loads(card.read_text())
            c["created"] = "2026-11-22T03:00:00+00:00" if seed == 0 else f"2026-12-0{seed}T01:00:00+00:00"
            if seed:
                c["train_config"] |= {"augment": "none", "warmup_epochs": 0}
            card.write_text(json.dumps(c))
    text = zoo.render_report(out)
    assert "with the same commands" not in text
    p = sps.binomtest(1, 3, 1 / 3, alternative="greater").pvalue  # seed 0 is the best of a's seeds only
    assert ("For 3 of the 4 variants in a claim (`a`, `b`, `c`), seed 0's card records a train_config without "
            "`augment`, `warmup_epochs`, which its other seeds' cards record: seed 0 trained 2026-11-22, the others "
            "2026-12-01, 2026-12-02. They were trained by different versions of the training code; `d` has one "
            "train_config for all its seeds.") in text
    assert (f"Of those 3, seed 0 is strictly the most accurate of its variant's seeds in 1 (one-sided binomial p = "
            f"{p:.2g} for 1 of 3 against 1 in 3; exploratory: looked at after seeing the data).") in text


def test_a_single_seed_does_not_make_a_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CLAIMS", [("A > B", "a", "b", ">")])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [])
    out = _fake_zoo(tmp_path, {"a": [0.99], "b": [0.5, 0.52, 0.51]})
    assert zoo.claims_table(out) == ([], 0)


def test_scale_comparisons_are_clustered_by_digit(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CLAIMS", [])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [("A vs B over scales", "a", "b", "vs")])
    out = _fake_zoo(tmp_path, {"a": [0.95, 0.96, 0.955], "b": [0.94, 0.95, 0.945]}, n=200, scale=True)
    (r,), m = zoo.claims_table(out)
    assert m == 1 and len(r.per_seed) == 3
    # The 8 copies of each digit are one unit: the clustered p equals a sign-flip test on the digits'
    # mean differences, and it is not the (smaller) p of 8 x 200 pooled independent pairs.
    from wsviz.analysis.stats import clustered_sign_flip_test, mcnemar

    a = np.load(zoo.seed_folder(out, "a", 0) / zoo.PREDICTIONS)
    b = np.load(zoo.seed_folder(out, "b", 0) / zoo.PREDICTIONS)
    ca, cb = (a["scale"] == a["scale_labels"]).ravel(), (b["scale"] == b["scale_labels"]).ravel()
    digits = np.tile(np.arange(200), len(zoo.SCALES))
    assert r.per_seed[0][1] == clustered_sign_flip_test(ca, cb, digits, seed=0).p_value
    assert r.per_seed[0][1] > mcnemar(ca, cb).p_value


# ------------------------------------------------------------------ the shipped zoo
def test_every_claimed_variant_ships_three_training_seeds():
    for name in zoo.claimed():
        runs = zoo.seed_runs(CKPT, name)
        assert [r.seed for r in runs] == list(zoo.SEEDS), name
        for r in runs:
            assert r.card["train_config"]["seed"] == r.seed, name
            assert f"--seed {r.seed}" in r.card["command"], name
            assert r.card["test_accuracy"] == pytest.approx(r.accuracy), name  # predictions are that run's
            assert r.card["epochs_done"] == zoo.DEFAULT_EPOCHS and r.card["complete"], name
        accs = [r.accuracy for r in runs]
        assert len(set(accs)) > 1 or len({r.test.tobytes() for r in runs}) > 1, f"{name}: seeds are not distinct runs"
    # Extra seeds ship without weights (the zoo stays small; git ignores them); seed 0 has them.
    assert not _tracked("seeds/")


def _tracked(fragment: str) -> bool:
    import subprocess

    out = subprocess.run(["git", "ls-files", "checkpoints"], cwd=ROOT, capture_output=True, text=True).stdout
    return any(fragment in line and line.endswith("weights.safetensors") for line in out.splitlines())


def test_report_md_is_regenerated_from_the_shipped_predictions():
    """REPORT.md is exactly what `python -m wsviz.zoo report` writes now: edit the code or the
    predictions, and this fails until the report is regenerated."""
    assert (CKPT / "REPORT.md").read_text() == zoo.render_report(CKPT)


def test_checkpoints_readme_is_regenerated_from_the_cards(tmp_path):
    for name in [e.name for e in zoo.ZOO]:
        src = CKPT / name
        dst = tmp_path / name
        dst.mkdir()
        shutil.copy(src / "card.json", dst / "card.json")
        for seed in zoo.SEEDS[1:]:
            s = zoo.seed_folder(CKPT, name, seed) / "card.json"
            if s.is_file():
                d = zoo.seed_folder(tmp_path, name, seed)
                d.mkdir(parents=True)
                shutil.copy(s, d / "card.json")
    assert zoo.write_table(tmp_path).read_text() == (CKPT / "README.md").read_text()


@pytest.mark.slow
def test_shipped_predictions_are_those_of_the_shipped_weights(tmp_path):
    """Seed 0's predictions.npz recomputed from its weights: the report cannot rest on stale numbers."""
    for name in zoo.claimed():
        folder = tmp_path / name
        shutil.copytree(CKPT / name, folder, ignore=shutil.ignore_patterns("seeds"))
        zoo.write_predictions(folder, name)
        with np.load(folder / zoo.PREDICTIONS) as new, np.load(CKPT / name / zoo.PREDICTIONS) as old:
            assert sorted(new.files) == sorted(old.files), name
            for k in new.files:
                assert np.array_equal(new[k], old[k]), f"{name}: {k} differs from the shipped predictions"


# ------------------------------------------------------------------ f-RepeatNet in the paper's terms
def test_f_repeatnet_counts_its_masks_as_bits_not_parameters():
    from wsviz.catalog import load_catalog
    from wsviz.models import create_model, summarize

    kw = dict(base_width=8, scale=2, input_size=28, in_channels=1, num_classes=10)
    f = summarize(create_model("repeatnet_resnet18", mode="bireal", **kw))
    lin = summarize(create_model("repeatnet_resnet18", mode="linear", **kw))
    assert f.mask_bits == f.mask_params > 0
    assert f.float_params == lin.unique_params  # the paper: repetition at the base model's parameter count
    assert f.compression == pytest.approx(lin.compression) and f.compression > 1
    assert f.storage_bytes == 4 * lin.unique_params + math.ceil(f.mask_bits / 8)
    row = next(r for r in load_catalog() if r["name"] == "repeatnet_resnet18")  # default: bireal
    assert row["float_params"] == row["unique_params"] - row["mask_bits"] and row["mask_bits"] > 0
    assert row["compression"] == pytest.approx(row["effective_params"] / row["float_params"], abs=1e-3)
    from wsviz.training.cards import card_float_params

    card = json.loads((CKPT / "scale-repeatnet-f" / "card.json").read_text())
    lin_card = json.loads((CKPT / "scale-repeatnet-linear" / "card.json").read_text())
    assert card_float_params(card) == lin_card["unique_params"] == lin.unique_params
    readme = (CKPT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("| `scale-repeatnet-f`"))
    assert f"| {lin.unique_params:,} | {f.mask_bits:,} | {f.compression:.2f}x |" in line
    assert "875,698" not in readme and "0.80x" not in readme


# ------------------------------------------------------------------ the app says what the report says
def test_fair_comparison_in_the_app_tests_over_seeds_like_the_report():
    from conftest import open_app

    a, b = "scale-msws-shared", "scale-msws-vanilla"
    at = open_app("pages/models.py", variants=[a, b])
    next(x for x in at.button if x.label == "Evaluate the chosen variants").click().run()
    assert not at.exception, at.exception
    texts = [m.value for m in at.markdown]
    line = next(t for t in texts if t.startswith(f"{a} ") and "Welch p" in t)
    ref = compare_over_seeds(zoo.seed_accuracies(CKPT / a), zoo.seed_accuracies(CKPT / b))
    assert ref.n_a == ref.n_b == len(zoo.SEEDS)
    assert f"Welch p = {ref.p_value:.2g}" in line and f"(n = {ref.n_a})" in line
    claim = next(r for r in zoo.claims_table(CKPT)[0] if (r.a, r.b) == (a, b))
    assert claim.seeds.p_value == ref.p_value  # the report's row for this claim: the same test, the same number
    # and the per-image line is McNemar with Newcombe's interval, the report's per-seed-pair test on seed 0
    mc = next(t for t in texts if "McNemar p" in t)
    from wsviz.analysis.stats import _fmt_p

    assert f"McNemar p = {_fmt_p(claim.per_seed[0][1])}" in mc
    # its verdict is Holm's (one pair here), said once; the test over seeds says what it covers
    assert mc.endswith("after Holm.") and mc.count("Holm-adjusted") == 1
    head = next(t for t in texts if t.startswith("**Over training seeds**"))
    assert "the architectures on this test set" in head and "test-set sampling is not in the interval" in head
    assert "95% CI, unadjusted" in line


def test_the_tying_section_reads_its_verdicts_from_the_benchmark_results():
    """REPORT.md's section on tying a trained model is rendered from checkpoints/tying.json (bench_tie's
    results): each target's verdict is computed from the numbers, so changing them changes the verdict."""
    import copy
    import statistics

    res = json.loads((CKPT / "tying.json").read_text())
    text = "\n".join(zoo.tying_section(res))
    assert text in (CKPT / "REPORT.md").read_text()
    seeds = res["per_seed"]
    gap = statistics.mean(res["untied_test"] - s["after_ft"]["lstsq"] for s in seeds)
    assert f"lstsq + fine-tune is {gap:.2f}" in text
    assert ("points below it — NOT met" in text) == (gap > 0.5)
    rho = statistics.mean(s["spearman_test"]["combined (chosen on val)"] for s in seeds)
    assert f"(its weights chosen on val, ρ on the test half): {rho:.2f} — {'met' if rho >= 0.7 else 'NOT met'}" in text
    # the same results with the tied models 0.3 points under the untied one: met in the point estimate, but the
    # 0.5-point target is shown only when the whole interval is under 0.5
    close = copy.deepcopy(res)
    for s in close["per_seed"]:
        s["after_ft"]["lstsq"] = close["untied_test"] - 0.3
    close["gap_ci"] = {"gap": 0.3, "low": 0.1, "high": 0.62}
    assert "is 0.30 ± 0.00 points below it — met in the point estimate, not shown (the 95% interval below reaches " \
           "past 0.5)" in "\n".join(zoo.tying_section(close))
    close["gap_ci"]["high"] = 0.45
    assert "is 0.30 ± 0.00 points below it — met (the whole 95% interval below is under 0.5)" in "\n".join(
        zoo.tying_section(close))
    close.pop("gap_ci")
    close.pop("control_ci")
    assert "is 0.30 ± 0.00 points below it — met in the point estimate; no interval is given" in "\n".join(
        zoo.tying_section(close))
    # just over the target: 0.51 must not read as "0.5 ... met"
    over = copy.deepcopy(res)
    for s in over["per_seed"]:
        s["after_ft"]["lstsq"] = over["untied_test"] - 0.51
    assert "is 0.51 ± 0.00 points below it — NOT met" in "\n".join(zoo.tying_section(over))
    # the budget curve says where the 0.5-point target is first reached in the point estimate, and that no
    # interval is given for it
    curve = copy.deepcopy(res)
    for s in curve["per_seed"]:
        s["after_ft"]["lstsq"] = curve["untied_test"] - 1.0
        s["curve"] = {"0.25": {"steps": 93, "tied": curve["untied_test"] - 0.7},
                      "0.5": {"steps": 186, "tied": curve["untied_test"] - 0.2}}
    assert ("Within 0.5 points: first at 50% of the original steps in the point estimate; not shown: no interval is "
            "given for the longer fine-tunes") in "\n".join(zoo.tying_section(curve))
    for s in curve["per_seed"]:
        s["curve"]["0.5"]["tied"] = curve["untied_test"] - 0.6
    assert "not within 50% of the original steps either" in "\n".join(zoo.tying_section(curve))
    # bench_tie --curve with no shares: no budget table, and the control's own drop is still said
    for s in curve["per_seed"]:
        s["curve"] = {}
    bare = "\n".join(zoo.tying_section(curve))
    assert "More fine-tuning" not in bare and "Within 0.5 points:" not in bare
    assert f"fine-tuned with the same {res['ft_steps']} steps is itself" in bare
    # and a budgeted choice that loses more than the rule is said to lose more
    worse = copy.deepcopy(res)
    for s in worse["per_seed"]:
        s["budget"]["wsviz"]["drop_after_ft"] = s["budget"]["sharesnet rule"]["drop_after_ft"] + 1.0
        s["budget"]["wsviz"]["after_ft"] = s["budget"]["sharesnet rule"]["after_ft"] - 1.0
    assert "wsviz loses less than the rule: NO" in "\n".join(zoo.tying_section(worse))
    assert "larger than its spread" not in "\n".join(zoo.tying_section(worse))  # |mean| > sd is no test


def _wilson_bound(a, b, n, level=0.95):
    """mean(a) - mean(b) in points and the interval from every accuracy's Wilson interval, Bonferroni."""
    import statistics

    alpha = (1 - level) / (len(a) + len(b))
    cis = [proportion_confint(round(x * n / 100), n, alpha=alpha, method="wilson") for x in (*a, *b)]
    lo = [100 * c[0] for c in cis]
    hi = [100 * c[1] for c in cis]
    k = len(a)
    return (statistics.mean(a) - statistics.mean(b), statistics.mean(lo[:k]) - statistics.mean(hi[k:]),
            statistics.mean(hi[:k]) - statistics.mean(lo[k:]))


def test_tying_verdicts_say_met_only_when_an_interval_shows_it():
    """The review: 'met' from a mean whose interval reaches past the target; 'wsviz loses less than the rule:
    yes' from 3, 3, 2 images on one shared test half; 'met' for ρ ≥ 0.7 from a point estimate over 14
    overlapping groups. Each verdict now says 'in the point estimate, not shown' unless its interval shows it,
    and gives the interval it can compute from tying.json."""
    import math
    import statistics

    res = json.loads((CKPT / "tying.json").read_text())
    seeds, n = res["per_seed"], res["val_n"]
    text = "\n".join(zoo.tying_section(res))
    # from scratch: an interval that holds whatever the pairing (Wilson per accuracy, Bonferroni over all 6)
    d, lo, hi = _wilson_bound([s["after_ft"]["lstsq"] for s in seeds], [s["scratch"] for s in seeds], n)
    assert lo > 0 and (f"{d:.1f} ± {statistics.stdev(s['after_ft']['lstsq'] - s['scratch'] for s in seeds):.1f} "
                       f"points better — met: 95% interval [{lo:.1f}, {hi:.1f}]") in text
    # ranking: Fisher z interval for Spearman's ρ over the candidate groups
    rho = statistics.mean(s["spearman_test"]["combined (chosen on val)"] for s in seeds)
    g = len(res["candidate_groups"])
    half = 1.959963984540054 * math.sqrt(1.06 / (g - 3))
    r_lo, r_hi = math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half)
    assert r_lo < 0.7 <= rho
    assert (f"{rho:.2f} — met in the point estimate, not shown: 95% interval [{r_lo:.2f}, {r_hi:.2f}] (Fisher z, "
            f"SE √(1.06/(n − 3)) for Spearman's ρ with n = {g} candidate groups") in text
    assert "no interval is given for these differences" in text
    # budget: per-seed differences in images of the test half, an interval, no |mean| > sd test
    ws = [s["budget"]["wsviz"]["after_ft"] for s in seeds]
    rule = [s["budget"]["sharesnet rule"]["after_ft"] for s in seeds]
    d, lo, hi = _wilson_bound(rule, ws, n)
    images = [round((w["budget"]["wsviz"]["drop_after_ft"] - w["budget"]["sharesnet rule"]["drop_after_ft"]) * n / 100)
              for w in seeds]
    assert lo < 0 < hi and d < 0
    assert (f"wsviz minus the rule: {d:+.1f} points (per seed " + ", ".join(f"{i:+d}" for i in images)
            + f" images of the {n}-image test half, every seed on the same images), 95% interval [{lo:+.1f}, "
            f"{hi:+.1f}]") in text
    assert "wsviz loses less than the rule: yes in the point estimate, not shown" in text
    assert "larger than its spread" not in text and "not a resolved difference" not in text
    # the Fashion-MNIST twin: 0.47 points below, 95% interval [0.13, 0.82]: not shown, at 10% or after
    fashion = json.loads((CKPT / "tying-fashion-sharesnet-unshared.json").read_text())
    ftext = "\n".join(zoo.tying_section(fashion))
    assert "points below it — met in the point estimate, not shown (the 95% interval below reaches past 0.5)" in ftext
    assert ("Within 0.5 points: already at the 10% budget in the point estimate, not shown (the 95% interval above "
            "reaches past 0.5).") in ftext


def test_a_tie_only_section_gives_the_gaps_interval_and_its_verdict(tmp_path):
    """``bench_tie --only-tie`` results (the Fashion-MNIST twin's): the section states the gap's bootstrap
    interval and calls the 0.5-point target shown only when the whole interval is under 0.5; it has
    no ranking or budget part; and the report renders every published checkpoint's results, the
    shipped twin's first."""
    import copy

    res = json.loads((CKPT / "tying.json").read_text())
    only = copy.deepcopy(res)
    only.update(checkpoint="fashion-x", only_tie=True, gap_ci={"gap": 0.21, "low": 0.05, "high": 0.38},
                control_ci={"gap": -0.1, "low": -0.3, "high": 0.1})
    for s in only["per_seed"]:
        for k in ("spearman_test", "spearman_val", "budget"):
            s.pop(k)
    text = "\n".join(zoo.tying_section(only))
    assert "shared one: `fashion-x` on" in text and "Plain model `fashion-x`" in text and "### Ranking" not in text and "### Budgeted" not in text
    assert "not run on `fashion-x` (`bench_tie --only-tie`)" in text
    assert "0.21 points, 95% bootstrap interval [0.05, 0.38]" in text
    assert "the whole interval is under 0.5, so the target is shown at this confidence" in text
    only["gap_ci"]["high"] = 0.62
    assert "the interval reaches past 0.5, so the target is not shown at this confidence (nor ruled out)" in "\n".join(
        zoo.tying_section(only))
    only["gap_ci"].update(low=0.55, gap=0.9)
    assert "(and it is ruled out)" in "\n".join(zoo.tying_section(only))
    # published results: the twin's tying.json first, then each tying-NAME.json
    (tmp_path / "tying-b.json").write_text("{}")
    (tmp_path / "tying-a.json").write_text("{}")
    (tmp_path / "tying.json").write_text("{}")
    assert [p.name for p in zoo.tying_results(tmp_path)] == ["tying.json", "tying-a.json", "tying-b.json"]


def test_every_published_tying_result_is_a_section_of_the_report():
    """checkpoints/tying*.json (bench_tie --publish) are what REPORT.md's tying sections say, each one:
    a result published without regenerating the report (python -m wsviz.zoo report) fails here."""
    paths = zoo.tying_results(CKPT)
    assert [p.name for p in paths][:1] == ["tying.json"] and len(paths) >= 2  # the twin's, then the Fashion-MNIST twin's
    report = (CKPT / "REPORT.md").read_text()
    for p in paths:
        assert "\n".join(zoo.tying_section(json.loads(p.read_text()))) in report, p.name


def test_flops_matched_labels_say_how_close_the_match_is_at_the_zoo_width():
    """A rotation-zoo label "(Cn FLOPs)" claims the FLOPs of steerable Cn at the width the zoo trains: within
    2%, or the label states the ratio (the paper's C8 factor is 6.4% under at width 0.25); the claims use the
    same words as the table."""
    from wsviz.models import create_model, summarize

    steerable = {e.overrides["N"]: summarize(create_model(e.model, **e.overrides)).flops
                 for e in zoo.ZOO if e.model == "steerable_rotmnist"}
    seen = 0
    for e in zoo.ZOO:
        if e.model != "repeatnet_rotmnist_cnn" or e.overrides.get("mode") == "none":
            continue
        n = int(e.overrides["match"][1:])
        ratio = summarize(create_model(e.model, **e.overrides)).flops / steerable[n]
        want = f"(C{n} FLOPs)" if abs(ratio - 1) <= 0.02 else f"({ratio:.2f}x C{n} FLOPs)"
        assert e.role.endswith(want), (e.name, e.role, ratio)
        seen += 1
        for label, *names in zoo.CLAIMS:
            if e.name in names and "FLOPs" in label:
                assert want in label, (label, want)
    assert seen == 9


def test_the_reports_scale_sentence_is_read_from_the_cards(tmp_path, monkeypatch):
    """"Small models, 4,000 training digits, 12 epochs" was typed: it is now counted from the variants' cards
    (epochs done, the size of each card's training split), so a retrained zoo cannot leave it stale."""
    monkeypatch.setattr(zoo, "CLAIMS", [("C > D", "c", "d", ">")])
    monkeypatch.setattr(zoo, "SCALE_CLAIMS", [])
    out = _fake_zoo(tmp_path, {"c": [0.97, 0.975, 0.965], "d": [0.90, 0.91, 0.905]})
    for name, epochs in (("c", 7), ("d", 9)):
        for seed in range(3):
            f = zoo.seed_folder(out, name, seed) / "card.json"
            card = json.loads(f.read_text())
            f.write_text(json.dumps({**card, "dataset": "mnist5k", "train_split": "train", "data_seed": 0,
                                     "epochs": 12, "epochs_done": epochs}))
    text = zoo.render_report(out)
    assert "Small models, 4,000 training images, 7 or 9 epochs:" in text and "12 epochs" not in text
