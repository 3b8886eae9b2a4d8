"""Compare on images: predictions, feature maps per rate / stage / iteration / level, attributions."""

from __future__ import annotations

import streamlit as st

from pages._shared import (
    chosen_variants,
    explain_inputs,
    figure,
    get_variant,
    model_inputs_for,
    no_variants_note,
    percent_style,
    pick_images,
    show_error,
    show_predictions,
)
from wsviz.analysis.attribution import (
    COARSE_CAM,
    IG_MAX_STEPS,
    IG_START_STEPS,
    IG_TOLERANCE,
    METHODS,
    attribute,
    cam_candidates,
    default_cam_layer,
)
from wsviz.analysis.features import feature_maps
from wsviz.data.classes import class_names
from wsviz.figures import SIGNED_METHODS, attribution_figure, feature_map_range, feature_maps_figure
from wsviz.models.taps import list_taps

st.title("Compare on images")
variants = chosen_variants()
if not variants:
    st.info(no_variants_note())
    st.stop()

images = pick_images("compare")
if not images:
    st.info("Upload an image or pick a sample.")
    st.stop()


rows = []
for name, data in images:
    st.subheader(name)
    rows += show_predictions(name, data, variants)
    explain_inputs(name, data, variants)
if rows:
    st.dataframe(percent_style(rows, ["confidence"]), hide_index=True, column_config={
        "next": st.column_config.TextColumn("next most likely")})

names = [n for n, _ in images]
pick = st.selectbox("Image for feature maps and attributions", names, key="compare-image") if len(names) > 1 \
    else names[0]
name, data = images[names.index(pick)]
# the predictions above have said what is wrong with this image, if anything: not again here
inputs = {label: x[0] for label, x in model_inputs_for(name, data, variants, quiet=True).items() if x is not None}
if not inputs:  # no empty sections under headers: say once why there is nothing more, and what to do
    st.info(f"No feature maps or attributions for {name}: none of the chosen variants could read it (said above). "
            "Upload another image or remove this one to see a sample.")
    st.stop()

st.header("Feature maps")
kinds = sorted({t.kind for v in variants for t in list_taps(get_variant(v)[0])} - {"embedding"})
KIND_LABELS = {"per dilation rate": "rate", "per WSMS stage": "stage", "per shared-conv iteration": "iteration",
               "per stage of blocks / level": "level"}
shown = [label for label, k in KIND_LABELS.items() if k in kinds]
kind = KIND_LABELS[st.radio("Named outputs", shown, horizontal=True)] if shown else "level"
all_maps = {}
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
    all_maps[label] = (maps[:24], len(maps))
if all_maps:
    # one colour scale over every variant's figure, so one colour is one value in all of them
    zrange = feature_map_range(*(maps for maps, _ in all_maps.values()))
    scale_text = f"values {zrange[0]:.3g} to {zrange[1]:.3g}" + (
        f"; these outputs go negative, so the scale is diverging, white at 0, ±{max(-zrange[0], zrange[1]):.3g}"
        if zrange[0] < 0 else "")
    st.caption(f"The {len(all_maps)} figures share one colour scale ({scale_text}): one colour is one value in all "
                "of them." if len(all_maps) > 1 else f"Colour scale: {scale_text}.")
for label, (maps, n_all) in all_maps.items():
    figure(feature_maps_figure(maps, title=f"{label}: channel-mean of each {kind} output"
                                           + (f" (first 24 of {n_all})" if n_all > 24 else ""), zrange=zrange),
           f"maps-{label}-{kind}")

st.header("Attributions")
c1, c2, c3 = st.columns(3)
method = c1.selectbox("Method", METHODS)
# each variant's own class names: variants trained on different datasets share no class to explain
names_of = {}
for label in inputs:
    model, card = get_variant(label)
    names_of[label] = class_names(card.get("dataset"), model.wsviz_config.get("num_classes", 10))
same_classes = len({tuple(n) for n in names_of.values()}) == 1
class_labels = next(iter(names_of.values()))
if same_classes:
    target_choice = c2.selectbox("Class to explain", ["the predicted class"] + [f"{i}: {n}" if n != str(i) else n
                                                                              for i, n in enumerate(class_labels)],
                                 key="compare-target",
                                 help="Explain the predicted class of each variant, or the same class for all.")
else:
    target_choice = c2.selectbox("Class to explain", ["the predicted class"], key="compare-target-mixed",
                                 help="The chosen variants were trained on datasets with different classes, so "
                                      "each explains its own predicted class.")
opacity = c3.slider("Overlay on the input (opacity)", 0.0, 1.0, 0.0, 0.1,
                    help="0 draws the maps alone; above 0 each map is drawn over the input with that opacity.")
