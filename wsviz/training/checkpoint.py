"""Checkpoints: safetensors weights + a JSON model card, written atomically, loaded without pickle.

A checkpoint is a folder holding ``weights.safetensors`` and ``card.json``. Both are written
to temporary names in the same folder and then renamed into place (weights, then the card,
microseconds apart), so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.overrides import TorchFunctionMode

from wsviz.errors import WsvizError
from wsviz.models.modes import eval_mode
from wsviz.training.cards import CARD, WEIGHTS, check_weights, read_card


def disk_full_errno(exc: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``exc`` says the disk (or the user's quota) is full, else None;
    safetensors' writer says it in its message only."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return exc.errno
    low = str(exc).lower()
    if "no space left on device" in low:
        return errno.ENOSPC
    if "disk quota exceeded" in low:
        return errno.EDQUOT
    return None


def _write_temp(path: Path, write) -> str:
    """Write a file next to ``path`` under a temporary name (``.NAME.XXXX.tmp``), synced; returns that name.

    A full disk raises an OSError (ENOSPC...) naming ``path``, the file that could not be saved (not
    its discarded temporary name), whichever writer failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are meant to be shared
    except BaseException as exc:
        _discard(tmp)
        code = disk_full_errno(exc)
        if code is not None:
            words = (exc.strerror if isinstance(exc, OSError) else None) or os.strerror(code)
            raise OSError(code, words, str(path)) from exc
        raise
    return tmp


def _discard(tmp: str) -> None:
    if os.path.exists(tmp):
        os.unlink(tmp)


