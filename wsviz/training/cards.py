"""Model cards: the JSON half of a checkpoint, readable without torch (the app lists them at once)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsviz.errors import WsvizError

WEIGHTS = "weights.safetensors"
CARD = "card.json"


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of a checkpoint folder, or a WsvizError saying what is wrong with it."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise WsvizError(f"No model card at {path}: this is not a wsviz checkpoint folder (it needs {CARD} and {WEIGHTS}).")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WsvizError(f"The model card {path} is not valid JSON ({exc}); re-create the checkpoint.") from exc
    if not isinstance(card, dict) or not isinstance(card.get("model"), str) or not isinstance(card.get("config", {}), dict):
        raise WsvizError(f"The model card {path} does not name a model; re-create the checkpoint.")
    return card
