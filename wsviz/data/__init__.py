"""Datasets and upload decoding (see the training-engine issue)."""
