"""wsviz — Streamlit entry point: `streamlit run app.py`."""

from __future__ import annotations

import streamlit as st

from pages._shared import available_variants

st.set_page_config(page_title="wsviz — weight-sharing CNNs", page_icon="🔁", layout="wide")

PAGES = [
    st.Page("pages/models.py", title="Models", icon="🧩", default=True),
    st.Page("pages/kernels.py", title="Kernels", icon="🔳"),
    st.Page("pages/compare.py", title="Compare on images", icon="🖼️"),
    st.Page("pages/scale.py", title="Scale", icon="🔍"),
    st.Page("pages/rotation.py", title="Rotation", icon="🔄"),
    st.Page("pages/embeddings.py", title="Embeddings", icon="🌌"),
    st.Page("pages/train.py", title="Train", icon="🏋️"),
]

nav = st.navigation(PAGES)
with st.sidebar:
    variants = available_variants()
    # Defined in the entry script, so the choice is the same on every page.
    default = [v for v in ("scale-msws-vanilla", "scale-msws-shared", "scale-msws-unshared") if v in variants]
    if "variants" not in st.session_state:
        st.session_state["variants"] = default
    st.multiselect("Variants to compare", list(variants), key="variants",
                   help="Shipped checkpoints (checkpoints/) and finished training runs.")
    if not variants:
        st.warning("No checkpoints found. Train one on the Train page, or run `python -m wsviz.zoo retrain`.")
    st.caption("wsviz: multi-scale atrous sharing, WSMS-Net, RepeatNet, ShaRDNet, ShaResNet and e2cnn "
               "steerable baselines, compared honestly.")
nav.run()
