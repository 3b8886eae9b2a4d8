"""Scale: rescale an image live and watch every variant's prediction; full sweeps over a test set."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from pages._shared import (
    _stamp,
    available_variants,
    background_result,
    chosen_variants,
    download_table,
    explain_inputs,
    figure,
    get_variant,
    no_variants_note,
    pick_images,
    plain,
    run_in_background,
    show_predictions,
)
from wsviz.analysis.sweeps import invariance_per_model, model_label_mismatch, scale_sweep
from wsviz.concurrency import heavy_slot
from wsviz.data.resample import rescale
from wsviz.data.stream import split_fingerprint
from wsviz.errors import WsvizError
from wsviz.figures import invariance_figure, sweep_figure
from wsviz.training.cards import evaluation_seed, shared_evaluation_transform

st.title("Scale")
variants = chosen_variants()
if not variants:
    st.info(no_variants_note())
    st.stop()

images = pick_images("scale", multiple=False)


@st.fragment
def live_scale(images, variants) -> None:
    """Only this part reruns when the slider moves: the rest of the page stays as it is."""
    factor = st.slider("Scale factor", 0.3, 1.6, 1.0, 0.05,
                       help="About the image centre, keeping the input size: the operator the MNIST-scale data is "
                            "made with (wsviz.data.resample).")
    if images:
        show_predictions(*images[0], variants, transform=lambda xb: rescale(xb, factor))


live_scale(images, variants)
if images:
    explain_inputs(*images[0], variants)


def run_sweep(progress, models: dict, dataset: str, n: int, scales: tuple[float, ...], blind: dict[str, str],
              seed: int = 0, augment: str = "none"):
    """The sweep and the per-layer invariance, in a worker thread (``progress(fraction, text)``).

    The test data are read in batches (an image folder is decoded image by image, never whole);
    predictions known from an earlier sweep or comparison come from the prediction cache. ``blind``:
    {model: why the data's labels are not its classes}; those models get no accuracy (NaN), only agreement.
    ``seed``: the data seed of the test split (the one the models trained on ``dataset`` held out);
    ``augment``: the preset whose evaluation transform their training tested them with (an image folder
    trained with ``imagenet`` is resized to 8/7 and centre-cropped, not letterboxed: scale 1 is its own)."""
    import numpy as np

    from wsviz.analysis.cache import default_cache
    from wsviz.data.stream import eval_data, take
    from wsviz.models import input_shape

    data = eval_data(dataset, "test", size=max(input_shape(m)[1] for m in models.values()), limit=n, seed=seed,
                     augment=augment)
    with heavy_slot(lambda s: progress(0.0, f"waiting for another session's analysis ({s:.0f} s)")):
        res = scale_sweep(models, data, scales=scales, cache=default_cache(),
                          progress=lambda done, total, text: progress(0.9 * done / max(total, 1), text))
        for label in blind:
            res.accuracy[label] = np.full(len(res.values), np.nan)
        x, _ = take(data, invariance_sample(len(data)))
        # one model at a time, each checked for Cancel; a model without level/stage outputs, or whose
        # measurement fails, is named, not fatal to the finished sweep or to the other models
        inv, skipped, failed = invariance_per_model(
            models, x, 0.5, progress=lambda i, total, label: progress(
                0.9 + 0.1 * i / max(total, 1), f"per-layer invariance at 0.5{': ' + label if label else ''}"))
    return res, inv, skipped, failed, blind, len(x)


def invariance_sample(n: int, k: int = 64) -> list[int]:
    """``k`` indices spread evenly over a set of ``n`` (test sets are often sorted by class: the first
    64 of the digits are all zeros and ones)."""
    import numpy as np

    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


st.header("Sweep over a test set")
st.caption("Each variant's own weights (for the zoo, seed 0: checkpoints/REPORT.md gives the mean over 3 seeds) on "
           "test images rescaled by each factor with the operator above, about the centre at the input size. "
           "mnist5k-scale is already rescaled by 0.3-1.0, so the factors compound there; factors over 1 crop the "
           "digit. The sweep runs in the background: the slider above keeps answering, and it can be cancelled.")
c1, c2 = st.columns(2)
dataset = c1.selectbox("Test data", ["mnist5k", "mnist5k-scale", "mnist5k-rot"])
folder = c1.text_input("Or an image folder", "", placeholder="/data/imagenet",
                       help="One sub-folder per class (or ImageNet's train/ + val/ layout), under WSVIZ_DATA_ROOTS; "
                            "read image by image, never loaded whole.")
dataset = f"folder:{folder.strip()}" if folder.strip() else dataset
n = c2.slider("Images", 100, 1000, 500, 100)
scales = st.multiselect("Scales", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6],
                        default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4])
chosen = available_variants()
labels = tuple(v for v in variants if v in chosen)
if not scales:  # a sweep over no scale would be the identity alone: 100% agreement by definition
    st.info("Choose at least one scale.")
    st.stop()
cards = {v: get_variant(v)[1] for v in labels}
try:  # the test split the variants trained on this data held out (a folder's other seeds overlap training)
    seed = evaluation_seed(cards, dataset)
except WsvizError as exc:
    st.error(str(exc))
    st.stop()
# the input each variant's training was tested on (its key: the cards, stamped below, and the dataset)
augment, mixed = shared_evaluation_transform(cards, dataset)
# the checkpoints' content stamps (a checkpoint retrained or overwritten in place is a new sweep), and an
# image folder's files (images replaced or added since are a new sweep too)
key = (labels, dataset, n, tuple(sorted(scales)), tuple(_stamp(chosen[v]) for v in labels),
       split_fingerprint(dataset, "test", seed))
if st.button("Run the sweep", type="primary"):  # only the button starts one
    loaded = {v: get_variant(v) for v in labels}
    blind = {v: why for v, (m, card) in loaded.items() if (why := model_label_mismatch(m, card, dataset))}
    run_in_background("scale-work", key, run_sweep, {v: m for v, (m, _) in loaded.items()}, *key[1:4], blind, seed,
                      augment)
result = background_result("scale-work", key, "scale sweep")
if result is not None:
    res, inv, skipped, failed, blind, n_inv = result
    if mixed:
        st.warning(plain(mixed[:1].upper() + mixed[1:]))
    st.caption(f"{res.samples:,} test images of {dataset}"
               + (f" (its test split has no more than that; {n:,} were asked for)" if res.samples < n else "")
               + (f", the split of data seed {seed}" if seed else "") + ", the same at every scale. Bars: each "
               "accuracy's 95% Wilson interval over the images; the points share their images, so they are not "
               "independent.")
    for m, why in blind.items():  # labels it never learned (0% means nothing), or its own training images
        st.warning(plain(f"{dataset} cannot score {m}: agreement only. {why[:1].upper()}{why[1:]}."))
    scored = {m: a for m, a in res.accuracy.items() if m not in blind}
    if scored:
        figure(sweep_figure(replace(res, accuracy=scored), "accuracy"), "scale-accuracy")
    figure(sweep_figure(res, "agreement", "Agreement with each model's own prediction at scale 1"), "scale-agreement")
    download_table(res.rows(), "scale_sweep")
    if inv:
        st.caption(f"Per-layer invariance on {n_inv} of the images spread over the set: each level's features for the "
                   "image rescaled by 0.5, against its features rescaled by 0.5, both less the level's answer to a "
                   "blank image (the border a shrunk image leaves is blank, and a network answers it with its "
                   "biases, not with 0). 0 = the level commutes with rescaling.")
        figure(invariance_figure(inv), "scale-invariance")
    if skipped:
        st.info(f"No per-layer invariance for {', '.join(skipped)}: no level or stage outputs to compare.")
    for m, why in failed.items():
        st.warning(plain(f"No per-layer invariance for {m}: {why}"))
