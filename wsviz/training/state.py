"""The full training state, saved beside a checkpoint so a killed or preempted run can go on.

What a resumed run needs to continue exactly where it stopped (Lightning's and torchvision's
references save the same): the model, optimiser, learning-rate scheduler and grad scaler
states, every random generator (torch CPU and CUDA, NumPy, Python, the data order's
generator), the epoch reached and the metrics so far.

The file is one safetensors file: the tensors as tensors, everything else as JSON in its
metadata. Like checkpoints it holds no pickle, so loading it runs no code; it is written to a
temporary name and renamed, so it is always whole, and it matches one finished epoch.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wsviz.errors import WsvizError

FORMAT = "wsviz-train-state/1"


def state_path(checkpoint: str | Path) -> Path:
    """Where the training state of the checkpoint folder ``checkpoint`` lives: beside it, not in it
    (the checkpoint folder holds exactly its weights and card)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{checkpoint.name}.state.safetensors"


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


# ----------------------------------------------------------------- encoding without pickle
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # copies: no shared memory in the file
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _encode(torch.from_numpy(np.ascontiguousarray(obj)), tensors)["__tensor__"]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Counter):  # MultiStepLR's milestones
        return {"__counter__": [[_encode(k, tensors), v] for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    (tag, value), = obj.items()
    if tag == "__tensor__":
        return tensors[value]
    if tag == "__ndarray__":
        return tensors[value].numpy()
    if tag == "__counter__":
        return Counter({_decode(k, tensors): v for k, v in value})
    if tag == "__dict__":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in value)
    raise ValueError(f"unknown tag {tag!r}")


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts, lists, tuples, numbers, strings, tensors, arrays) atomically."""
    from wsviz.training.checkpoint import _discard, _write_temp

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(state, tensors))
    tmp = _write_temp(path, lambda p: save_file(tensors, p, metadata={"format": FORMAT, "state": meta}))
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote, or a WsvizError saying why it cannot be used."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError) as exc:
        raise WsvizError(f"The training state {path} cannot be read ({exc}); start the run again without "
                         "--resume.") from exc
    if meta.get("format") != FORMAT:
        raise WsvizError(f"{path} is not a wsviz training state ({FORMAT}); start the run again without --resume.")
    try:
        return _decode(json.loads(meta["state"]), tensors)
    except (KeyError, ValueError, TypeError) as exc:
        raise WsvizError(f"The training state {path} is damaged ({type(exc).__name__}: {exc}); start the run "
                         "again without --resume.") from exc
