"""Import weights people have: a plain PyTorch state dict into a wsviz checkpoint.

    python -m wsviz import --model msws_resnet18 --set sharing=vanilla --weights resnet18.pth --out checkpoints/r18

* ``.pt`` / ``.pth`` files are read with ``torch.load(weights_only=True)``: PyTorch's
  restricted unpickler, which builds tensors and plain containers and refuses every other
  object, so a file that carries code is refused before any of it runs. ``.safetensors``
  files are read with safetensors. Every other file type is refused, with the reason.
* A state dict wrapped the way training scripts save it (``{"state_dict": ...}``,
  ``{"model": ...}``, a ``module.`` prefix from ``DataParallel``) is unwrapped.
* torchvision's (and timm's) ResNet key layout — ``conv1``, ``bn1``, ``layer1.0.conv1``,
  ``downsample``, ``fc`` — is mapped onto wsviz's ResNet skeleton (``trunk.stem``,
  ``trunk.stages.0.0.conv1``, ``shortcut``, ``head.fc``). Given the same input tensor, wsviz's
  unshared baselines compute what torchvision's ResNets compute: ``msws_resnet{18,34,50,101,152}``
  with ``sharing=vanilla`` and ``sharesnet{34,50,101,152}`` with ``shared=False``. wsviz's analyses
  feed [0, 1] pixels with no mean/std normalisation, so weights trained on ``Normalize`` inputs
  need it folded into the model (README: own models).
* Keys that do not fit the model (missing, unexpected, another shape) are refused with the
  keys named; nothing is loaded partially.

The result is an ordinary checkpoint folder (``weights.safetensors`` + ``card.json``) that
the app lists and :func:`wsviz.models.create_model` loads with ``checkpoint_path=``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import shlex
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsviz.errors import WsvizError

PICKLED = (".pt", ".pth")
SAFETENSORS = (".safetensors",)
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")

# torchvision / timm ResNet -> wsviz ResNet skeleton (wsviz.models.resnets.ResNet)
_TORCHVISION_RESNET = [
    (re.compile(r"^conv1\.(.+)$"), r"trunk.stem.0.\1"),
    (re.compile(r"^bn1\.(.+)$"), r"trunk.stem.1.\1"),
    (re.compile(r"^layer([1-9])\.(\d+)\.downsample\.(\d+)\.(.+)$"), lambda m: (
        f"trunk.stages.{int(m[1]) - 1}.{m[2]}.shortcut.{m[3]}.{m[4]}")),
    (re.compile(r"^layer([1-9])\.(\d+)\.(.+)$"), lambda m: f"trunk.stages.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (re.compile(r"^fc\.(.+)$"), r"head.fc.\1"),
]
FITS_TORCHVISION = {
    "resnet18": "msws_resnet18 --set sharing=vanilla", "resnet34": "sharesnet34 --set shared=false",
    "resnet50": "sharesnet50 --set shared=false (or msws_resnet50 --set sharing=vanilla)",
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Never unpickles anything but tensors and plain containers; any other file type, a file
    that carries other objects, and a file that holds no state dict are refused with a
    :class:`WsvizError` that says why.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PICKLED + SAFETENSORS:
        raise WsvizError(
            f"{path.name}: wsviz imports .pt / .pth files (a state dict saved with torch.save, read with "
            "torch.load(weights_only=True), which runs no code) and .safetensors files; "
            f"{suffix or 'a file without a suffix'} is neither, so it is not read. If it is a state dict saved by "
            "torch.save, rename it to .pt; other formats (pickled models, .pkl, .npz, TensorFlow) convert first.")
    if not path.is_file():
        raise WsvizError(f"{path} does not exist (check the path given to --weights).")
    if suffix in SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WsvizError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or a file of "
                             "another format renamed.") from exc
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the refusal below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: all mean "refused"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unreadable = _unreadable_pickle(path)
        if unreadable is not None:  # torch's weights-only loader calls any such file one of other objects
            raise WsvizError(
                f"{path} is not a readable checkpoint: not a file torch.save (or safetensors) wrote, or one cut short "
                f"or damaged ({unreadable}). Check the file (a complete download or copy), or save the state dict "
                "again: torch.save(model.state_dict(), 'weights.pt').") from exc
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise WsvizError(
                f"{path} holds Python objects other than tensors, so it was refused without running them "
                f"(torch.load(weights_only=True): {first[:300]}). Save the model's state dict instead: "
                "torch.save(model.state_dict(), 'weights.pt') where you trust the code that made it.") from exc
        raise WsvizError(f"{path} is not a file torch.save wrote, or it is damaged ({type(exc).__name__}: "
                         f"{first[:300]}).") from exc
    return _state_of(obj, path)


def _unreadable_pickle(path: Path) -> str | None:
    """Why ``path`` is neither torch.save's zip archive nor one whole pickle (read as opcodes, never run), or
    None when it may be either."""
    import pickletools

    try:
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":  # torch.save's archive: torch's own error says what is wrong
                return None
            fh.seek(0)
            for _ in pickletools.genops(fh):  # reads to the pickle's STOP; runs nothing
                pass
    except OSError as exc:
        return exc.strerror or str(exc)
    except Exception as exc:  # noqa: BLE001 - ValueError (unknown opcode, cut short) and the like
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def _is_state(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _state_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what torch.load returned (unwrapping a training script's dict)."""
    if _is_state(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if _is_state(obj.get(key)):
                return dict(obj[key])
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        others = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if tensors and others:
            raise WsvizError(f"{path} holds tensors and other entries ({', '.join(map(str, others[:5]))}); "
                             f"save only the state dict (or nest it under one of {', '.join(_WRAPPERS)}).")
    raise WsvizError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of parameter names to "
                     "tensors); save one with torch.save(model.state_dict(), path).")


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DataParallel / DDP) or ``model.`` prefix that every key has."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def is_torchvision_resnet(state: dict[str, torch.Tensor]) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def map_torchvision_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ResNet keys renamed onto wsviz's ResNet skeleton (others kept as they are)."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _TORCHVISION_RESNET:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                break
        out[new] = value
    return out


