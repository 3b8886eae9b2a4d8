"""wsviz — Streamlit entry point: `streamlit run app.py`.

This file plays two parts. ``streamlit run app.py`` finds ``app`` (an ``st.App``) below and serves
it: imported once by the server, outside any session, it checks the access control *before the
server takes connections* (a non-loopback address without access control the owner set stops the
start) and prints the address that carries the sign-in token. Each browser session then runs this
same file as its Streamlit script (the ``else`` part): the sign-in gate, the sidebar, the pages.
"""

from __future__ import annotations

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

if get_script_run_ctx(suppress_warning=True) is None:  # the server is starting: no session yet
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from pages._access import TokenLinks, server_lifespan, sign_out, sign_out_path

    # TokenLinks: a link with ?token= signs the browser in with a session cookie (as Jupyter does)
    app = st.App(__file__, lifespan=server_lifespan, middleware=[Middleware(TokenLinks)],
                 routes=[Route(sign_out_path(), sign_out)])
else:
    from pages._access import access_on, require_access, sign_out_path
    from pages._shared import available_variants, plain, refused_checkpoints, run_store_notice

    st.set_page_config(page_title="wsviz — weight-sharing CNNs", page_icon=":material/repeat:", layout="wide")
    PAGES = [
        st.Page("pages/models.py", title="Models", icon=":material/view_module:", default=True),
        st.Page("pages/kernels.py", title="Kernels", icon=":material/grid_on:"),
        st.Page("pages/compare.py", title="Compare on images", icon=":material/image:"),
        st.Page("pages/scale.py", title="Scale", icon=":material/zoom_in:"),
        st.Page("pages/rotation.py", title="Rotation", icon=":material/rotate_right:"),
        st.Page("pages/embeddings.py", title="Embeddings", icon=":material/scatter_plot:"),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/share.py", title="Share weights", icon=":material/join_inner:"),
    ]

    # Before anything else is drawn: a session that has not signed in sees the sign-in prompt only
    # (no page, no sidebar); a non-loopback address without configured access control stops the server.
    actor = require_access([p.url_path for p in PAGES])  # a page's link survives the sign-in

    nav = st.navigation(PAGES)
    with st.sidebar:
        variants = available_variants()
        # Defined in the entry script, so the choice is the same on every page.
        default = [v for v in ("scale-msws-vanilla", "scale-msws-shared", "scale-msws-unshared") if v in variants]
        if "variants" not in st.session_state:
            # A link can carry the choice: ?variants=scale-msws-vanilla,scale-msws-shared
            asked = [v for v in st.query_params.get("variants", "").split(",") if v]
            linked = [v for v in asked if v in variants]
            st.session_state["variants"] = linked or default
            # a mistyped or removed variant in the link is said, not dropped silently
            unknown = [v for v in asked if v not in variants]
            if unknown:
                st.session_state["variants-unknown"] = (unknown, bool(linked), list(st.session_state["variants"]))
        st.multiselect("Variants to compare", list(variants), key="variants",
                       help="Shipped checkpoints (checkpoints/) and finished training runs. The choice is kept in "
                            "the page's address (?variants=...), so a reload or a shared link shows the same.")
        # Write the choice to the URL: a reload starts a new session, which reads it back above.
        chosen = ",".join(st.session_state["variants"])
        if st.query_params.get("variants", "") != chosen:
            if chosen:
                st.query_params["variants"] = chosen
            else:
                del st.query_params["variants"]
        unknown, some, shown = st.session_state.get("variants-unknown") or ([], False, [])
        if unknown and st.session_state["variants"] == shown:  # until the user picks
            st.warning(f"The link asked for {', '.join(plain(v) for v in unknown)}: no such variant here (a "
                       "checkpoint in checkpoints/ or a finished run). "
                       + ("Showing the others it named." if some else "Showing the default variants.")
                       + " Pick from the list above.", icon=":material/link_off:")
        if not variants:
            st.warning("No checkpoints found. Train one on the Train page, or run `python -m wsviz.zoo retrain`.")
        refused = refused_checkpoints()
        if refused:
            # Never dropped silently: each checkpoint that cannot be used is listed with the reason.
            with st.expander(f"{len(refused)} checkpoint(s) cannot be used", icon=":material/warning:"):
                for label, reason in refused.items():
                    st.markdown(f"**{plain(label)}**: {plain(reason)}")
        run_store_notice()  # a damaged or read-only run store: what happened and what to do
        st.caption(f"Signed in as **{plain(actor.name)}** ({actor.role}).")
        if access_on():  # a link in this tab (markdown links open a new one); the server forgets the cookie
            st.caption(f'<a href="{sign_out_path()}" target="_self">Sign out</a>', unsafe_allow_html=True)
        st.caption("wsviz: multi-scale atrous sharing, WSMS-Net, RepeatNet, ShaRDNet, ShaResNet and e2cnn "
                   "steerable baselines, compared honestly.")
    nav.run()
