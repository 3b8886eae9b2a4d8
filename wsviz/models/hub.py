"""Trained weights for registered models: ``create_model(name, pretrained=..., checkpoint_path=...)``.

wsviz's "pretrained" weights are its checkpoints: folders of ``card.json`` (model name and
options) and ``weights.safetensors``. ``pretrained=True`` looks for them in
:func:`checkpoint_dir` — ``$WSVIZ_CHECKPOINTS``, else the ``checkpoints/`` folder of a source
checkout, else ``./checkpoints`` — and picks the one whose card names the model with the
options asked for. Nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from wsviz.errors import WsvizError


def checkpoint_dir() -> Path:
    """Where trained checkpoints are looked for (the app lists the same folder)."""
    env = os.environ.get("WSVIZ_CHECKPOINTS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "checkpoints"
    return checkout if checkout.is_dir() else Path("checkpoints")


def pretrained_checkpoints(root: str | Path | None = None) -> list[tuple[str, dict[str, Any], Path]]:
    """(model name, config, folder) of every usable checkpoint under ``root`` (default
    :func:`checkpoint_dir`), sorted by folder name; reads the cards only."""
    from wsviz.training.cards import read_card

    base = Path(root) if root is not None else checkpoint_dir()
    out = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if not d.is_dir() or d.name.startswith((".", "_")) or not (d / "weights.safetensors").is_file():
                continue
            try:
                card = read_card(d)
            except WsvizError:
                continue
            if card.get("tied"):  # a tied model is not the registered model with these options
                continue
            out.append((card["model"], dict(card.get("config", {})), d))
    return out


def find_pretrained(name: str, overrides: dict[str, Any] | None = None, root: str | Path | None = None) -> Path:
    """The checkpoint of model ``name`` for ``overrides``: the one whose options are exactly
    ``create_model(name, **overrides)``'s, else the only one that has the options in
    ``overrides``; a WsvizError naming the candidates when there is none or no single one."""
    from wsviz.models.registry import get_spec

    spec = get_spec(name)
    overrides = dict(overrides or {})
    found = [(cfg, d) for model, cfg, d in pretrained_checkpoints(root) if model == name]
    fits = [(cfg, d) for cfg, d in found if all(cfg.get(k) == v for k, v in overrides.items())]
    exact = [(cfg, d) for cfg, d in fits if cfg == spec.config(**overrides)]
    where = root if root is not None else checkpoint_dir()
    if len(exact) == 1:
        return exact[0][1]
    if len(fits) == 1:
        return fits[0][1]
    if not found:
        raise WsvizError(f"No trained checkpoint of {name!r} in {where} (set WSVIZ_CHECKPOINTS to the folder that "
                         "holds them, or pass checkpoint_path=a checkpoint folder). "
                         "wsviz.list_models(pretrained=True) lists the models that have one.")
    keys = sorted({k for cfg, _ in found for k in cfg if len({repr(c.get(k)) for c, _ in found}) > 1})
    options = "; ".join(f"{d.name}: " + (", ".join(f"{k}={cfg.get(k)!r}" for k in keys) or "same options")
                        for cfg, d in found)
    if not fits:
        raise WsvizError(f"No trained checkpoint of {name!r} has the options {overrides}; there are: {options}.")
    raise WsvizError(f"{len(fits)} trained checkpoints of {name!r} fit {overrides}; pass the options that tell them "
                     f"apart, or checkpoint_path=. They are: {options}.")


def load_pretrained(name: str, checkpoint_path: str | Path | None, overrides: dict[str, Any]) -> nn.Module:
    """``create_model(name, pretrained=True / checkpoint_path=..., **overrides)``: the model with
    trained weights, in training mode like any newly created model."""
    from wsviz.models.registry import create_model
    from wsviz.training.cards import CARD, WEIGHTS
    from wsviz.training.checkpoint import load_checkpoint, load_weights

    if checkpoint_path is None:
        folder = find_pretrained(name, overrides)
    else:
        path = Path(checkpoint_path)
        if path.is_file() and path.suffix == ".safetensors" and not (path.name == WEIGHTS and (path.parent / CARD).is_file()):
            model = create_model(name, **overrides)  # a bare weights file: the options are the caller's
            load_weights(model, path, name)
            return model.train()
        folder = path.parent if path.is_file() else path
        if not folder.is_dir():
            raise WsvizError(f"checkpoint_path {checkpoint_path} does not exist; give a wsviz checkpoint folder "
                             f"({CARD} + {WEIGHTS}) or a .safetensors file.")
    model, card = load_checkpoint(folder)
    if card["model"] != name:
        raise WsvizError(f"The checkpoint {folder} holds a {card['model']!r}, not a {name!r}; "
                         f"use create_model({card['model']!r}, checkpoint_path=...).")
    config = card.get("config", {})
    differ = {k: v for k, v in overrides.items() if k in model.wsviz_config and model.wsviz_config[k] != v}
    if differ:
        raise WsvizError(f"The checkpoint {folder} holds {name} with "
                         + ", ".join(f"{k}={model.wsviz_config[k]!r}" for k in differ)
                         + f", not {', '.join(f'{k}={v!r}' for k, v in differ.items())}: its weights only fit the "
                         "options it was trained with; leave those options out.")
    unknown = [k for k in overrides if k not in model.wsviz_config]
    if unknown:
        create_model(name, **{**config, **overrides})  # raises the registry's message for the unknown option
    return model.train()
