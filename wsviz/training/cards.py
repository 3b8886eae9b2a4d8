"""Model cards: the JSON half of a checkpoint, readable without torch (the app lists them at once).

:func:`check_weights` looks at the other half the same way: it reads only the safetensors
header, so the app can tell a usable checkpoint from a truncated file or a renamed pickle
before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsviz.errors import WsvizError

WEIGHTS = "weights.safetensors"
CARD = "card.json"

_NUMBER = (int, float)
# Card fields the app and the analyses read, and the types they can use. Others are free.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "test_accuracy": ((*_NUMBER, type(None)), "a number or null"),
    "unique_params": (_NUMBER, "a number"),
    "effective_params": (_NUMBER, "a number"),
    "float_params": (_NUMBER, "a number"),
    "sign_mask_params": (_NUMBER, "a number"),
    "flops": (_NUMBER, "a number"),
    "epochs_done": ((int, type(None)), "an integer or null"),
    "data_seed": ((int,), "an integer"),
    "dataset": ((str,), "a string"),
    "test_split": ((str,), "a string"),
    "family": ((str,), "a string"),
    "complete": ((bool,), "true or false"),
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_PICKLE_PROTOCOLS = range(2, 6)


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of a checkpoint folder, or a WsvizError saying what is wrong with it."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise WsvizError(f"No model card at {path}: this is not a wsviz checkpoint folder (it needs {CARD} and {WEIGHTS}).")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WsvizError(f"The model card {path} is not valid JSON ({exc}); re-create the checkpoint.") from exc
    except OSError as exc:
        raise WsvizError(f"The model card {path} cannot be read ({exc}); check its permissions.") from exc
    if not isinstance(card, dict):
        raise WsvizError(f"The model card {path} holds a JSON {_json_type(card)}, not an object with the model's "
                         "name and configuration; re-create the checkpoint.")
    if not isinstance(card.get("model"), str):
        raise WsvizError(f"The model card {path} does not name a model (its \"model\" must be a registered model's "
                         "name); re-create the checkpoint.")
    config = card.get("config", {})
    if not isinstance(config, dict):
        raise WsvizError(f"The model card {path} has a \"config\" that is a JSON {_json_type(config)}, not an "
                         "object of the model's options; re-create the checkpoint.")
    for key, (types, words) in _FIELDS.items():
        value = card.get(key, ...)
        bad_bool = isinstance(value, bool) and bool not in types
        if value is not ... and (bad_bool or not isinstance(value, types)):
            raise WsvizError(f"The model card {path} gives {key}={value!r}, but it must be {words}; "
                             "re-create the checkpoint.")
    tied = card.get("tied")
    if tied is not None and not _tied_ok(tied):
        raise WsvizError(f"The model card {path} has a \"tied\" entry that is not an object whose \"groups\" is a "
                         "list of lists of layer paths; re-create the checkpoint.")
    return card


def tied_groups(card: dict[str, Any]) -> list[list[str]]:
    """The conv groups a tied model's card records (empty for a model that was not tied)."""
    tied = card.get("tied")
    return [list(g) for g in tied["groups"]] if isinstance(tied, dict) else []


def _tied_ok(tied: Any) -> bool:
    groups = tied.get("groups") if isinstance(tied, dict) else None
    return isinstance(groups, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                            for g in groups)


def card_float_params(card: dict[str, Any]) -> int | None:
    """A card's real-valued parameters (the papers' count): unique minus f-RepeatNet's sign-mask
    entries, which are stored as one bit each. Cards written before the field existed have the parts."""
    if "float_params" in card:
        return int(card["float_params"])
    if card.get("unique_params") is None:
        return None
    return int(card["unique_params"]) - int(card.get("sign_mask_params") or 0)


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_weights(folder: str | Path) -> None:
    """Raise a WsvizError unless ``folder``'s weights file is a complete safetensors file.

    Reads the 8-byte header length and the JSON header only (no torch, no tensor data): a
    pickle or a PyTorch ``.pt`` file saved under the safetensors name, a truncated copy and a
    file with bytes beyond its tensors are all told apart from a usable file.
    """
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise WsvizError(f"{path} is missing: the checkpoint is incomplete; re-create it.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little")
            raw = fh.read(n) if len(head) == 8 and n <= _MAX_HEADER and 8 + n <= size else None
    except OSError as exc:
        raise WsvizError(f"{path} cannot be read ({exc}); check its permissions.") from exc
    problem = _layout_problem(size, n, raw)
    if problem is None:
        return
    foreign = _foreign_format(head)  # asked only of files that are not safetensors: a header length can look alike
    if foreign:
        raise WsvizError(
            f"{path} is {foreign}, not a safetensors file. wsviz never unpickles weights (loading a pickle can run "
            "any code it contains), so it is not loaded. Convert it with safetensors.torch.save_file only if you "
            "trust its source, or re-create the checkpoint.")
    raise WsvizError(f"{path} {problem}. Copy it again from its source, or re-create the checkpoint.")


