"""Name -> builder registry with metadata, with timm's conventions.

* :func:`list_models` returns model *names* (``pattern`` filters with shell wildcards, as
  ``timm.list_models("resnet*")`` does);
* :func:`get_spec` is where the metadata lives (family, paper, defaults, choices, input);
* :func:`create_model` builds one; ``checkpoint_path=`` loads a wsviz checkpoint into it and
  ``pretrained=True`` the trained variant wsviz has for it (see :mod:`wsviz.models.hub`).

The app, the CLI and the tests enumerate models through :func:`list_models` and build
them through :func:`create_model`; nothing else constructs a model.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from wsviz.errors import WsvizError

# Keys every model accepts: they describe the data, not the architecture.
DATA_KEYS = ("num_classes", "in_channels", "input_size")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model name."""

    name: str
    family: str
    paper: str
    description: str
    builder: Callable[..., nn.Module] = field(repr=False)
    defaults: dict[str, Any]
    choices: dict[str, tuple[Any, ...]]
    num_classes: int
    in_channels: int
    input_size: int

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The full configuration: defaults, data keys, then validated ``overrides``."""
        cfg = {**self.defaults, "num_classes": self.num_classes,
               "in_channels": self.in_channels, "input_size": self.input_size}
        unknown = [k for k in overrides if k not in cfg]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, list(cfg), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise WsvizError(
                f"Model {self.name!r} has no option {key!r}.{hint} "
                f"Its options are: {', '.join(sorted(cfg))}."
            )
        for key, value in overrides.items():
            allowed = self.choices.get(key)
            if allowed is not None and value not in allowed:
                raise WsvizError(
                    f"Option {key}={value!r} is not valid for {self.name!r}; "
                    f"choose one of {', '.join(repr(a) for a in allowed)}."
                )
            if key in DATA_KEYS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise WsvizError(f"Option {key} must be a positive integer, got {value!r}.")
        cfg.update(overrides)
        return cfg


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    paper: str,
    description: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    choices: dict[str, tuple[Any, ...]] | None = None,
    **defaults: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder`` under ``name`` with its defaults and metadata."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name, family=family, paper=paper, description=description, builder=builder,
            defaults=dict(defaults), choices=dict(choices or {}),
            num_classes=num_classes, in_channels=in_channels, input_size=input_size,
        )
        return builder

    return deco


def _ensure_loaded() -> None:
    # Importing the family modules fills the registry.
    from wsviz.models import (  # noqa: F401
        equivariant,
        msws,
        repeatnet,
        shardnet,
        sharesnet,
        wsms,
    )


def list_models(pattern: str | Iterable[str] | None = None, *, family: str | None = None,
                pretrained: bool = False) -> list[str]:
    """Names of the registered models, sorted by family then name (timm's ``list_models``).

    ``pattern`` keeps the names matching a shell wildcard (``"msws_*"``, ``"*resnet50"``) or any
    of several; ``family`` keeps one family; ``pretrained=True`` keeps the models that have a
    trained wsviz checkpoint (:func:`wsviz.models.hub.pretrained_checkpoints`). The metadata of
    a name comes from :func:`get_spec`.
    """
    _ensure_loaded()
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))
    names = [s.name for s in specs if family is None or s.family == family]
    if pattern is not None:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if pretrained:
        from wsviz.models.hub import pretrained_checkpoints

        have = {model for model, _, _ in pretrained_checkpoints()}
        names = [n for n in names if n in have]
    return names


def families() -> list[str]:
    """The registered families, sorted."""
    _ensure_loaded()
    return sorted({s.family for s in _REGISTRY.values()})


def get_spec(name: str) -> ModelSpec:
    """The spec for ``name``; an unknown name raises :class:`WsvizError` with close matches."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise WsvizError(
            f"Unknown model {name!r}.{hint} `python -m wsviz models` lists all of them."
        ) from None


# Optional packages a model needs, and the extra of ``pip install wsviz[...]`` that brings them.
_EXTRAS = {"e2cnn": "equivariant"}


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | Path | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model. ``overrides`` replace its default configuration.

    ``checkpoint_path``: a wsviz checkpoint folder (``card.json`` + ``weights.safetensors``),
    or a bare ``.safetensors`` file holding this model's state, loaded into the model (its card
    must name the same model; its options are used, and ``overrides`` must agree with them).
    ``pretrained=True``: the trained checkpoint wsviz has for this model and these options
    (:func:`wsviz.models.hub.find_pretrained`). Either way the weights are read with
    safetensors only; weights that do not fit are refused with the keys named.

    The result carries ``model.wsviz_name`` and ``model.wsviz_config`` (the full config),
    which is what a checkpoint card records to rebuild it.
    """
    if pretrained or checkpoint_path is not None:
        from wsviz.models.hub import load_pretrained

        return load_pretrained(name, checkpoint_path, overrides)
    spec = get_spec(name)
    cfg = spec.config(**overrides)
    params = inspect.signature(spec.builder).parameters
    kwargs = {k: v for k, v in cfg.items() if k in params}
    try:
        model = spec.builder(**kwargs)
    except ValueError as exc:  # a combination of options the architecture cannot take
        raise WsvizError(f"Cannot build {name!r} with {overrides}: {exc}") from exc
    except ModuleNotFoundError as exc:  # an optional dependency (e2cnn) that is not installed
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        raise WsvizError(f"{name!r} needs the package {top!r}, which is not installed: "
                         f"pip install 'wsviz[{_EXTRAS[top]}]' (or pip install {top}).") from exc
    model.wsviz_name = name
    model.wsviz_config = cfg
    return model


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one input image: from the config of a model made by
    :func:`create_model`, or the shape given to :func:`wsviz.adopt`."""
    cfg = getattr(model, "wsviz_config", None)
    if cfg is not None:
        return (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    from wsviz.models.adopt import adoption

    adopted = adoption(model)
    if adopted is not None:
        return adopted.input_shape
    raise WsvizError(f"wsviz does not know the input of this {type(model).__name__}: it was not made by "
                     "wsviz.create_model. Adopt it first: wsviz.adopt(model, input_shape=(C, H, W)).")


def num_classes(model: nn.Module) -> int | None:
    """How many classes the model outputs, if wsviz knows (its config, or what adopt found)."""
    cfg = getattr(model, "wsviz_config", None)
    if cfg is not None:
        return cfg.get("num_classes")
    from wsviz.models.adopt import adoption

    adopted = adoption(model)
    return adopted.num_classes if adopted is not None else None
