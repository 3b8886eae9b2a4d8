"""Rotation: Rot-MNIST accuracy vs angle for CNN, RepeatNet and e2cnn models; one image under rotation."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages._shared import (
    available_variants,
    background_result,
    chosen_variants,
    download_table,
    figure,
    get_variant,
    pick_images,
    prepared,
    run_in_background,
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

ROT_ZOO = ("rot-cnn", "rot-repeat-swish-c8", "rot-steerable-c8")


def use_rotation_zoo() -> None:
    st.session_state["variants"] = [v for v in ROT_ZOO if v in available_variants()]


chosen = chosen_variants()  # the sidebar's choice, as on every page
if not any(v.startswith("rot-") for v in chosen):
    st.info("None of the variants chosen in the sidebar was trained on rotated digits (the rot-* zoo); they are "
            "compared all the same, but the Table 4 question needs the rotation zoo.")
    st.button("Compare the rotation zoo instead: " + ", ".join(ROT_ZOO), on_click=use_rotation_zoo)
if not chosen:
    st.info("Choose variants in the sidebar.")
    st.stop()


def run_sweep(progress, models: dict, n: int, angles: tuple[float, ...]):
    """The rotation sweep, in a worker thread (``progress(fraction, text)``), read in batches; known
    predictions come from the prediction cache."""
    from wsviz.analysis.cache import default_cache
    from wsviz.data.stream import eval_data

    data = eval_data("mnist5k", "test", limit=n)
    with heavy_slot(lambda s: progress(0.0, f"waiting for another session's analysis ({s:.0f} s)")):
        return rotation_sweep(models, data, angles=angles, cache=default_cache(),
                              progress=lambda done, total, text: progress(done / max(total, 1), text))


st.caption("The sweep runs in the background: the rest of the page keeps answering, and it can be cancelled.")
n = st.slider("Test digits", 100, 1000, 300, 100)
step = st.select_slider("Angle step (degrees)", [5, 10, 15, 22.5, 30, 45], value=15)
key = (tuple(chosen), n, tuple(float(a) for a in np.arange(0, 360 + 1e-9, step)))
if st.button("Run the rotation sweep", type="primary"):  # only the button starts one
    run_in_background("rot-work", key, run_sweep, {v: get_variant(v)[0] for v in chosen}, *key[1:])
res = background_result("rot-work", key, "rotation sweep")
if res is not None:
    figure(sweep_figure(res, "accuracy", "Accuracy vs rotation of the upright test digits"), "rot-accuracy")
    mean = [{"model": m, "mean accuracy over angles": float(np.mean(a))} for m, a in res.accuracy.items()]
    st.dataframe(sorted(mean, key=lambda r: -r["mean accuracy over angles"]), hide_index=True,
                 column_config={"mean accuracy over angles": st.column_config.NumberColumn(format="percent")})
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
