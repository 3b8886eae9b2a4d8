"""Kernels: top-k kernels by magnitude side by side, their similarity; ShaRDNet blending layers."""

from __future__ import annotations

import streamlit as st

from pages._shared import (
    chosen_variants,
    download_table,
    figure,
    get_variant,
    no_variants_note,
    show_error,
    variant_kernel_layers,
    variant_layer_weight,
)
from wsviz.analysis.kernels import (
    NULL_DRAWS,
    NULL_LEVEL,
    blending_extremes,
    blending_pruning_curve,
    blending_weights,
    default_layers,
    kernel_set_comparisons,
    skeleton_groups,
    top_k_kernels,
)
from wsviz.figures import blending_figure, pruning_figure, top_kernels_figure

st.title("Kernels")
st.write("The 2-D kernels with the largest aggregate magnitude (sum of |w|) of a chosen layer, as in "
         "Aich et al. Fig. 3/4, for each chosen variant side by side. By default variants built on one skeleton "
         "(the same kernel layers in the same order) show the same place in it, and a variant of another skeleton, "
         "which has no same place, its own deepest layer; both prefer a shared layer. The similarity score matches the two sets one-to-one "
         "(Hungarian) and averages |cosine|, so sign and order do not matter; it is tested against the scores of "
         f"{NULL_DRAWS} pairs of random kernel sets of the same size and shape.")

variants = chosen_variants()
if not variants:
    st.info(no_variants_note())
    st.stop()

k = st.slider("k (kernels per model)", 16, 256, 64, step=16)
scale = st.radio("Colour scale", ["one scale for all panels (weight values)", "each kernel to its own max (patterns)"],
                 horizontal=True, key="kernel-scale",
                 help="One scale keeps magnitudes comparable across kernels and variants (the ranking is by "
                      "magnitude); the second stretches every kernel to ±1 to show its pattern only.")
distinct = st.checkbox("Each kernel once", True, key="kernel-distinct",
                       help="A tiled layer (RepeatNet) applies each stored kernel at several (out, in) positions, so "
                            "its strongest positions repeat the same kernel; an msws layer shared over rates applies "
                            "each at output channel o and o + out. On: the k strongest different kernels, the table "
                            "saying at how many positions each is applied. Off: the k strongest positions, copies "
                            "included.")
layers, loaded = {}, {}
for label in variants:
    try:
        model, card = get_variant(label)
        layers[label] = variant_kernel_layers(label)
        loaded[label] = (model, card)
    except Exception as exc:  # noqa: BLE001 - show it, keep the page alive
        show_error(exc)
defaults = default_layers(layers)
panels, rows, chosen = {}, [], {}
cols = st.columns(max(1, len(loaded)))
for col, (label, (_model, card)) in zip(cols, loaded.items()):
    try:
        by_name = {layer.name: layer for layer in layers[label]}
        names = list(by_name)
        name = col.selectbox(f"Layer of {label}", names, index=names.index(defaults.get(label, names[-1])),
                             key=f"layer-{label}", format_func=lambda n, b=by_name: b[n].menu_label(),
                             help="Places in forward order. 'shared ×n': its kernels are applied n times per "
                                  "forward pass; 'tiled'/'basis': realised from fewer stored weights.")
        layer = by_name[name]
        top = top_k_kernels(variant_layer_weight(label, name), k, distinct=distinct, applied=layer.applications())
        panels[label] = top.kernels
        chosen[label] = name
        rows += [{"variant": label, "layer": name, "rank": i + 1, "out": int(o), "in": int(c), "magnitude": float(m),
                  "positions": int(n)}
                 for i, (o, c, m, n) in enumerate(zip(top.out_index, top.in_index, top.magnitude, top.copies))]
        col.caption(f"{card['model']} · {layer.describe()}")
        if len(top.kernels) < k:  # the slider asked for more than the layer has
            col.caption(f"{len(top.kernels)} different kernels in this layer, fewer than k = {k}: all are shown."
                        if distinct else
                        f"This layer has {len(top.kernels)} (out, in) positions, fewer than k = {k}: all are shown.")
        if not distinct and top.repeated:
            col.caption(f"{top.repeated} of these {len(top.kernels)} positions repeat a kernel shown at another: "
                        "tick 'Each kernel once' to see different kernels only.")
        elif top.copies.min() > 1 and top.copies.min() == top.copies.max():
            col.caption(f"Each of these {len(top.kernels)} kernels is applied at {int(top.copies[0])} (out, in) "
                        "positions: the layer repeats its stored kernels ('positions' in the table).")
        elif top.copies.max() > 1:
            col.caption(f"{int((top.copies > 1).sum())} of these {len(top.kernels)} kernels are applied at several "
                        f"positions (up to {int(top.copies.max())}): see 'positions' in the table.")
    except Exception as exc:  # noqa: BLE001 - show it, keep the page alive
        show_error(exc)
