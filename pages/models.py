"""Models: the registered zoo with parameters, effective parameters and FLOPs."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from wsviz.analysis.zoo import spec_row, zoo_table
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


table = st.empty()
if chosen:
    # The registry itself is instant; counting builds every model (the first time only:
    # results are cached on disk), so show the list first and fill in the numbers.
    table.dataframe(pd.DataFrame([spec_row(s) for s in list_models() if s.family in chosen])
                    [["name", "family", "input", "classes", "defaults", "paper"]], hide_index=True)
rows: list[dict] = []
bar = st.progress(0.0, text="Counting parameters and FLOPs…") if chosen else None
for i, fam in enumerate(chosen):
    if bar is not None:
        bar.progress(i / len(chosen), text=f"Counting parameters and FLOPs: {fam}…")
    rows += _table(fam)
if bar is not None:
    bar.empty()

if rows:
    df = pd.DataFrame(rows)
    cols = ["name", "family", "input", "classes", "unique_params", "effective_params", "compression",
            "gflops", "sign_mask_params", "defaults", "paper"]
    table.dataframe(
        df[cols], hide_index=True,
        column_config={
            "unique_params": st.column_config.NumberColumn("unique params", format="localized"),
            "effective_params": st.column_config.NumberColumn("effective params", format="localized"),
            "compression": st.column_config.NumberColumn("effective / unique", format="%.2f×"),
            "gflops": st.column_config.NumberColumn("GFLOPs", format="%.3f"),
            "sign_mask_params": st.column_config.NumberColumn(
                "of which 1-bit sign masks", format="localized",
                help="f-RepeatNet trains its sign masks through real latent tensors; only their signs are kept."),
        },
    )
    st.download_button("Download CSV", df.to_csv(index=False).encode(), "wsviz_models.csv", "text/csv")
    with st.expander("What each model is"):
        for r in rows:
            st.markdown(f"- **{r['name']}** ({r['family']}): {r['description']}")
else:
    st.info("Choose at least one family.")
