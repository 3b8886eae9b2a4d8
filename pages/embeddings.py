"""Embeddings: penultimate features projected with PCA, t-SNE or UMAP, coloured by class, angle or scale."""

from __future__ import annotations

import streamlit as st

from pages._shared import available_variants, chosen_variants, download_table, figure, get_variant
from wsviz.analysis.embeddings import penultimate_features, project
from wsviz.concurrency import heavy_slot
from wsviz.figures import embedding_figure

st.title("Embeddings")
options = list(available_variants())
if not options:
    st.info("No checkpoints yet.")
    st.stop()
default = chosen_variants()[:1] or options[:1]
label = st.selectbox("Model", options, index=options.index(default[0]))
c1, c2, c3 = st.columns(3)
dataset = c1.selectbox("Data", ["mnist5k-rot", "mnist5k-scale", "mnist5k"])
method = c2.selectbox("Projection", ["pca", "tsne", "umap"], format_func=str.upper)
color_by = c3.selectbox("Colour by", ["class", "angle", "scale"])
n = st.slider("Points", 200, 1000, 500, 100)


@st.cache_data(show_spinner="Projecting…", max_entries=16)
def embed(label: str, dataset: str, method: str, n: int):
    from wsviz.data.datasets import load_split

    te = load_split(dataset, "test")
    model = get_variant(label)[0]
    with heavy_slot():  # long analyses take turns across sessions
        feats = penultimate_features(model, te.images)
        proj = project(feats, method, max_points=n)
    return proj, te.labels.numpy(), None if te.angles is None else te.angles.numpy(), \
        None if te.scales is None else te.scales.numpy()


try:
    proj, labels, angles, scales = embed(label, dataset, method, n)
    color = {"class": labels, "angle": angles, "scale": scales}[color_by]
    if color is None:
        st.warning(f"{dataset} has no {color_by}; colouring by class.")
        color, color_by = labels, "class"
    color = color[proj.index]
    figure(embedding_figure(proj.coords, color, color_by, f"{label}: {method.upper()} of penultimate features"),
           "embedding")
    if proj.explained_variance is not None:
        st.caption("PCA explained variance: " + ", ".join(f"{100 * v:.1f}%" for v in proj.explained_variance))
    download_table({"index": proj.index, "x": proj.coords[:, 0], "y": proj.coords[:, 1], color_by: color}, "embedding")
except Exception as exc:  # noqa: BLE001
    st.error(str(exc))
