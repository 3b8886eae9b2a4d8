"""Kernels: top-k kernels by magnitude side by side, their similarity; ShaRDNet blending layers."""

from __future__ import annotations

import streamlit as st

from pages._shared import chosen_variants, download_table, figure, get_variant, show_error
from wsviz.analysis.kernels import (
    blending_extremes,
    blending_pruning_curve,
    blending_weights,
    kernel_layers,
    kernel_set_similarity,
    layer_weight,
    random_kernel_similarity,
    top_k_kernels,
)
from wsviz.figures import blending_figure, pruning_figure, top_kernels_figure

st.title("Kernels")
st.write("The 2-D kernels with the largest aggregate magnitude (sum of |w|) of a chosen conv layer, as in "
         "Aich et al. Fig. 3/4, for each chosen variant side by side. The similarity score matches the two "
         "sets one-to-one (Hungarian) and averages |cosine|, so sign and order do not matter; it is shown next "
         "to the score of two random kernel sets of the same size.")

variants = chosen_variants()
if not variants:
    st.info("Choose variants in the sidebar.")
    st.stop()

k = st.slider("k (kernels per model)", 16, 256, 64, step=16)
panels, rows = {}, []
cols = st.columns(len(variants))
for col, label in zip(cols, variants):
    try:
        model, card = get_variant(label)
        layers = kernel_layers(model)
        names = [layer.name for layer in layers]
        three = [layer.name for layer in layers if layer.shape[2:] == (3, 3)]
        default = names.index(three[-1]) if three else len(names) - 1
        name = col.selectbox(f"Layer of {label}", names, index=default, key=f"layer-{label}")
        top = top_k_kernels(layer_weight(model, name), k)
        panels[label] = top.kernels
        rows += [{"variant": label, "layer": name, "rank": i + 1, "out": int(o), "in": int(c), "magnitude": float(m)}
                 for i, (o, c, m) in enumerate(zip(top.out_index, top.in_index, top.magnitude))]
        uses = next(layer.uses for layer in layers if layer.name == name)
        col.caption(f"{card['model']} · applied {uses}× per forward pass")
    except Exception as exc:  # noqa: BLE001 - show it, keep the page alive
        show_error(exc)
if panels:
    figure(top_kernels_figure(panels, title=f"Top-{k} kernels"), "top_kernels")
    download_table(rows, "top_kernels")
    labels = list(panels)
    sims = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if panels[a].shape[1:] == panels[b].shape[1:] and len(panels[a]) == len(panels[b]):
                sims.append({"A": a, "B": b, "similarity": round(kernel_set_similarity(panels[a], panels[b]), 4)})
    if sims:
        kk, kh, kw = next(iter(panels.values())).shape
        st.subheader("How alike are the kernel sets?")
        st.dataframe(sims, hide_index=True)
        st.caption(f"Two random Gaussian sets of {kk} {kh}x{kw} kernels score "
                   f"{random_kernel_similarity(kk, kh, kw):.3f} on the same measure.")

st.header("ShaRDNet blending layers")
sl = [v for v in variants if hasattr(get_variant(v)[0], "blending_layers") and get_variant(v)[0].blending_layers()]
if not sl:
    st.info("Choose an SL variant (e.g. scale-shardnet-SL) in the sidebar to see its blending layers.")
else:
    label = st.selectbox("SL variant", sl)
    model, card = get_variant(label)
    n = st.slider("highlight per row (lowest in blue, highest in red)", 1, 32, 8)
    marks = [blending_extremes(w, n) for w in blending_weights(model)]
    figure(blending_figure(marks), "blending")
    if st.button("Compute the pruning curve (accuracy vs pruned blending weights)"):
        from wsviz.data.datasets import load_split

        te = load_split(card["dataset"], "test", seed=card.get("data_seed", 0))
        with st.spinner("Evaluating at each pruning fraction…"):
            curve = blending_pruning_curve(model, te.images, te.labels)
        figure(pruning_figure(curve.fractions, curve.accuracy), "pruning")
        download_table({"fraction": curve.fractions, "accuracy": curve.accuracy}, "pruning")