if panels:
    position = {v: [layer.name for layer in layers[v]].index(n) for v, n in chosen.items()}

    def where(v: str) -> str:
        layer = next(x for x in layers[v] if x.name == chosen[v])
        return (f"{v}: `{chosen[v]}` (kernel layer {position[v] + 1} of {len(layers[v])}, "
                f"{layer.depth} convolution{'s' if layer.depth != 1 else ''} deep)")

    groups = skeleton_groups({v: layers[v] for v in chosen})
    if len(groups) > 1:
        st.warning("These variants are built on different skeletons (their kernel layers differ in number, order, "
                   "module paths or kernel sizes): " + " | ".join(", ".join(g) for g in groups) + ". A layer of one "
                   "is not the same place as any layer of another: the panels do not compare like for like. By "
                   "default each shows its deepest layer (the most convolutions on the path from the input) among "
                   "its shared layers of 3x3 or more, or among all of 3x3 or more when none is shared. Shown: "
                   + "; ".join(where(v) for v in chosen) + ".")
    for g in (g for g in groups if len(g) > 1):
        if len({position[v] for v in g}) > 1:
            st.warning(f"{', '.join(g)} share a skeleton, but their panels show different places in it: "
                       + "; ".join(where(v) for v in g) + ".")
        else:
            renamed = " (under different module paths)" if len({chosen[v] for v in g}) > 1 else ""
            st.caption(f"{', '.join(g)} share a skeleton (the same kernel layers in the same order): their panels "
                       f"show the same place{renamed}, kernel layer {position[g[0]] + 1} of {len(layers[g[0]])}.")
    what = "different kernels" if distinct else "kernels"
    if all(len(p) == k for p in panels.values()):
        title = f"Top-{k} {what}"
    else:  # a layer with fewer than k shows all it has: the title says how many each panel holds
        title = f"Top {what} by magnitude, k = {k}: " + ", ".join(
            f"{v} {len(p)}" + (" (all it has)" if len(p) < k else "") for v, p in panels.items())
    figure(top_kernels_figure({f"{v} · {chosen[v]}": p for v, p in panels.items()}, title=title,
                              scale="shared" if scale.startswith("one") else "per_kernel"), "top_kernels")
    with st.expander("The kernels shown, as a table (rank, (out, in) position, magnitude, positions)"):
        st.dataframe(rows, hide_index=True, column_config={
            "out": st.column_config.NumberColumn(help="Output channel of the kernel (its first position with "
                                                      "'Each kernel once')."),
            "positions": st.column_config.NumberColumn(
                help="(out, in) positions at which this kernel is applied at this place in one forward pass, every "
                     "application counted (RepeatNet's tiles, both rates of a shared msws layer); 1 = once. Its "
                     "uses at other places are in the layer's line above the figure.")})
    download_table(rows, "top_kernels")
    with st.spinner(f"Scoring {NULL_DRAWS} pairs of random kernel sets (once per size)…"):
        sims = kernel_set_comparisons(panels)
    if sims:
        st.subheader("How alike are the kernel sets?")
        st.dataframe(sims, hide_index=True)
        st.caption("Similarity: mean |cosine| of the best one-to-one matching (1 = the same set up to sign and "
                   "order) of the strongest kernels both panels have ('kernels compared': the smaller panel's "
                   f"count). Unrelated sets do not score 0: {NULL_DRAWS} pairs of independent Gaussian sets of the "
                   "same size and kernel shape give the null distribution, whose mean is 'two random sets' and "
                   "whose 95th percentile is 'random, 95th percentile'. 'More alike than chance' is a one-sided "
                   f"test at level {NULL_LEVEL:g}: the score is above that percentile, i.e. p (the share of random pairs "
                   f"scoring at least as high, counting the score itself) is at most {NULL_LEVEL:g}, so two "
                   "unrelated random sets are called alike about 1 time in 20. Otherwise the two sets show no more "
                   "shared structure than chance would give. The null is isotropic Gaussian kernels: two trained "
                   "layers with the same generic structure (e.g. smooth kernels) can beat it without being related.")

st.header("ShaRDNet blending layers")
sl = [v for v in variants if hasattr(get_variant(v)[0], "blending_layers") and get_variant(v)[0].blending_layers()]
if not sl:
    st.info("Choose an SL variant (e.g. scale-shardnet-SL) in the sidebar to see its blending layers.")
else:
    label = st.selectbox("SL variant", sl)
    model, card = get_variant(label)
    weights = blending_weights(model)
    most = max(1, min(w.shape[1] // 2 for w in weights))  # each side holds at most half a row
    n = st.slider("highlight per row (lowest in blue, highest in red)", 1, most, min(8, most),
                  help=f"at most {most}: half of a row's {2 * most} inputs on each side")
    marks = [blending_extremes(w, n) for w in weights]
    figure(blending_figure(marks, weights=weights, n=n), "blending")
    if st.button("Compute the pruning curve (accuracy vs pruned blending weights)"):
        from wsviz.data.stream import model_sample
        from wsviz.training.cards import evaluation_transform

        x, y, _ = model_sample(card["dataset"], "test", model, seed=card.get("data_seed", 0),
                               augment=evaluation_transform(card))
        with st.spinner("Evaluating at each pruning fraction…"):
            curve = blending_pruning_curve(model, x, y)
        figure(pruning_figure(curve.fractions, curve.accuracy), "pruning")
        download_table({"fraction": curve.fractions, "accuracy": curve.accuracy}, "pruning")
