"""Numbers read from environment variables, refused with a message that names the variable."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from wsviz.errors import WsvizError


def positive_number(env: Mapping[str, str], var: str, kind: Callable[[str], float], default: float | None = None,
                    unset_hint: str = "") -> float | None:
    """``kind(env[var])`` when it is set and above 0; ``default`` when it is unset or blank."""
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise WsvizError(f"{var} must be a number, got {raw!r}.") from None
    if value <= 0:
        raise WsvizError(f"{var} must be above 0, got {raw!r}{unset_hint}.")
    return value
