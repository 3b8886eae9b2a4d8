"""wsviz — Streamlit entry point: `streamlit run app.py`."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="wsviz — weight-sharing CNNs", page_icon="🔁", layout="wide")

PAGES = [
    st.Page("pages/models.py", title="Models", icon="🧩", default=True),
]

nav = st.navigation(PAGES)
with st.sidebar:
    st.caption("wsviz: analysis of weight-sharing CNNs — multi-scale atrous sharing, WSMS-Net, "
               "RepeatNet, ShaRDNet, ShaResNet, and e2cnn steerable baselines.")
nav.run()
