"""Analyses as plain data (dataclasses, dicts, arrays); no streamlit, no figures."""
