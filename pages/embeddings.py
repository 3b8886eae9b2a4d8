"""Embeddings: the features the classifier head reads (the ``embedding`` tap; each panel says which layer that
is) projected with PCA, t-SNE or UMAP, coloured by class, angle or scale; two variants side by side, aligned
(Procrustes) so their layouts compare."""

from __future__ import annotations

import streamlit as st

from pages._shared import (
    _stamp,
    available_variants,
    chosen_variants,
    download_table,
    figure,
    get_variant,
    no_variants_note,
    plain,
    show_variant_error,
)
from wsviz.analysis.embeddings import align, embedded_layer, penultimate_features, project
from wsviz.concurrency import heavy_slot
from wsviz.data.datasets import dataset_info, dataset_names
from wsviz.errors import WsvizError
from wsviz.figures import embedding_figure
from wsviz.training.cards import evaluation_seed

st.title("Embeddings")
chosen = chosen_variants()  # the sidebar's choice, as on every page
if not chosen:
    st.info(no_variants_note())
    st.stop()
shown = chosen[:2]
if len(chosen) > 2:
    st.caption(f"Showing the first two of the {len(chosen)} variants chosen in the sidebar: {', '.join(shown)}.")
trained_on = {}  # {variant: the dataset its card says it was trained on}
for label in shown:
    try:
        trained_on[label] = get_variant(label)[1].get("dataset")
    except Exception:  # noqa: BLE001 - embed() below says why this variant cannot be used
        pass
unreadable = {}  # {image folder a shown variant trained on: why it cannot be read here}


def readable(name: str) -> bool:
    """A set this page can embed: a known dataset, or an image folder (``folder:PATH``) that is there, under a
    data root, with its class sub-folders (eval_data reads it at the model's size)."""
    if not name.startswith("folder:"):
        return name in dataset_names()
    try:
        dataset_info(name)
    except WsvizError as exc:
        unreadable[name] = str(exc)
        return False
    return True


# the shown variants' own training sets first (the first one's is the default), then the shipped digit sets
options = list(dict.fromkeys([d for d in trained_on.values() if d and readable(d)]
                             + ["mnist5k-rot", "mnist5k-scale", "mnist5k"]))
for name, why in unreadable.items():
    st.warning(plain(f"{', '.join(v for v, d in trained_on.items() if d == name)} was trained on {name}, which "
                     f"cannot be read here: {why}"))
c1, c2, c3 = st.columns(3)
dataset = c1.selectbox("Data", options, help="Test images of this set. It opens on the data the first variant was "
                                            "trained on: features of images from another distribution say less "
                                            "about what the network learned.")
elsewhere = {v: d for v, d in trained_on.items() if d and d != dataset}
if elsewhere:
    st.warning(plain("; ".join(f"{v} was trained on {d}" for v, d in elsewhere.items())
                     + f": these are its features of {dataset} test images, not of the data it learned from."))
method = c2.selectbox("Projection", ["pca", "tsne", "umap"], format_func=str.upper)
color_by = c3.selectbox("Colour by", ["class", "angle", "scale"])
n = st.slider("Points", 200, 1000, 500, 100)


@st.cache_data(show_spinner="Projecting…", max_entries=16)
def embed(label: str, stamp: tuple | None, dataset: str, method: str, n: int, seed: int = 0):
    """Project a seeded subset of ``n`` test images: only those are read and only their features kept
    (the points ``project`` would pick from the whole split, so the picture is the same).

    ``stamp`` (the checkpoint files' modification times and sizes) is part of the cache key only: a
    checkpoint retrained at the same folder is embedded again, not served from the cache. ``seed``: the
    data seed of the test split (the one the variants trained on ``dataset`` held out); an image folder is
    decoded at the model's input size with its card's evaluation transform."""
    import dataclasses

    from wsviz.data.stream import eval_data, sample_indices
    from wsviz.models import input_shape

    model, card = get_variant(label)
    augment = str((card.get("train_config") or {}).get("augment", "none")) if card.get("dataset") == dataset else "none"
    full = eval_data(dataset, "test", size=input_shape(model)[1], augment=augment, seed=seed)
    rows = sample_indices(len(full), n)
    layer = embedded_layer(model).describe()
    with heavy_slot():  # long analyses take turns across sessions
        feats = penultimate_features(model, full.subset(rows))
        proj = project(feats, method, max_points=max(3, len(feats)))
    proj = dataclasses.replace(proj, index=rows[proj.index])  # rows of the whole split, as the colours are
    return proj, layer, full.labels.numpy(), None if full.angles is None else full.angles.numpy(), \
        None if full.scales is None else full.scales.numpy()


if method == "umap":  # a missing package is said once, not blamed on each variant
    import importlib.util

    if importlib.util.find_spec("umap") is None:
        st.error("UMAP needs the package umap-learn: pip install umap-learn (or choose PCA or t-SNE).")
        st.stop()
try:  # one test split for both panels: the one the variants trained on this data held out
    seed = evaluation_seed({v: get_variant(v)[1] for v in trained_on}, dataset)
except WsvizError as exc:
    st.error(str(exc))
    st.stop()
results = {}
for label in shown:
    try:
        results[label] = embed(label, _stamp(available_variants()[label]), dataset, method, n, seed)
    except Exception as exc:  # noqa: BLE001 - a variant that cannot be embedded: say why, go on with the others
        show_variant_error(label, exc)
if not results:
    st.stop()
reference = next(iter(results))
proj0, _, labels, angles, scales = results[reference]
color = {"class": labels, "angle": angles, "scale": scales}[color_by]
if color is None:
    st.warning(f"{dataset} has no {color_by}; colouring by class.")
    color, color_by = labels, "class"
color = color[proj0.index]
cols = st.columns(len(results))
rows = {"index": proj0.index, color_by: color}
for col, (label, (proj, layer, *_)) in zip(cols, results.items()):
    coords, note = proj.coords, ""
    if proj is not proj0:
        al = align(proj0, proj)
        coords = al.coords
        note = al.describe(reference)
    with col:
        figure(embedding_figure(coords, color, color_by, f"{label}: {method.upper()}"), f"embedding-{label}")
        st.caption(layer)
        if proj.explained_variance is not None:
            share = ", ".join(f"{100 * v:.1f}%" for v in proj.explained_variance)
            st.caption(f"PCA explained variance of {label}'s own components: {share}" + (
                " (before the alignment: the rotated axes drawn here are not those components)" if note else ""))
        if note:
            st.caption(note)
    rows[f"{label} x"], rows[f"{label} y"] = coords[:, 0], coords[:, 1]
download_table(rows, "embedding")
