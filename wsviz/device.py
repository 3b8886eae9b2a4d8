"""Device choice, made in one place: CUDA when available, else CPU."""

from __future__ import annotations

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return ``prefer`` if given, else ``cuda`` when a GPU is visible, else ``cpu``."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
