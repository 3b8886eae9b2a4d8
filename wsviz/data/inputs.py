"""How far an uploaded image is from what a model was trained on, said before its prediction is read."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from wsviz.errors import WsvizError


def input_note(data: bytes, channels: int, size: int, dataset: str | None) -> str | None:
    """A plain warning when the image is far from the model's training data, else None.

    Far means: a colourful image fed to a model of grey images, or, where the model's input is the
    whole image fit in its square (the ``"fit"`` layout of :func:`wsviz.data.uploads.default_layout`),
    an image whose short side is more than four times the model's input size (its detail is averaged
    away when it is shrunk). A digit model's input is laid out from the digit's own bounding box,
    scaled to MNIST's 20x20 box whatever the photo's size (as MNIST's digits were scaled from their
    scans), so the photo's size says nothing about it there. The page shows the model's actual input
    beside it.
    """
    from wsviz.data.uploads import default_layout

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        img.draft("RGB", (64, 64))
        thumb = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError, WsvizError):
        return None  # the decoder proper reports what is wrong with the file
    colourful = float(np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean()) > 12.0
    reasons = []
    if channels == 1 and colourful:
        reasons.append("it is a colour image and was turned grey")
    if min(w, h) > 4 * size and default_layout(channels, dataset) == "fit":
        reasons.append(f"it was shrunk from {w}×{h} to {size}×{size} pixels")
    if not reasons:
        return None
    trained = f"on {dataset}" if dataset else "on other images"
    kind = "grey" if channels == 1 else "colour"
    return (f"This model was trained {trained} ({size}×{size} {kind} images); "
            + " and ".join(reasons) + ". Its prediction on it says little about the model: see the input "
            "it actually received below.")
