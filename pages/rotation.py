"""Rotation: Rot-MNIST accuracy vs angle for CNN, RepeatNet and e2cnn models; one image under rotation."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages._shared import (
    CHECKPOINTS,
    _stamp,
    available_variants,
    background_result,
    chosen_variants,
    download_table,
    explain_inputs,
    figure,
    get_variant,
    no_variants_note,
    percent_style,
    pick_images,
    plain,
    prepared,
    refused_checkpoints,
    run_in_background,
    show_error,
    show_predictions,
    show_variant_error,
)
from wsviz.analysis.rotation import flops_matches, rotation_summary
from wsviz.analysis.sweeps import model_label_mismatch, rotation_sweep, single_image_stability
from wsviz.concurrency import heavy_slot
from wsviz.data.digits import rotate
from wsviz.errors import WsvizError
from wsviz.figures import stability_figure, sweep_figure

st.title("Rotation")
st.write("RepeatNet's Table 4 asks how much of a rotation-equivariant model's gain comes from weight "
         "repetition alone. The rotation zoo holds a plain CNN, RepeatNet variants sized towards the inference "
         "FLOPs of e2cnn's steerable C4 / C8 / C16 models, and those models (all at a quarter of the paper's "
         "width, where the sizes round: the table below gives each chosen model's parameters and FLOPs as "
         "wsviz counts them, and how far each RepeatNet variant is from its steerable model).")

ROT_ZOO = ("rot-cnn", "rot-repeat-swish-c8", "rot-steerable-c8")


def use_rotation_zoo() -> None:
    usable, refused = available_variants(), refused_checkpoints()
    st.session_state["variants"] = [v for v in ROT_ZOO if v in usable]
    st.session_state["rot-zoo-left-out"] = {
        v: refused.get(v, f"there is no checkpoint {v} in {CHECKPOINTS} (or among the finished runs)")
        for v in ROT_ZOO if v not in usable}


def say_left_out() -> None:
    """Each rotation-zoo checkpoint the button could not put in the sidebar, and why (said once)."""
    for v, why in st.session_state.pop("rot-zoo-left-out", {}).items():
        st.warning(f"{plain(v)} is left out of the rotation zoo: {plain(why)}", icon=":material/warning:")


@st.cache_data(show_spinner="Counting parameters and FLOPs…", max_entries=64)
def model_costs(label: str, path: str, stamp: tuple | None) -> dict:
    """Parameters and FLOPs of a checkpoint as :func:`wsviz.models.summarize` counts them (cached per
    checkpoint folder and its files' stamp, so a retrained checkpoint is counted again)."""
    from wsviz.models import summarize

    model, card = get_variant(label)
    s = summarize(model)
    return {"card": {"model": card.get("model"), "config": dict(card.get("config") or {})},
            "row": {"model": label, "params": s.float_params, "effective params": s.effective_params,
                    "FLOPs per image": s.flops}}


def show_costs(chosen: list[str]) -> None:
    costs = {}
    for label in chosen:
        try:
            path = available_variants()[label]
            costs[label] = model_costs(label, path, _stamp(path))
        except Exception as exc:  # noqa: BLE001 - the others are still counted
            show_variant_error(label, exc)
    if not costs:
        return
    st.dataframe([c["row"] for c in costs.values()], hide_index=True,
                 column_config={"params": st.column_config.NumberColumn(format="localized"),
                                "effective params": st.column_config.NumberColumn(format="localized"),
                                "FLOPs per image": st.column_config.NumberColumn(format="localized")})
    matches = flops_matches({k: c["card"] for k, c in costs.items()},
                            {k: c["row"]["FLOPs per image"] for k, c in costs.items()})
    for m in matches:
        st.caption(m.sentence())
    if not matches:
        st.caption("No chosen RepeatNet variant faces a chosen steerable model of the group it was sized to, so "
                   "no FLOPs match is claimed.")


chosen = chosen_variants()  # the sidebar's choice, as on every page
if not any(v.startswith("rot-") for v in chosen):
    st.info("None of the variants chosen in the sidebar was trained on rotated digits (the rot-* zoo); they are "
            "compared all the same, but the Table 4 question needs the rotation zoo.")
    st.button("Compare the rotation zoo instead: " + ", ".join(ROT_ZOO), on_click=use_rotation_zoo)
say_left_out()
if not chosen:
    st.info(no_variants_note())
    st.stop()
show_costs(chosen)


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
angles = tuple(float(a) for a in np.arange(0, 360 + 1e-9, step))
paths = available_variants()


def comparable(label: str) -> bool:
    """Whether the test digits' labels can score ``label`` (a model of other classes is left out, said)."""
    try:
        model, card = get_variant(label)
    except Exception:  # noqa: BLE001 - not loadable: the table above and the button say why
        return True
    why = model_label_mismatch(model, card, "mnist5k")
    if why:  # other classes, or digits it was trained on: an accuracy on them would mean nothing
        st.warning(f"{plain(label)} is left out of the sweep: the mnist5k test digits cannot score it "
                   f"({plain(why)}).", icon=":material/warning:")
    return not why


def sweep_key(labels) -> tuple:
    """The result's inputs, the checkpoints' content among them: one retrained in place is swept again."""
    return (tuple(labels), n, angles, tuple(_stamp(paths[v]) if v in paths else None for v in labels))


key = sweep_key([v for v in chosen if comparable(v)])
if st.button("Run the rotation sweep", type="primary"):  # only the button starts one
    models = {}
    for v in key[0]:
        try:
            models[v] = get_variant(v)[0]
        except Exception as exc:  # noqa: BLE001 - e.g. its files went since the page loaded: said, not dropped
            st.warning(f"{plain(v)} is left out of the sweep: "
                       f"{plain(exc if isinstance(exc, WsvizError) else f'{type(exc).__name__}: {exc}')}",
                       icon=":material/warning:")
    if models:  # a checkpoint left out is listed as refused from now on, so the page's choice is this one
        key = sweep_key(models)
        run_in_background("rot-work", key, run_sweep, models, n, angles)
res = background_result("rot-work", key, "rotation sweep")
if res is not None:
    figure(sweep_figure(res, "accuracy", "Accuracy vs rotation of the upright test digits"), "rot-accuracy")
    summary = rotation_summary(res)
    st.caption(f"{res.samples:,} mnist5k test digits, the same at every angle; each variant's own weights (for the "
               "zoo, seed 0: checkpoints/REPORT.md gives the mean over 3 seeds). Bars: each point's 95% Wilson "
               "interval over the digits; the points share their digits, so they are not independent, and two "
               "angles whose intervals overlap are not told apart. "
               f"Table: over the {summary[0].angles} distinct angles (360° is 0°: drawn to close the curve, counted "
               "once); 'worst angle' is the first of 'angles tied at the worst'. Agreement: the share of digits "
               "predicted as at 0°, averaged over the other angles.")
    st.dataframe(percent_style([s.row() for s in summary], ["mean accuracy", "accuracy at the worst angle",
                                                            "agreement with 0° (mean over the other angles)"]),
                 hide_index=True, column_config={"worst angle": st.column_config.NumberColumn(format="%.1f°")})
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
    explain_inputs(name, data, chosen)
    label = st.selectbox("Stability over all angles for", chosen)
    try:
        model, card = get_variant(label)
        x = prepared(name, data, model, card=card)
        if x is not None:
            figure(stability_figure(single_image_stability(model, x, list(range(0, 360, 10)), "angle")),
                   "rot-stability")
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