def save_checkpoint(folder: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``card`` into ``folder`` atomically; returns the folder.

    Both files are written and synced under temporary names first and only then renamed into
    place, weights just before the card: a crash while writing (a kill, a full disk) leaves the
    previous checkpoint whole, and the two renames are microseconds apart, with SIGTERM and SIGINT
    held back between them (a handler that raises runs after both). A tied model's groups
    (``model.wsviz_tie``, see :func:`wsviz.models.tie.tie`) go into the card's ``tied`` entry, so
    :func:`load_checkpoint` ties them again.
    """
    folder = Path(folder)
    tie = getattr(model, "wsviz_tie", None)
    if tie:
        card = {**card, "tied": {**(card.get("tied") or {}), **tie}}
    text = json.dumps(card, indent=2, sort_keys=True, default=str)
    meta = weights_metadata(card)
    with eval_mode(model):  # e2cnn caches its expanded filters in eval mode: store only real state
        tmp_w = _write_temp(folder / WEIGHTS, lambda p: save_model(model, p, metadata=meta))
    try:
        tmp_c = _write_temp(folder / CARD, lambda p: Path(p).write_text(text))
    except BaseException:
        _discard(tmp_w)
        raise
    with _signals_held():  # a SIGTERM/SIGINT handler that raises waits until both are in place
        try:
            os.replace(tmp_w, folder / WEIGHTS)
            os.replace(tmp_c, folder / CARD)
        except BaseException:
            _discard(tmp_w)
            _discard(tmp_c)
            raise
    return folder


@contextlib.contextmanager
def _signals_held():
    """Hold back SIGTERM and SIGINT for the duration: one arriving meanwhile is noted and raised
    again on leaving, so the handler it was meant for (one that raises, as the trainer's does) runs
    after both renames and cannot pair epoch N's weights with epoch N-1's card.

    Python runs signal handlers in the main thread whichever thread the OS delivered the signal to
    (a trainer has DataLoader, TensorBoard and tqdm threads), so blocking the signal in this thread's
    mask would not hold it; the Python-level handlers are swapped instead. Off the main thread, where
    handlers cannot be set, nothing is held: a handler then raises in the main thread, not here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def weights_metadata(card: dict[str, Any]) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint's weights: ``format: pt`` (what
    safetensors and the Hugging Face tools expect of PyTorch weights), and the model and its
    options, so the weights file alone says what to build (the card says it in full)."""
    meta = {"format": "pt"}
    if isinstance(card.get("model"), str):
        meta["wsviz_model"] = card["model"]
        meta["wsviz_config"] = json.dumps(card.get("config", {}), sort_keys=True, default=str)
    return meta


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a card names and load its weights (safetensors only: no pickle, no code runs).

    Only ``card.json`` and ``weights.safetensors`` are read; any other file in the folder (a
    ``model.pt``, ``pytorch_model.bin``...) is ignored. Whatever is wrong with either file (not
    JSON, an unknown model or option, an option of the wrong type, a pickle under the weights'
    name, a truncated file, weights of another shape than the card's model) raises a
    :class:`WsvizError` that says so. Weights that do not fit are refused before the model is
    built for real (it is first built on the meta device, which allocates nothing), so a card
    cannot make the loader allocate far more than its weights hold; e2cnn's steerable models,
    which cannot be built on meta, are checked once built. A tied model (its card's ``tied``
    entry) gets the same groups tied before its weights are loaded.
    """
    from wsviz.models import create_model

    folder = Path(folder)
    card = read_card(folder)
    name, config = card["model"], _checked_config(card["model"], card.get("config", {}), folder / CARD)
    check_weights(folder)  # reads the header only: a renamed pickle or a cut file is named as such
    path = folder / WEIGHTS
    shapes = _file_shapes(path)
    meta = _tied(_meta_model(name, config, folder / CARD), card, folder)
    if meta is not None:  # shapes checked before any memory is spent on the model
        _check_fit(path, name, meta, shapes)
    try:
        model = create_model(name, **config)
    except WsvizError:
        raise
    except (TypeError, ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        raise WsvizError(f"The model card {folder / CARD} describes a {name} that cannot be built "
                         f"({type(exc).__name__}: {exc}); re-create the checkpoint.") from exc
    _tied(model, card, folder)
    if meta is None:  # e2cnn: only the built model can be checked
        _check_fit(path, name, model, shapes)
    _load_into(model, path, device)
    model.to(device).eval()
    return model, card


def _tied(model: nn.Module | None, card: dict[str, Any], folder: Path) -> nn.Module | None:
    """``model`` with the conv groups its card records as tied made to share one weight (a model
    tied by :func:`wsviz.models.tie.tie`; its weights hold each tied kernel once)."""
    from wsviz.models.tie import apply_ties
    from wsviz.training.cards import tied_groups

    groups = tied_groups(card)
    if model is None or not groups:
        return model
    try:
        apply_ties(model, groups)
    except WsvizError as exc:
        raise WsvizError(f"The model card {folder / CARD} ties groups its model does not have: {exc} "
                         "Re-create the checkpoint.") from exc
    model.wsviz_tie = {**card["tied"], "groups": groups}
    return model


def load_weights(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Load a bare ``.safetensors`` state of ``model`` (no card), refusing weights that do not fit
    with the keys named. Safetensors only: nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise WsvizError(f"{path} does not exist; give a .safetensors file.")
    shapes = _file_shapes(path)
    _check_fit(path, name or type(model).__name__, model, shapes, card=False)
    _load_into(model, path, "cpu")
    return model


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors header (no tensor data read)."""
    from wsviz.training.cards import _foreign_format

    with open(path, "rb") as fh:
        foreign = _foreign_format(fh.read(8))
    if foreign:
        raise WsvizError(f"{path} is {foreign}, not a safetensors file; wsviz never unpickles weights (loading a "
                         "pickle can run any code it contains). Convert a state dict you trust with "
                         "`python -m wsviz import`.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WsvizError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or not a "
                         "safetensors file at all. Re-create it.") from exc


def _load_into(model: nn.Module, path: Path, device: str | torch.device) -> None:
    """safetensors' own ``load_model`` (it knows which names of one shared tensor it stored: e2cnn's
    aliased basis buffers), strict, after the shapes were checked."""
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WsvizError(f"The weights in {path} could not be loaded ({exc}); re-create the checkpoint.") from exc


def _checked_config(name: str, config: dict[str, Any], card: Path | None = None) -> dict[str, Any]:
    """``config`` if model ``name`` exists and takes every option at its default's type; else a
    WsvizError worded for the model card ``card`` it came from, or for options a user typed."""
    from wsviz.models import get_spec

    source = f"The model card {card}" if card else "The model options"
    fix = "re-create the checkpoint" if card else "change that option"
    try:
        spec = get_spec(name)
        defaults = spec.config()
        spec.config(**config)  # unknown options, values outside their choices
    except WsvizError as exc:
        if card is None:
            raise
        raise WsvizError(f"{source} cannot be used: {exc} Re-create the checkpoint (or update wsviz, "
                         "if a newer version wrote it).") from exc
    for key, value in config.items():
        want = defaults[key]
        if isinstance(want, bool):
            ok, words = isinstance(value, bool) or value in (0, 1), "true or false"  # 0/1: `--set shared=1`
        elif isinstance(want, int):
            ok, words = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(want, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            words = "a finite number"
        else:
            ok, words = want is None or isinstance(value, type(want)), f"a {type(want).__name__}"
        if not ok:
            raise WsvizError(f"{source} gives {spec.name} the option {key}={value!r}, but it must be "
                             f"{words} (default {want!r}); {fix}.")
    return config


# e2cnn's steerable layers compute their bases from real tensors: they cannot be built on the
# meta device, so their weights are checked once the model is built for real.
_NO_META_FAMILIES = ("equivariant",)
# torch.device("meta") is per thread, but entering it also sets a module global that it restores
# on exit (torch.utils._device.CURRENT_DEVICE): one meta build at a time (they take milliseconds).
_META_LOCK = threading.Lock()


class _NoRandomFill(TorchFunctionMode):
    """Skips filling and scaling meta tensors, which hold no data.

    PyTorch implements those operations on meta tensors in Python, and the first one imports
    torch._dynamo (about a second); without them every model but e2cnn's builds on meta
    without it. Modes are per thread, like torch.device("meta") itself.
    """

    FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_,
                       torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
                       torch.Tensor.geometric_})
    SCALINGS = frozenset({torch.Tensor.mul, torch.Tensor.__mul__, torch.mul})  # e.g. torch.rand(...) * 1e-3

    def __torch_function__(self, func, types, args=(), kwargs=None):
        meta = bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_meta
        if meta and func in self.FILLS:
            return args[0]
        if meta and func in self.SCALINGS and len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs:
            return torch.empty_like(args[0], dtype=torch.result_type(args[0], args[1]))
        return func(*args, **(kwargs or {}))


def build_on_meta(name: str, config: dict[str, Any]) -> nn.Module | None:
    """The registered model ``name`` with options ``config`` (checked: names and types) built on the
    meta device (shapes only, no memory), or None for e2cnn models, which cannot be built there."""
    return _meta_model(name, _checked_config(name, config))


def _meta_model(name: str, config: dict[str, Any], card: Path | None = None) -> nn.Module | None:
    """The model built on the meta device (shapes only, no memory), or None for e2cnn models; errors
    are worded for the model card ``card`` it came from, or for options a user typed."""
    from wsviz.models import create_model, get_spec

    if get_spec(name).family in _NO_META_FAMILIES:
        return None
    try:
        with _META_LOCK, torch.device("meta"), _NoRandomFill():
            return create_model(name, **config)
    except WsvizError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. sizes too large to even describe
        what = f"The model card {card} describes a {name}" if card else f"These options make a {name}"
        raise WsvizError(f"{what} that cannot be built ({type(exc).__name__}: {exc}); "
                         + ("re-create the checkpoint." if card else "change them.")) from exc


def _check_fit(path: Path, name: str, model: nn.Module, shapes: dict[str, tuple[int, ...]], card: bool = True) -> None:
    """Raise a WsvizError unless the file's tensors (``shapes``) are exactly ``model``'s, at their shapes."""
    expected = model.state_dict(keep_vars=True)
    # safetensors' save_model stores one of several names for the same tensor (e2cnn's shared
    # basis buffers): a name is missing only if no name of its tensor is in the file.
    groups: dict[int, list[str]] = {}
    for k, v in expected.items():
        groups.setdefault(_identity(v), []).append(k)
    missing = [k for k, v in expected.items() if not any(a in shapes for a in groups[_identity(v)])]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in shapes if k in expected and tuple(shapes[k]) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(x for x in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"wrong shape {[(k, tuple(shapes[k]), tuple(expected[k].shape)) for k in wrong[:3]]}" if wrong else "",
        ) if x)
        if card:
            raise WsvizError(f"The weights in {path} do not fit the model its card describes ({name}): {detail}. "
                             "The card or the weights were changed or mixed up; re-create the checkpoint.")
        raise WsvizError(f"The weights in {path} do not fit {name} with these options: {detail}. Pass the options "
                         "the weights were saved with, or the weights of this model.")


def _identity(t: torch.Tensor) -> int:
    """Same number for tensors that are one (the same object, or the same memory once built)."""
    return id(t) if t.is_meta else t.data_ptr()
