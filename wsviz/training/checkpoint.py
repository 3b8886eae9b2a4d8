"""Checkpoints: safetensors weights + a JSON model card, written atomically, loaded without pickle.

A checkpoint is a folder holding ``weights.safetensors`` and ``card.json``. Each file is
written to a temporary name in the same folder and renamed into place (weights first, then
the card), so a crash never leaves a half-written file under its final name, and a card is
only ever next to the weights it describes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from wsviz.errors import WsvizError
from wsviz.models.modes import eval_mode
from wsviz.training.cards import CARD, WEIGHTS, read_card


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(folder: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``card`` into ``folder`` atomically; returns the folder."""
    folder = Path(folder)
    with eval_mode(model):  # e2cnn caches its expanded filters in eval mode: store only real state
        _atomic_write(folder / WEIGHTS, lambda p: save_model(model, p))
    text = json.dumps(card, indent=2, sort_keys=True, default=str)
    _atomic_write(folder / CARD, lambda p: Path(p).write_text(text))
    return folder


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a card names and load its weights (safetensors only: no pickle, no code runs)."""
    from wsviz.models import create_model

    folder = Path(folder)
    card = read_card(folder)
    model = create_model(card["model"], **card.get("config", {}))
    path = folder / WEIGHTS
    if not path.is_file():
        raise WsvizError(f"{path} is missing: the checkpoint is incomplete; re-create it.")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WsvizError(f"{path} is not a readable safetensors file ({exc}); it may be truncated. Re-create it.") from exc
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_alias(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(x for x in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:3]]}" if wrong else "",
        ) if x)
        raise WsvizError(f"The weights in {path} do not fit the model its card describes ({card['model']}): {detail}.")
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    return model, card


def _is_alias(model: nn.Module, key: str, state: dict) -> bool:
    """safetensors' save_model drops tensors that alias another (e2cnn's shared basis buffers)."""
    target = model.state_dict()[key]
    return any(v.data_ptr() == target.data_ptr() for k, v in model.state_dict().items() if k in state and k != key)
