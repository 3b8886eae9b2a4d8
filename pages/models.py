"""Models: the registered zoo with parameters, effective parameters and FLOPs."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages._shared import available_variants, chosen_variants, download_table, figure, get_variant, show_error
from wsviz.analysis.zoo import spec_row, zoo_table
from wsviz.models import create_model, get_spec, list_models, summarize

st.title("Model zoo")
st.write(
    "Every architecture wsviz can build, exact to its paper. **Unique** parameters are the "
    "weights stored (a shared weight counts once); **effective** parameters are the weights the "
    "network applies, each use counted (what it would hold unshared). FLOPs are torch's count for "
    "one image at the model's input size (a multiply-add is 2 FLOPs)."
)

families = sorted({s.family for s in list_models()})
chosen = st.multiselect("Families", families, default=families, key="families")


@st.cache_data(show_spinner=False, persist="disk")
def _table(family: str) -> list[dict]:
    return zoo_table(list_models(family))


table = st.empty()
if chosen:
    # The registry itself is instant; counting builds every model (the first time only:
    # results are cached on disk), so show the list first and fill in the numbers.
    table.dataframe(pd.DataFrame([spec_row(s) for s in list_models() if s.family in chosen])
                    [["name", "family", "input", "classes", "defaults", "paper"]], hide_index=True)
rows: list[dict] = []
bar = st.progress(0.0, text="Counting parameters and FLOPs…") if chosen else None
for i, fam in enumerate(chosen):
    if bar is not None:
        bar.progress(i / len(chosen), text=f"Counting parameters and FLOPs: {fam}…")
    rows += _table(fam)
if bar is not None:
    bar.empty()

if rows:
    df = pd.DataFrame(rows)
    cols = ["name", "family", "input", "classes", "unique_params", "effective_params", "compression",
            "gflops", "sign_mask_params", "defaults", "paper"]
    table.dataframe(
        df[cols], hide_index=True,
        column_config={
            "unique_params": st.column_config.NumberColumn("unique params", format="localized"),
            "effective_params": st.column_config.NumberColumn("effective params", format="localized"),
            "compression": st.column_config.NumberColumn("effective / unique", format="%.2f×"),
            "gflops": st.column_config.NumberColumn("GFLOPs", format="%.3f"),
            "sign_mask_params": st.column_config.NumberColumn(
                "of which 1-bit sign masks", format="localized",
                help="f-RepeatNet trains its sign masks through real latent tensors; only their signs are kept."),
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
    from wsviz.training.checkpoint import read_card

    vrows = []
    for label, path in variants.items():
        c = read_card(path)
        vrows.append({"variant": label, "model": c["model"], "family": c.get("family"), "dataset": c.get("dataset"),
                      "test acc %": round(100 * (c.get("test_accuracy") or float("nan")), 2),
                      "unique params": c.get("unique_params"), "effective params": c.get("effective_params"),
                      "compression": round(c.get("effective_params", 0) / max(c.get("unique_params", 1), 1), 2),
                      "MFLOPs": round(c.get("flops", 0) / 1e6, 1), "epochs": c.get("epochs_done")})
    st.dataframe(pd.DataFrame(vrows), hide_index=True)
    download_table(vrows, "variants")
else:
    st.info("No trained variants found in checkpoints/ (run `python -m wsviz.zoo retrain`) or in finished runs.")

# ------------------------------------------------------------------------ sharing map
st.header("Sharing map")
st.write("For every weight a model applies more than once: where, how often, and at what shape. "
         "Traced from one forward pass, so it shows what the network really does.")
source = st.radio("Model", ["a trained variant", "a registered architecture"], horizontal=True)
try:
    if source == "a trained variant" and variants:
        label = st.selectbox("Variant", list(variants), key="map-variant")
        model = get_variant(label)[0]
    else:
        name = st.selectbox("Architecture", [s.name for s in list_models()], key="map-arch",
                            index=[s.name for s in list_models()].index("shardnet_vgg"))
        st.caption(get_spec(name).description)
        model = create_model(name)
    s = summarize(model)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("unique params", f"{s.unique_params:,}")
    c2.metric("effective params", f"{s.effective_params:,}")
    c3.metric("compression", f"{s.compression:.2f}×")
    c4.metric("GFLOPs / image", f"{s.flops / 1e9:.3f}")
    shared = s.shared_params()
    map_rows = [{"parameter": p, "shape": "x".join(map(str, dict(model.named_parameters())[p].shape)),
                 "uses": len(us), "sites": ", ".join(sorted({u.site for u in us}))[:300],
                 "how": "; ".join(sorted({u.detail for u in us if u.detail}))[:200],
                 "derived": any(u.derived for u in us)} for p, us in shared.items()]
    if map_rows:
        st.dataframe(pd.DataFrame(map_rows).sort_values("uses", ascending=False), hide_index=True)
        download_table(map_rows, "sharing_map")
    else:
        st.info("No weight of this model is applied more than once: it shares nothing.")
except Exception as exc:  # noqa: BLE001
    show_error(exc)

# ------------------------------------------------------------------- fair comparison
st.header("Fair comparison")
st.write("Accuracy against unique parameters and FLOPs for the variants chosen in the sidebar, re-evaluated on "
         "each card's test split, with McNemar's test and a paired bootstrap CI for every pair on the same data.")
chosen = chosen_variants()
if len(chosen) >= 1 and st.button("Evaluate the chosen variants"):
    from wsviz.analysis.stats import fair_comparison, pairwise_significance
    from wsviz.figures import fair_figure

    with st.spinner("Re-evaluating…"):
        rows = fair_comparison([variants[v] for v in chosen])
    table = [{"name": v, "model": r.model, "dataset": r.dataset, "accuracy": r.accuracy,
              "unique_params": r.unique_params, "effective_params": r.effective_params, "flops": r.flops}
             for v, r in zip(chosen, rows)]
    st.dataframe(table, hide_index=True)
    figure(fair_figure(table, "unique_params"), "fair-params")
    figure(fair_figure(table, "flops"), "fair-flops")
    for p in pairwise_significance(rows):
        st.write(("✅ " if p.comparison.significant else "➖ ") + p.comparison.summary.replace(rows[p.i].name, chosen[p.i])
                 .replace(rows[p.j].name, chosen[p.j]) + f" (Holm-adjusted p = {p.p_holm:.2g})")
