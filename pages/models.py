"""Models: the registered zoo with parameters, effective parameters and FLOPs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from pages._shared import (
    _stamp,
    available_variants,
    chosen_variants,
    download_table,
    figure,
    get_variant,
    percent_style,
    plain,
    show_error,
)
from wsviz.catalog import families as catalog_families
from wsviz.catalog import load_catalog

st.title("Model zoo")
st.write(
    "Every architecture wsviz can build, built to its paper's parameter counts (tested; where a paper counts "
    "part of the network, the tests compare that part: msws's Table 2 leaves out the classifier, ShaRDNet's "
    "|W_conv| counts the shared conv and blending weights). **Params** here are all the real-valued "
    "weights stored, classifier included (a shared weight counts once; f-RepeatNet's sign masks are counted "
    "apart, as bits, as its paper counts them); **effective** parameters are the weights the "
    "network applies, each use counted (what it would hold unshared). FLOPs are torch's count for "
    "one image at the model's input size (a multiply-add is 2 FLOPs)."
)

families = catalog_families()
chosen = st.multiselect("Families", families, default=families, key="families")
# Precomputed from the registry (wsviz/catalog.json, checked against a live count by the tests):
# the table appears before torch is even imported.
rows = [r for r in load_catalog() if r["family"] in chosen]

if rows:
    df = pd.DataFrame(rows)
    cols = ["name", "family", "input", "classes", "float_params", "mask_bits", "effective_params", "compression",
            "reuse", "reused_weights", "gflops", "storage_kb", "defaults", "paper"]
    st.dataframe(
        df[cols], hide_index=True,
        column_config={
            "float_params": st.column_config.NumberColumn(
                "params", format="localized",
                help="Stored real-valued parameters, classifier included, a shared weight counted once "
                     "(msws's Table 2 and ShaRDNet's |W_conv| count less: see above)."),
            "mask_bits": st.column_config.NumberColumn(
                "+ sign-mask bits", format="localized",
                help="f-RepeatNet's learned sign flips: trained through real latent tensors, stored as one bit "
                     "each (the paper counts them as bits, not parameters)."),
            "effective_params": st.column_config.NumberColumn("effective params", format="localized"),
            "compression": st.column_config.NumberColumn("effective / params", format="%.2f×"),
            "storage_kb": st.column_config.NumberColumn("storage KiB", format="%.1f",
                                                        help="float32 parameters plus the masks' bits"),
            "gflops": st.column_config.NumberColumn("GFLOPs", format="%.3f"),
            "reuse": st.column_config.TextColumn(
                "reuse", help="direct: the same weight applied at several places or rates; tiled: a parent block "
                              "tiled into a larger weight (RepeatNet); expanded: basis coefficients expanded into "
                              "filters (e2cnn). The sharing map below shows where."),
            "reused_weights": st.column_config.NumberColumn("reused weights", format="localized",
                                                            help="stored tensors applied more than once"),
        },
    )
    st.download_button("Download CSV", df.to_csv(index=False).encode(), "wsviz_models.csv", "text/csv")
    with st.expander("What each model is"):
        for r in rows:
            st.markdown(f"- **{r['name']}** ({r['family']}): {r['description']}")
else:
    st.info("Choose at least one family.")


# ------------------------------------------------------------------ trained variants
st.header("Trained variants")
variants = available_variants()
if variants:
    from wsviz.training.cards import card_float_params, read_card

    vrows = []
    seeded = sum((Path(path) / "seeds").is_dir() for path in variants.values())
    for label, path in variants.items():
        c = read_card(path)
        fp = card_float_params(c)
        vrows.append({"variant": label, "model": c["model"], "family": c.get("family"), "dataset": c.get("dataset"),
                      "test accuracy (this checkpoint)": c.get("test_accuracy"),
                      "params": fp, "sign-mask bits": c.get("sign_mask_params", 0),
                      "effective params": c.get("effective_params"),
                      # a card without a count shows a blank, never a ratio over a made-up 1 or 0
                      "compression": round(c["effective_params"] / fp, 2) if fp and c.get("effective_params")
                      else None,
                      "MFLOPs": round(c["flops"] / 1e6, 1) if c.get("flops") is not None else None,
                      "epochs": c.get("epochs_done")})
    st.dataframe(percent_style(vrows, ["test accuracy (this checkpoint)"]), hide_index=True, column_config={
        "test accuracy (this checkpoint)": st.column_config.NumberColumn(
            help="this checkpoint's last epoch on its test split (for the zoo: seed 0). "
                 + (f"{seeded} of these {len(variants)} variants ship more training seeds (seeds/): "
                    "checkpoints/REPORT.md gives the mean over them for the zoo's" if seeded else
                    "None of these variants ships more training seeds: one run each, no mean over seeds")),
        "params": st.column_config.NumberColumn(format="localized", help="real-valued, shared counted once"),
        "sign-mask bits": st.column_config.NumberColumn(format="localized"),
        "effective params": st.column_config.NumberColumn(format="localized"),
        "compression": st.column_config.NumberColumn(format="%.2f×"),
        "MFLOPs": st.column_config.NumberColumn(format="%.1f")})
    download_table(vrows, "variants")
else:
    st.info("No trained variants found in checkpoints/ (run `python -m wsviz.zoo retrain`) or in finished runs.")

# ------------------------------------------------------------------------ sharing map
st.header("Sharing map")
st.write("For every stored weight a model applies more than once: where, how often, and how — the same "
         "weight at several layers or rates (msws, WSMS, ShaRDNet, ShaResNet), a parent block tiled into a larger "
         "weight (RepeatNet), or a few basis coefficients expanded into many filter taps (e2cnn). Traced from one "
         "forward pass, so it shows what the network really does, and it adds up to the compression above.")
source = st.radio("Model", ["a trained variant", "a registered architecture"], horizontal=True)
# Tracing needs torch (seconds to import): it runs once a model is chosen, so the page opens at once.
if source == "a trained variant" and variants:
    label = st.selectbox("Variant", list(variants), key="map-variant", index=None,
                         placeholder="Choose a trained variant to trace its sharing…")
    name = None
else:
    if source == "a trained variant":  # none to trace: said, and the architectures offered instead
        st.info("No trained variants to trace: choose a registered architecture below.")
    label = None
    names = [r["name"] for r in load_catalog()]
    name = st.selectbox("Architecture", names, key="map-arch", index=None,
                        placeholder="Choose an architecture to trace its sharing…")


def sharing_sentence(s, n_reused: int, stored: int, applied: int) -> str:
    """The sharing map in words; its numbers add up to the metrics above it: effective − params
    (real-valued, what the compression divides by) = applied − stored − the real parameters applied 0×.
    Sign-mask latents are bits, not parameters (f-RepeatNet), so they are said apart."""
    real_rest = s.others + s.mask_params  # modulators applied 0x that are real parameters (swish pairs)
    return (f"**{n_reused}** stored weights ({stored:,} parameters) are reused: the network applies "
            f"**{applied:,}** weights through them, {applied - stored:,} more than it stores"
            + (f"; {-real_rest:,} parameters only modulate weights carried by others (swish pairs) and are "
               "applied 0×" if real_rest else "")
            + (f"; its {s.mask_params:,} sign-mask latents are stored as bits, not parameters, and applied 0×"
               if s.mask_params else "")
            + f". Together: effective − params = {s.effective_params - s.float_params:,}, so "
            f"{s.effective_params:,} / {s.float_params:,} = {s.compression:.2f}× compression.")


def sharing_map(label: str | None, name: str | None) -> None:
    """Show every weight the chosen model applies more than once: a trained variant is traced now
    (small models, fast); a registered architecture's map is read from the precomputed catalog
    (ImageNet-size models take seconds to build; the catalog is checked against a live trace by
    the tests)."""
    from wsviz.catalog import load_sharing_map
    from wsviz.figures import sharing_map_figure

    if label is not None:
        from wsviz.models import summarize
        from wsviz.sharingmap import SharingMap

        s = SharingMap.from_summary(summarize(get_variant(label)[0]))
    else:
        row = next(r for r in load_catalog() if r["name"] == name)
        st.caption(row["description"])
        s = load_sharing_map(name)
        if s is None:  # not in the file (a model registered since it was written): trace it now
            from wsviz.models import create_model, summarize
            from wsviz.sharingmap import SharingMap

            s = SharingMap.from_summary(summarize(create_model(name)))
    # two by two: four columns cut a ResNet's counts to "11,2…" on a laptop-width page
    c1, c2 = st.columns(2)
    c3, c4 = st.columns(2)
    c1.metric("params", f"{s.float_params:,}", help="stored real-valued parameters"
              + (f"; plus {s.mask_params:,} sign-mask bits ({s.mask_params / 8 / 1024:.1f} KiB)" if s.mask_params else ""))
    c2.metric("effective params", f"{s.effective_params:,}")
    c3.metric("compression", f"{s.compression:.2f}×")
    c4.metric("GFLOPs / image", f"{s.flops / 1e9:.3f}")
    reused = s.reused
    if not reused:
        st.info("No weight of this model is applied more than once: it shares nothing "
                f"(effective = unique = {s.unique_params:,} parameters).")
        return
    stored = sum(r.numel for r in reused)
    applied = sum(r.applied for r in reused)
    st.write(sharing_sentence(s, len(reused), stored, applied))
    figure(sharing_map_figure(s), "sharing_map_picture")
    map_rows = [{"parameter": r.param, "stored shape": "x".join(map(str, r.shape)), "reuse": ", ".join(r.kinds),
                 "applications": sum(1 for u in r.uses if u.applied), "applied per stored": round(r.factor, 3),
                 "places": r.places(300), "how": r.describe()} for r in reused]
    st.dataframe(pd.DataFrame(map_rows).sort_values("applied per stored", ascending=False), hide_index=True)
    download_table([{**row, "places": r.places()} for row, r in zip(map_rows, reused)], "sharing_map")  # whole


if label is None and name is None:
    st.caption("The sharing map appears here once a model is chosen.")
else:
    try:
        sharing_map(label, name)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built or loaded is shown, not fatal
        show_error(exc)

# ------------------------------------------------------------------- fair comparison
st.header("Fair comparison")
st.write("Accuracy against parameters and FLOPs for the variants chosen in the sidebar, re-evaluated on "
         "each card's test split, with McNemar's test and Newcombe's paired interval for every pair on the same data, "
         "and for variants that ship several training seeds the test over seeds that checkpoints/REPORT.md uses.")
chosen = chosen_variants(load=False)  # loaded only when asked: the first page stays free of torch

def evaluate_fair(chosen: list[str]) -> dict:
    """Re-evaluate the chosen variants: rows, test-set groups, skipped pairs and paired tests."""
    from wsviz.analysis.stats import fair_comparison, group_by_test_set, pairwise_significance
    from wsviz.concurrency import heavy_slot

    with st.spinner("Re-evaluating…"), heavy_slot():  # long analyses take turns across sessions
        rows = fair_comparison([variants[v] for v in chosen])
    groups, skipped = group_by_test_set(rows)
    return {"chosen": tuple(chosen), "rows": rows, "groups": groups, "skipped": skipped,
            "pairs": pairwise_significance(rows), "seeds": over_seeds(chosen, groups)}


def over_seeds(chosen: list[str], groups) -> list[dict]:
    """Pairs (on one test set) whose variants both ship several training seeds: the report's test over
    seeds (Welch, same function), Holm-adjusted over the pairs shown that could be tested (a pair whose
    seeds show no spread in either variant is not tested and stays out of the family)."""
    from wsviz.analysis.stats import compare_over_seeds, holm
    from wsviz.zoo import seed_accuracies

    accs = {v: seed_accuracies(variants[v]) for v in chosen}
    out = []
    for g in groups:
        for x, i in enumerate(g.rows):
            for j in g.rows[x + 1:]:
                a, b = chosen[i], chosen[j]
                if len(accs[a]) >= 2 and len(accs[b]) >= 2:
                    out.append({"a": a, "b": b, "cmp": compare_over_seeds(accs[a], accs[b])})
    for row, p in zip(out, holm([r["cmp"].p_value for r in out])):
        row["p_holm"] = p
    return out


def show_fair(result: dict) -> None:
    from wsviz.figures import fair_figure

    chosen, rows, groups, skipped, pairs = (list(result["chosen"]), result["rows"], result["groups"],
                                            result["skipped"], result["pairs"])
    test_set = {k: g.label for g in groups for k in g.rows}
    table = [{"name": v, "model": r.model, "test set": test_set[k], "test_set": test_set[k], "accuracy": r.accuracy,
              "params": r.float_params, "effective_params": r.effective_params, "flops": r.flops}
             for k, (v, r) in enumerate(zip(chosen, rows))]
    if len(groups) > 1:
        st.warning(f"These variants were evaluated on {len(groups)} different test sets: "
                   + "; ".join(f"**{g.label}**: {', '.join(chosen[k] for k in g.rows)}" for g in groups)
                   + ". Accuracies are compared only within a test set (one panel each below); "
                   f"{len(skipped)} cross-set pair{'s are' if len(skipped) != 1 else ' is'} not tested.")
    st.dataframe(percent_style([{k: v for k, v in r.items() if k != "test_set"} for r in table], ["accuracy"]),
                 hide_index=True,
                 column_config={"accuracy": st.column_config.NumberColumn("accuracy"),
                                "params": st.column_config.NumberColumn(
                                    "params", format="localized",
                                    help="real-valued parameters, a shared weight counted once; f-RepeatNet's "
                                         "sign masks are bits and not counted here"),
                                "effective_params": st.column_config.NumberColumn("effective params",
                                                                                  format="localized"),
                                "flops": st.column_config.NumberColumn("FLOPs", format="localized")})
    download_table([{k: v for k, v in r.items() if k != "test set"} for r in table], "fair_comparison")
    figure(fair_figure(table, "params"), "fair-params")
    figure(fair_figure(table, "flops"), "fair-flops")
    for g in groups:
        in_group = [p for p in pairs if p.i in g.rows]
        if len(groups) > 1:
            st.markdown(f"**{g.label}**" + ("" if in_group else ": a single variant, nothing to compare"))
        for p in in_group:
            # significance and the sentence are Holm's over the pairs shown (pairwise_significance)
            st.write((":material/check_circle: " if p.comparison.significant else ":material/remove: ")
                     + p.comparison.summary.replace(rows[p.i].name, chosen[p.i]).replace(rows[p.j].name, chosen[p.j]))
    if result.get("seeds"):
        st.markdown("**Over training seeds** (the architectures on this test set, not two trained networks: every "
                    "seed is scored on the same test images, so test-set sampling is not in the interval; Welch's "
                    "t-test on the per-seed test accuracies, as in checkpoints/REPORT.md; McNemar above tests the "
                    "shipped seed-0 networks only)")
        tested = sum(r["cmp"].testable for r in result["seeds"])
        for r in result["seeds"]:
            c = r["cmp"]
            head = (f"{r['a']} {100 * c.mean_a:.1f} ± {100 * c.sd_a:.1f}% (n = {c.n_a}) vs {r['b']} "
                    f"{100 * c.mean_b:.1f} ± {100 * c.sd_b:.1f}% (n = {c.n_b}): diff {100 * c.diff:+.1f} pts")
            if not c.testable:
                st.write(f"{head}; cannot test: {c.reason} (equal runs do not show that runs never vary; left out "
                         "of the Holm adjustment)")
                continue
            st.write(f"{head}, 95% CI, unadjusted [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}]; Welch p = {c.p_value:.2g} "
                     f"(Holm over the {tested} tested: {r['p_holm']:.2g})")
    if skipped:
        with st.expander(f"{len(skipped)} pair{'s' if len(skipped) != 1 else ''} not compared, and why"):
            for sp in skipped:
                st.write(f"- {chosen[sp.i]} vs {chosen[sp.j]}: "
                         + sp.reason.replace(rows[sp.i].name, chosen[sp.i]).replace(rows[sp.j].name, chosen[sp.j]))


def checkpoint_stamps(chosen: list[str]) -> tuple:
    """The chosen variants' files as they are now (modification times and sizes of card and weights, and of
    every seed's predictions the test over seeds reads: ``predictions.npz`` and ``seeds/*/``; None for one
    that is gone): a result evaluated from other files is not theirs."""
    def evidence(folder: str) -> tuple:
        files = [Path(folder) / "predictions.npz", *sorted(Path(folder).glob("seeds/*/predictions.npz"))]
        return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())

    return tuple((_stamp(variants[v]), evidence(variants[v])) if v in variants else None for v in chosen)


# The result stays on the page (session state) until the chosen variants change or one of their
# checkpoints is rewritten (retrained in place): other widgets, downloads and page switches do not
# clear it. The stamps are taken before evaluating, so files rewritten meanwhile also void it.
if len(chosen) >= 1 and st.button("Evaluate the chosen variants"):
    try:
        stamps = checkpoint_stamps(chosen)
        st.session_state["fair-result"] = {**evaluate_fair(chosen), "stamps": stamps}
    except Exception as exc:  # noqa: BLE001 - a checkpoint that cannot be loaded: say which, keep the page
        show_error(exc)
kept = st.session_state.get("fair-result")
if kept is not None and list(kept["chosen"]) == chosen:
    if "stale" not in kept:
        changed = [v for v, old, now in zip(chosen, kept.get("stamps", ()), checkpoint_stamps(chosen)) if old != now]
        if changed or "stamps" not in kept:  # the rows belong to files that are gone: drop them, keep why
            kept = st.session_state["fair-result"] = {"chosen": kept["chosen"], "stale": changed or list(chosen)}
    if "stale" in kept:
        stale = kept["stale"]
        st.caption(f"The checkpoint{'s' if len(stale) != 1 else ''} of {', '.join(plain(v) for v in stale)} "
                   f"{'have' if len(stale) != 1 else 'has'} changed since the last evaluation (retrained or "
                   "replaced): evaluate again to compare them as they are now.")
    else:
        show_fair(kept)
elif kept is not None:
    st.caption("The variants changed since the last evaluation: evaluate again to compare these.")
