"""Per-sample predictions kept on disk, so what is known is not computed again.

An entry is one model's predicted class for every sample of one dataset under one input
transformation, keyed by

* the model's content hash (:func:`model_hash`: its name, options, input shape and every
  tensor of its state: a retrained or fine-tuned checkpoint never reuses another's entries),
* the data's identity (:attr:`wsviz.data.stream.EvalData.ident`; for a tensor, a hash of its bytes),
* the evaluation transform and the sweep's operation and value (``rescale=0.5``, ``rotate=90``;
  ``identity`` for the untransformed input, shared by sweeps and comparisons).

Re-plotting a sweep, adding a variant to it or re-running a comparison then reads the known
entries and evaluates only the rest. Entries are ``.npy`` files (read with
``allow_pickle=False``), written to a temporary name and renamed, so a reader never sees half a
file; a damaged entry is dropped and recomputed. The folder is bounded (``max_bytes``; the least
recently used entries go first) and safe to delete at any time.

Where: ``WSVIZ_CACHE_DIR`` (default ``~/.cache/wsviz/predictions``; ``off`` disables it), at most
``WSVIZ_CACHE_MB`` megabytes (default 512).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MB = 512
STALE_TMP_SECONDS = 3600  # an unfinished entry this old belongs to a writer that died


def model_hash(model: nn.Module) -> str:
    """A digest of what decides a model's predictions: name, options, input shape, every state tensor."""
    from wsviz.models.registry import input_shape

    try:
        shape = input_shape(model)
    except Exception:  # noqa: BLE001 - a model wsviz cannot size: its tensors still identify it
        shape = None
    h = hashlib.sha256(json.dumps([getattr(model, "wsviz_name", type(model).__qualname__),
                                   getattr(model, "wsviz_config", None), shape], sort_keys=True,
                                  default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}\0{t.dtype}\0{t.numel()}\0".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def tensor_hash(x: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and bytes (the identity of in-memory data)."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _touch(path: Path) -> None:
    """Stamp ``path`` with the time now, to the nanosecond (the file system's own clock ticks coarsely,
    which would leave entries written in one tick unordered)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class PredictionCache:
    """Predictions (int arrays) on disk under ``root``, at most ``max_bytes`` in all."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MB * 2**20) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts: object) -> str:
        return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The entry under ``key``, or None (missing or damaged: a damaged file is removed)."""
        path = self._path(key)
        try:
            arr = np.load(path, allow_pickle=False)
            _touch(path)  # least recently *used* goes first when the folder is trimmed
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("dropping damaged prediction cache entry %s (%s)", path, exc)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return arr.astype(np.int64)

    def put(self, key: str, predictions: np.ndarray) -> None:
        """Store an entry atomically, then trim the folder to ``max_bytes``. Failing to write (a full or
        read-only disk) only costs the reuse: it is logged, not raised."""
        arr = np.asarray(predictions)
        arr = arr.astype(np.int32 if arr.size == 0 or (arr.min() >= -2**31 and arr.max() < 2**31) else np.int64)
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
                os.replace(tmp, path)
                _touch(path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.trim()
        except OSError as exc:
            log.warning("could not write the prediction cache under %s (%s); going on without it", self.root, exc)

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Finished entries (another writer's ``.tmp-*`` file under way is not one: pathlib's glob
        matches dot-files, and trimming it would break that write)."""
        out = []
        for p in self.root.glob("*/*.npy"):
            if p.name.startswith(".tmp-"):
                continue
            try:
                out.append((p, p.stat()))
            except FileNotFoundError:  # removed meanwhile by another process
                pass
        return out

    def size(self) -> int:
        return sum(st.st_size for _, st in self.entries())

    def trim(self) -> None:
        """Remove the least recently used entries until the folder holds at most ``max_bytes``."""
        stale = time.time() - STALE_TMP_SECONDS  # unfinished files of writers that died (a write takes ms)
        for p in self.root.glob("*/.tmp-*"):
            try:
                if p.stat().st_mtime < stale:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        entries = sorted(self.entries(), key=lambda e: e[1].st_mtime_ns)
        total = sum(st.st_size for _, st in entries)
        for p, st in entries:
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= st.st_size


def default_cache() -> PredictionCache | None:
    """The cache the CLI and the app use: ``WSVIZ_CACHE_DIR`` (``off``: none), ``WSVIZ_CACHE_MB``."""
    where = os.environ.get("WSVIZ_CACHE_DIR", "").strip()
    if where.lower() in ("off", "0", "none", "false"):
        return None
    root = Path(where) if where else Path.home() / ".cache" / "wsviz" / "predictions"
    try:
        mb = float(os.environ.get("WSVIZ_CACHE_MB", DEFAULT_MB))
    except ValueError:
        from wsviz.errors import WsvizError

        raise WsvizError(f"WSVIZ_CACHE_MB must be a number of megabytes, got {os.environ['WSVIZ_CACHE_MB']!r}.") from None
    return PredictionCache(root, int(mb * 2**20))
