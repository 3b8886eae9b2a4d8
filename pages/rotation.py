"""Rotation: Rot-MNIST accuracy vs angle for CNN, RepeatNet and e2cnn models; one image under rotation."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages._shared import (
    available_variants,
    download_table,
    figure,
    get_variant,
    pick_images,
    prepared,
    show_error,
    show_predictions,
)
from wsviz.analysis.sweeps import rotation_sweep, single_image_stability
from wsviz.concurrency import heavy_slot
from wsviz.data.digits import rotate
from wsviz.figures import stability_figure, sweep_figure

st.title("Rotation")
st.write("RepeatNet's Table 4 asks how much of a rotation-equivariant model's gain comes from weight "
         "repetition alone. The rotation zoo holds a plain CNN, RepeatNet variants matched in inference FLOPs "
         "to e2cnn's steerable C4 / C8 / C16 models, and those models (all at a quarter of the paper's width).")

all_variants = list(available_variants())
rot = [v for v in all_variants if v.startswith("rot-")]
default = [v for v in ("rot-cnn", "rot-repeat-swish-c8", "rot-steerable-c8") if v in all_variants]
chosen = st.multiselect("Models", all_variants, default=default or rot[:3], key="rot-models")
if not chosen:
    st.info("Choose at least one model.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=16)
def run_sweep(labels: tuple[str, ...], n: int, angles: tuple[float, ...]):
    from wsviz.data.datasets import load_split

    te = load_split("mnist5k", "test").spread(n)
    models = {label: get_variant(label)[0] for label in labels}
    bar = st.progress(0.0, text="Rotating…")
    with heavy_slot(lambda s: bar.progress(0.0, text=f"Waiting for another session's analysis to finish ({s:.0f} s)…")):  # sweeps take turns across sessions
        res = rotation_sweep(models, te.images, te.labels, angles,
                             progress=lambda i, total, v: bar.progress(i / total, text=f"{v:.0f}°"))
    bar.empty()
    return res


n = st.slider("Test digits", 100, 1000, 300, 100)
step = st.select_slider("Angle step (degrees)", [5, 10, 15, 22.5, 30, 45], value=15)
if st.button("Run the rotation sweep", type="primary") or st.session_state.get("rot-swept"):
    st.session_state["rot-swept"] = True
    try:
        res = run_sweep(tuple(chosen), n, tuple(np.arange(0, 360 + 1e-9, step)))
    except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint that cannot be loaded: say which, keep the page
        show_error(exc)
        st.stop()
    figure(sweep_figure(res, "accuracy", "Accuracy vs rotation of the upright test digits"), "rot-accuracy")
    mean = [{"model": m, "mean accuracy over angles": float(np.mean(a))} for m, a in res.accuracy.items()]
    st.dataframe(sorted(mean, key=lambda r: -r["mean accuracy over angles"]), hide_index=True)
    download_table(res.rows(), "rotation_sweep")

st.header("One image under rotation")
images = pick_images("rotation", multiple=False)


@st.fragment
def live_rotation(images, chosen) -> None:
    """Only this part reruns when the slider moves."""
    angle = st.slider("Angle", 0, 359, 0, 1)
    if images:
        show_predictions(*images[0], chosen, transform=lambda xb: rotate(xb, float(angle)))


live_rotation(images, chosen)
if images:
    name, data = images[0]
    label = st.selectbox("Stability over all angles for", chosen)
    try:
        model, _ = get_variant(label)
        x = prepared(name, data, model)
        if x is not None:
            figure(stability_figure(single_image_stability(model, x, list(range(0, 360, 10)), "angle")),
                   "rot-stability")
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
