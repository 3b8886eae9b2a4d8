"""Compare on images: predictions, feature maps per rate / stage / iteration / level, attributions."""

from __future__ import annotations

import streamlit as st

from pages._shared import chosen_variants, figure, get_variant, pick_images, prepared, show_error, show_predictions
from wsviz.analysis.attribution import METHODS, attribute, cam_candidates, default_cam_layer
from wsviz.analysis.features import feature_maps
from wsviz.figures import attribution_figure, feature_maps_figure
from wsviz.models.taps import list_taps

st.title("Compare on images")
variants = chosen_variants()
if not variants:
    st.info("Choose variants in the sidebar.")
    st.stop()

images = pick_images("compare")
if not images:
    st.info("Upload an image or pick a sample.")
    st.stop()

rows = []
for name, data in images:
    st.subheader(name)
    rows += show_predictions(name, data, variants)
if rows:
    st.dataframe(rows, hide_index=True)

st.header("Feature maps")
kinds = sorted({t.kind for v in variants for t in list_taps(get_variant(v)[0])} - {"embedding"})
KIND_LABELS = {"per dilation rate": "rate", "per WSMS stage": "stage", "per shared-conv iteration": "iteration",
               "per stage of blocks / level": "level"}
shown = [label for label, k in KIND_LABELS.items() if k in kinds]
kind = KIND_LABELS[st.radio("Named outputs", shown, horizontal=True)] if shown else "level"
name, data = images[0]
inputs = {}  # the first image as each variant's input, decoded once for both sections below
for label in variants:
    x = prepared(name, data, get_variant(label)[0])
    if x is not None:
        inputs[label] = x
for label, x in inputs.items():
    model, _ = get_variant(label)
    try:
        maps = feature_maps(model, x, kinds=[kind])
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
        continue
    if not maps:
        st.caption(f"{label} has no '{kind}' outputs.")
        continue
    figure(feature_maps_figure(maps[:24], title=f"{label}: channel-mean of each {kind} output (first 24)"),
           f"maps-{label}-{kind}")

st.header("Attributions")
method = st.selectbox("Method", METHODS)
if method == "grad_cam":
    st.caption("Grad-CAM explains through one layer. The default is the deepest spatial map the classifier reads "
               "(WSMS: the integrated features of all stages; ShaRDNet: the last shared-conv iteration; e2cnn: the "
               "last block's map), so the map explains the whole model; choose another layer per variant below.")
maps = {}
image = None
layer_cols = st.columns(max(1, len(inputs))) if method == "grad_cam" else []
for i, (label, x) in enumerate(inputs.items()):
    model, _ = get_variant(label)
    try:
        layer = None
        if method == "grad_cam":
            cands = cam_candidates(model)
            names = [n for n, _, _ in cands]
            labels = {n: f"{n} · {lab}" + (f" · {'x'.join(map(str, shp))}" if shp else "") for n, lab, shp in cands}
            layer = layer_cols[i].selectbox(f"Grad-CAM layer of {label}", names,
                                            index=names.index(default_cam_layer(model)), key=f"cam-layer-{label}",
                                            format_func=labels.__getitem__)
        res = attribute(model, x.unsqueeze(0), method, layer=layer)
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
        continue
    image = x.mean(0).numpy() if image is None else image
    maps[f"{label} → {int(res.targets[0])}" + (f" @ {res.layer}" if res.layer else "")] = res.maps[0].numpy()
if maps:
    figure(attribution_figure(image, maps, f"{method.replace('_', ' ')} for the predicted class"), f"attr-{method}")
