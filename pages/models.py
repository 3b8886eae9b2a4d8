"""Models: the registered zoo with parameters, effective parameters and FLOPs."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from wsviz.analysis.zoo import zoo_table
from wsviz.models import list_models

st.title("Model zoo")
st.write(
    "Every architecture wsviz can build, exact to its paper. **Unique** parameters are the "
    "weights stored (a shared weight counts once); **effective** parameters are the weights the "
    "network applies, each use counted (what it would hold unshared). FLOPs are torch's count for "
    "one image at the model's input size (a multiply-add is 2 FLOPs)."
)

families = sorted({s.family for s in list_models()})
chosen = st.multiselect("Families", families, default=families)


@st.cache_data(show_spinner=False, persist="disk")
def _table(family: str) -> list[dict]:
    return zoo_table(list_models(family))


rows: list[dict] = []
bar = st.progress(0.0, text="Counting parameters and FLOPs…") if chosen else None
for i, fam in enumerate(chosen):
    rows += _table(fam)
    if bar is not None:
        bar.progress((i + 1) / len(chosen), text=f"Counted {fam}")
if bar is not None:
    bar.empty()

if rows:
    df = pd.DataFrame(rows)
    cols = ["name", "family", "input", "classes", "unique_params", "effective_params", "compression",
            "gflops", "defaults", "paper"]
    st.dataframe(
        df[cols], hide_index=True, use_container_width=True,
        column_config={
            "unique_params": st.column_config.NumberColumn("unique params", format="%d"),
            "effective_params": st.column_config.NumberColumn("effective params", format="%d"),
            "compression": st.column_config.NumberColumn("effective / unique", format="%.2f×"),
            "gflops": st.column_config.NumberColumn("GFLOPs", format="%.3f"),
        },
    )
    st.download_button("Download CSV", df.to_csv(index=False).encode(), "wsviz_models.csv", "text/csv")
    with st.expander("What each model is"):
        for r in rows:
            st.markdown(f"- **{r['name']}** ({r['family']}): {r['description']}")
else:
    st.info("Choose at least one family.")
