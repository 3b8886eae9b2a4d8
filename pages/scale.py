"""Scale: rescale an image live and watch every variant's prediction; full sweeps over a test set."""

from __future__ import annotations

import streamlit as st

from pages._shared import (
    available_variants,
    chosen_variants,
    download_table,
    figure,
    get_variant,
    pick_images,
    show_predictions,
)
from wsviz.analysis.sweeps import layer_scale_invariance, scale_sweep
from wsviz.concurrency import heavy_slot
from wsviz.data.resample import rescale
from wsviz.figures import invariance_figure, sweep_figure

st.title("Scale")
variants = chosen_variants()
if not variants:
    st.info("Choose variants in the sidebar.")
    st.stop()

images = pick_images("scale", multiple=False)


@st.fragment
def live_scale(images, variants) -> None:
    """Only this part reruns when the slider moves: the rest of the page stays as it is."""
    factor = st.slider("Scale factor (about the centre, keeping the input size: the operator the MNIST-scale data is made with)", 0.3, 1.6, 1.0, 0.05)
    if images:
        show_predictions(*images[0], variants, transform=lambda xb: rescale(xb, factor))


live_scale(images, variants)


@st.cache_data(show_spinner=False, max_entries=16)
def run_sweep(labels: tuple[str, ...], dataset: str, n: int, scales: tuple[float, ...]):
    from wsviz.data.datasets import load_split

    te = load_split(dataset, "test").spread(n)
    models = {label: get_variant(label)[0] for label in labels}
    bar = st.progress(0.0, text="Sweeping…")
    with heavy_slot(lambda s: bar.progress(0.0, text=f"Waiting for another session's analysis to finish ({s:.0f} s)…")):  # sweeps take turns across sessions
        res = scale_sweep(models, te.images, te.labels, scales,
                          progress=lambda i, total, v: bar.progress(i / total, text=f"scale {v:.2f}"))
        x = te.images[:64]
        inv = {label: layer_scale_invariance(m, x, 0.5) for label, m in models.items()}
    bar.empty()
    return res, inv


st.header("Sweep over a test set")
c1, c2 = st.columns(2)
dataset = c1.selectbox("Test data", ["mnist5k", "mnist5k-scale", "mnist5k-rot"])
n = c2.slider("Images", 100, 1000, 500, 100)
scales = st.multiselect("Scales", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6],
                        default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4])
if st.button("Run the sweep", type="primary") or st.session_state.get("scale-swept"):
    st.session_state["scale-swept"] = True
    labels = tuple(v for v in variants if v in available_variants())
    res, inv = run_sweep(labels, dataset, n, tuple(sorted(scales)) or (1.0,))
    figure(sweep_figure(res, "accuracy"), "scale-accuracy")
    figure(sweep_figure(res, "agreement", "Agreement with each model's own prediction at scale 1"), "scale-agreement")
    download_table(res.rows(), "scale_sweep")
    figure(invariance_figure(inv), "scale-invariance")