_WSVIZ_RESNET = [
    (re.compile(r"^trunk\.stem\.0\.(.+)$"), r"conv1.\1"),
    (re.compile(r"^trunk\.stem\.1\.(.+)$"), r"bn1.\1"),
    (re.compile(r"^trunk\.stages\.(\d+)\.(\d+)\.shortcut\.(\d+)\.(.+)$"), lambda m: (
        f"layer{int(m[1]) + 1}.{m[2]}.downsample.{m[3]}.{m[4]}")),
    (re.compile(r"^trunk\.stages\.(\d+)\.(\d+)\.(.+)$"), lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[3]}"),
    (re.compile(r"^head\.fc\.(.+)$"), r"fc.\1"),
]


def torchvision_name(key: str) -> str:
    """The torchvision ResNet name of a wsviz ResNet key (the key itself when there is none)."""
    for pattern, repl in _WSVIZ_RESNET:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def fit_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape descriptions) of ``state`` against ``model``'s state dict. A
    BatchNorm's ``num_batches_tracked`` may be missing (state dicts saved before PyTorch 0.4.1):
    ``load_state_dict`` fills it in, as torchvision's own loading does."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (the model's is {tuple(expected[k].shape)})"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    return missing, unexpected, wrong


def _listed(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def import_weights(model_name: str, weights: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                   dataset: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Turn the state dict in ``weights`` into a wsviz checkpoint of ``model_name`` in ``out``; returns the card.

    For torchvision's layout, ``num_classes`` and ``in_channels`` are read from ``fc`` and
    ``conv1`` unless given in ``overrides``. ``dataset`` (optional) records what the weights
    were trained on, so the app can evaluate them; it must fit the model, and unless
    ``overrides`` sets ``input_size`` the model takes the dataset's image size (a model that
    cannot is refused: give the size the weights were trained at as ``input_size``).

    ``out`` must not hold a checkpoint yet (neither ``card.json`` nor ``weights.safetensors``),
    and ``weights`` must not be one of the files written there. wsviz feeds models [0, 1] pixels
    with no normalisation: weights trained on ``Normalize(mean, std)`` inputs need it folded in.
    """
    import wsviz
    from wsviz.models import create_model, get_spec, summarize
    from wsviz.training.cards import CARD, WEIGHTS
    from wsviz.training.checkpoint import save_checkpoint

    out = Path(out)
    written = [out / CARD, out / WEIGHTS]
    if Path(weights).resolve() in {f.resolve() for f in written}:
        raise WsvizError(f"--weights {weights} is a file --out {out} would write; give another --out folder.")
    for f in written:
        if f.exists():
            raise WsvizError(f"--out {out} already holds a checkpoint file ({f.name}); give a new folder (nothing there "
                             "is replaced), or move that file away first.")
    spec = get_spec(model_name)
    overrides = dict(overrides or {})
    size_from_dataset = None
    if dataset is not None:
        from wsviz.data.datasets import dataset_info

        info = dataset_info(dataset)  # an unknown name is refused before any file is read
        if "input_size" not in overrides and not dataset.startswith("folder:"):  # folders fit any input size
            size_from_dataset = overrides["input_size"] = info.size
    state = strip_prefix(read_state_dict(weights))
    layout = "wsviz"
    if is_torchvision_resnet(state):
        layout = "torchvision-resnet"
        fc, conv1 = state.get("fc.weight"), state.get("conv1.weight")
        if "num_classes" not in overrides and fc is not None and fc.dim() == 2:
            overrides["num_classes"] = int(fc.shape[0])
        if "in_channels" not in overrides and conv1 is not None and conv1.dim() == 4:
            overrides["in_channels"] = int(conv1.shape[1])
    try:
        model = create_model(model_name, **overrides)
    except (WsvizError, TypeError, ValueError, RuntimeError) as exc:
        if size_from_dataset is None:
            raise
        raise WsvizError(f"--dataset {dataset} has {size_from_dataset}-px images, but {model_name} cannot be built "
                         f"for them ({exc}); give the size the weights were trained at with --set input_size=N."
                         ) from exc
    if size_from_dataset is not None and model.wsviz_config.get("input_size") != size_from_dataset:
        raise WsvizError(f"--dataset {dataset} has {size_from_dataset}-px images, but {model_name} takes "
                         f"{model.wsviz_config.get('input_size')}-px inputs; give the size the weights were trained "
                         "at with --set input_size=N.")
    if layout == "torchvision-resnet":
        if "trunk.stem.0.weight" not in model.state_dict():
            raise WsvizError(f"{Path(weights).name} is in torchvision's ResNet layout, but {model_name} is not a "
                             "wsviz ResNet; torchvision ResNets import into: "
                             + "; ".join(f"{k} -> {v}" for k, v in FITS_TORCHVISION.items()) + ".")
        state = map_torchvision_resnet(state)
    missing, unexpected, wrong = fit_problems(model, state)
    if layout == "torchvision-resnet":  # name the keys as the file (torchvision) names them
        missing = [f"{torchvision_name(k)} (wsviz: {k})" for k in missing]
        unexpected = [torchvision_name(k) for k in unexpected]
        wrong = [torchvision_name(w.split(" ", 1)[0]) + " " + w.split(" ", 1)[1] for w in wrong]
    if missing or unexpected or wrong:
        parts = [f"missing {len(missing)}: {_listed(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {_listed(unexpected)}" if unexpected else "",
                 f"wrong shape {len(wrong)}: {_listed(wrong, 5)}" if wrong else ""]
        hint = ""
        if layout == "torchvision-resnet":
            hint = " torchvision ResNets fit wsviz's unshared baselines: " + "; ".join(
                f"{k} -> {v}" for k, v in FITS_TORCHVISION.items()) + "."
        if size_from_dataset is not None:
            hint += (f" (input_size={size_from_dataset} came from --dataset {dataset}; if the weights were trained at "
                     "another size, give it with --set input_size=N)")
        raise WsvizError(f"The weights in {Path(weights).name} do not fit {model_name} with "
                         f"{overrides or 'its default options'}: {'; '.join(p for p in parts if p)}.{hint}")
    if dataset is not None:
        cfg = model.wsviz_config
        if (cfg["in_channels"], cfg["num_classes"]) != (info.channels, info.num_classes):
            raise WsvizError(f"--dataset {dataset} has {info.channels}-channel images of {info.num_classes} classes; "
                             f"the weights make a {model_name} for {cfg['in_channels']} channels and "
                             f"{cfg['num_classes']} classes.")
    model.load_state_dict(state, strict=True)
    model.eval()
    s = summarize(model)
    card = {
        "model": model_name, "config": model.wsviz_config, "family": spec.family, "paper": spec.paper,
        "imported_from": {"file": Path(weights).name, "sha256": _sha256(Path(weights)), "layout": layout,
                          "tensors": len(state)},
        "test_accuracy": None, "complete": True, "epochs_done": None,
        "unique_params": s.unique_params, "effective_params": s.effective_params, "flops": s.flops,
        "sign_mask_params": s.mask_params,
        "wsviz_version": wsviz.__version__, "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command or import_command(model_name, weights, out, overrides, dataset),
    }
    if dataset is not None:
        card.update({"dataset": dataset, "test_split": "test", "data_seed": 0})
    save_checkpoint(out, model, card)
    return card


def import_command(model_name: str, weights: str | Path, out: str | Path, overrides: dict[str, Any],
                   dataset: str | None) -> str:
    """The command line that makes this checkpoint again."""
    import json

    parts = ["python", "-m", "wsviz", "import", "--model", model_name]
    for k, v in overrides.items():
        parts += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    parts += ["--weights", str(weights), "--out", str(out)]
    if dataset:
        parts += ["--dataset", dataset]
    return " ".join(shlex.quote(p) for p in parts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