SCALES = {"each map to its own maximum": "per_panel", "one scale for all maps": "shared"}
attr_scale = SCALES[st.radio(
    "Attribution colour scale", list(SCALES), horizontal=True, key="attr-scale",
    help="Saliency and Grad-CAM values grow with each model's logit scale, so on one scale a model with small "
         "logits looks blank. Each panel's title gives its maximum.")]
if not same_classes:
    st.caption("The chosen variants were trained on datasets with different classes ("
               + "; ".join(f"{label}: {', '.join(n[:4])}{', …' if len(n) > 4 else ''}"
                           for label, n in names_of.items())
               + "), so each explains its own predicted class, named in its panel's title.")
if method == "grad_cam":
    st.caption("Grad-CAM explains through one layer. The default is the deepest spatial map the classifier reads "
               "(WSMS: the integrated features of all stages; ShaRDNet: the last shared-conv iteration; e2cnn: the "
               "last block's map), so the map explains the whole model; choose another layer per variant below. "
               "Each panel's title gives its layer's grid (e.g. 7x7): the map is that many numbers, upsampled to "
               "the input.")
if method == "integrated_gradients":
    st.caption(f"Integrated Gradients from a black image: integrated exactly, each map would add up to the change of "
               f"the explained logit, f(x) − f(black); integrated numerically, it comes close. Each panel's title says how far its sum is off (the numerical "
               f"integration's error) and with how many steps: each image is refined from {IG_START_STEPS} steps "
               f"until under {IG_TOLERANCE:.0%}, at most {IG_MAX_STEPS}.")
maps, own_inputs, notes = {}, {}, {}  # each map is drawn over the input its model was given, not the first variant's
coarse, capped = [], []  # Grad-CAM maps of a 2x2 grid; Integrated Gradients still over the tolerance at the cap
target = None if target_choice == "the predicted class" else int(target_choice.split(":")[0])
layer_cols = st.columns(max(1, len(inputs))) if method == "grad_cam" else []
for i, (label, x) in enumerate(inputs.items()):
    model, _ = get_variant(label)
    try:
        layer = None
        if method == "grad_cam":
            cands = cam_candidates(model)
            layer_names = [n for n, _, _ in cands]
            labels = {n: f"{n} · {lab}" + (f" · {'x'.join(map(str, shp))}" if shp else "") for n, lab, shp in cands}
            layer = layer_cols[i].selectbox(f"Grad-CAM layer of {label}", layer_names,
                                            index=layer_names.index(default_cam_layer(model)),
                                            key=f"cam-layer-{label}", format_func=labels.__getitem__)
        res = attribute(model, x.unsqueeze(0), method, target=target, layer=layer)
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
        continue
    t = int(res.targets[0])
    panel = f"{label} → {names_of[label][t]}" + (f" @ {res.layer}" if res.layer else "") \
        + (f" ({res.grid[0]}x{res.grid[1]})" if res.grid else "")
    maps[panel], own_inputs[panel] = res.maps[0].numpy(), x.mean(0).numpy()
    if res.grid and min(res.grid) <= COARSE_CAM:
        finer = [(n, shp[1:]) for n, _, shp in cands[:layer_names.index(res.layer)] if len(shp) == 3
                 and min(shp[1:]) > COARSE_CAM]
        coarse.append(f"{label} at {res.layer}" + (f" (finer: {finer[-1][0]}, {finer[-1][1][0]}x{finer[-1][1][1]})"
                                                   if finer else ""))
    if res.relative_delta is not None:
        notes[panel] = res.completeness_note(0)
        if res.capped is not None and bool(res.capped[0]):
            capped.append(f"{label} ({float(res.relative_delta[0]):.1%})")
if coarse:
    st.warning(f"Grad-CAM at a 2x2 map: {'; '.join(coarse)}. The map is 4 numbers upsampled into a smooth "
               "picture, and each of the 4 cells responds to nearly the whole input (in the shipped 28-pixel "
               "models, all of it), so its quadrants do not say where in the image the evidence is. For a finer "
               "map choose an earlier layer above; it explains the model up to that layer.",
               icon=":material/warning:")
if capped:
    st.warning(f"Integrated Gradients still off by more than {IG_TOLERANCE:.0%} at {IG_MAX_STEPS} steps, the cap: "
               f"{', '.join(capped)}. Those maps do not add up to the logit's change; read their totals with care.",
               icon=":material/warning:")
if maps:
    what = "the predicted class" if target is None else f"class {class_labels[target]}"
    figure(attribution_figure(own_inputs, maps, f"{method.replace('_', ' ')} for {what}", signed=method in SIGNED_METHODS,
                              opacity=opacity, scale=attr_scale, notes=notes), f"attr-{method}")
