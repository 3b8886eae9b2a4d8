"""Name -> builder registry with metadata (in the spirit of timm's ``create_model``).

The app, the CLI and the tests enumerate models through :func:`list_models` and build
them through :func:`create_model`; nothing else constructs a model.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
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


def list_models(family: str | None = None) -> list[ModelSpec]:
    """All registered models (optionally one family), sorted by family then name."""
    _ensure_loaded()
    specs = [s for s in _REGISTRY.values() if family is None or s.family == family]
    return sorted(specs, key=lambda s: (s.family, s.name))


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


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model. ``overrides`` replace its default configuration.

    The result carries ``model.wsviz_name`` and ``model.wsviz_config`` (the full config),
    which is what a checkpoint card records to rebuild it.
    """
    spec = get_spec(name)
    cfg = spec.config(**overrides)
    params = inspect.signature(spec.builder).parameters
    kwargs = {k: v for k, v in cfg.items() if k in params}
    try:
        model = spec.builder(**kwargs)
    except ValueError as exc:  # a combination of options the architecture cannot take
        raise WsvizError(f"Cannot build {name!r} with {overrides}: {exc}") from exc
    model.wsviz_name = name
    model.wsviz_config = cfg
    return model


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one input image for a model made by :func:`create_model`."""
    cfg = getattr(model, "wsviz_config", None)
    if cfg is None:
        raise WsvizError("This model was not made by wsviz.models.create_model; pass input_shape explicitly.")
    return (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
