"""The Train page's account box: who is signed in, their role, and their usage against each quota."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from wsviz.auth import Actor
from wsviz.errors import WsvizError
from wsviz.training.quotas import Quotas, rows, usage


def usage_panel(store, actor: Actor) -> None:
    try:
        quotas = Quotas.from_env()
        use = usage(store, actor.name)
    except WsvizError as exc:
        st.error(str(exc))
        return
    with st.expander(f"{actor.name} ({actor.role}): usage and limits", icon=":material/person:"):
        if not actor.can_train:
            st.info("Viewers use every analysis page; only trainers launch, cancel or resume runs.")
        st.dataframe(pd.DataFrame(rows(quotas, use), columns=["limit", "used", "allowed"]), hide_index=True)