def _layout_problem(size: int, n: int, raw: bytes | None) -> str | None:
    """What is wrong with a safetensors file of ``size`` bytes whose header is ``raw`` (``n`` bytes announced)."""
    if size < 8:
        return f"is only {size} bytes: it is truncated (a safetensors file starts with an 8-byte header length)"
    if raw is None:
        return f"is {size} bytes but its first 8 bytes announce a {n}-byte header: it is truncated or not a safetensors file"
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        return f"has a damaged header ({type(exc).__name__}): it is not a usable safetensors file"
    data, need = size - 8 - n, max(ends, default=0)
    if need > data:
        return f"is truncated: its header describes {need} bytes of tensors but only {data} follow ({size} bytes in all)"
    if need < data:
        return f"has {data - need} bytes after its last tensor: it is damaged or not a plain safetensors file"
    return None


def _foreign_format(head: bytes) -> str | None:
    """What a weights file really is, from its first bytes, if it is a known unsafe format."""
    if head[:4] == b"PK\x03\x04":
        return "a ZIP archive (the format of torch.save / PyTorch .pt files, which hold a pickle)"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "a Python pickle (the format of older torch.save / .pth / .bin files)"
    return None


def evaluation_seed(cards: dict[str, dict[str, Any]], dataset: str) -> int:
    """The data seed to evaluate ``dataset``'s test split with for these checkpoints: the one those trained
    on ``dataset`` were trained with (it picks a folder's train/test split and a digit protocol's
    realisation: another seed's test split overlaps a folder model's training images, or is not the test
    set its card reports). 0 when none of them was trained on ``dataset``; a WsvizError when they were
    trained with different seeds (no one test split is held out for all of them)."""
    seeds = {name: int(c.get("data_seed", 0) or 0) for name, c in cards.items() if c.get("dataset") == dataset}
    if len(set(seeds.values())) > 1:
        listed = ", ".join(f"{n} (seed {s})" for n, s in seeds.items())
        raise WsvizError(f"These checkpoints were trained on {dataset} with different data seeds: {listed}. "
                         "Each seed holds out another test split; analyse them apart, one seed at a time.")
    return next(iter(seeds.values()), 0)


def evaluation_transform(card: dict[str, Any], dataset: str | None = None) -> str:
    """The augmentation preset whose evaluation transform the checkpoint's training used (an image
    folder's resize / centre crop), for data of ``dataset`` (default: its own); ``none`` for other data."""
    if dataset is not None and dataset != card.get("dataset"):
        return "none"
    return str((card.get("train_config") or {}).get("augment", "none"))


def upload_layout(channels: int, card: dict[str, Any]) -> str:
    """How an uploaded image becomes this card's model's input (:func:`wsviz.data.uploads.default_layout`): the
    digit layout for a digit model, the evaluation transform its training used for an image-folder model
    (``crop`` for the imagenet preset), else the image fit in the square."""
    from wsviz.data.uploads import default_layout

    return default_layout(channels, card.get("dataset"), evaluation_transform(card))


def shared_evaluation_transform(cards: dict[str, dict[str, Any]], dataset: str) -> tuple[str, str | None]:
    """(preset, note): the one evaluation transform under which every card's model sees ``dataset`` as its
    training tested it (:func:`evaluation_transform`; only ``imagenet`` differs from ``none`` at evaluation:
    resize to 8/7 and centre crop instead of letterboxing), and None. When the models were tested under
    different ones, no single input is each one's own scale 1: ``none``, and a sentence naming who used what."""
    kinds = {name: ("imagenet" if evaluation_transform(c, dataset) == "imagenet" else "none")
             for name, c in cards.items()}
    if len(set(kinds.values())) <= 1:
        return next(iter(kinds.values()), "none"), None
    listed = "; ".join(f"{n}: {'resize to 8/7 and centre crop (imagenet)' if k == 'imagenet' else 'letterbox (none)'}"
                       for n, k in kinds.items())
    return "none", (f"these models were tested on {dataset} under different transforms ({listed}): the images are "
                    "letterboxed for all, so scale 1 is not each one's training scale. Compare them apart.")
