"""What a rotation sweep and the rotation zoo amount to, counted honestly.

* :func:`rotation_summary`: per model, the mean accuracy, the worst angle and the mean agreement
  with the 0-degree prediction over the *distinct* angles of a sweep. A sweep may list 360
  degrees to close its curve, but rotating by 360 is rotating by 0 (the operator returns its
  input exactly), so a mean over the listed values would weigh that one angle twice.
* :func:`flops_matches`: how close each RepeatNet variant sized to a steerable C_N model's FLOPs
  (``match='cN'``) comes to that model, as the accounting counts both, so a page states the gap
  instead of claiming a match (at the zoo's width 0.25 the C8 pair is 6.4% apart).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from wsviz.analysis.sweeps import SweepResult
from wsviz.errors import WsvizError


def distinct_angles(values) -> np.ndarray:
    """Indices of the first occurrence of each angle modulo 360 in ``values`` (degrees), in order:
    0 and 360 (or -90 and 270) are one angle."""
    seen: set[float] = set()
    keep = []
    for i, v in enumerate(np.asarray(values, dtype=float)):
        key = round(float(v) % 360.0, 6) % 360.0  # 359.9999999 is 0
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True)
class RotationSummary:
    """One model over the distinct angles of a sweep."""

    model: str
    angles: int  # distinct angles (modulo 360) the numbers are over
    mean_accuracy: float
    worst_angle: float  # in [0, 360)
    worst_accuracy: float
    mean_agreement: float  # with the 0-degree prediction, over the distinct angles other than 0 (NaN if none)
    worst_ties: int = 1  # distinct angles at exactly the worst accuracy (the first of them is worst_angle)

    def row(self) -> dict:
        return {"model": self.model, "mean accuracy": self.mean_accuracy, "worst angle": self.worst_angle,
                "angles tied at the worst": self.worst_ties,
                "accuracy at the worst angle": self.worst_accuracy,
                "agreement with 0° (mean over the other angles)": self.mean_agreement,
                "distinct angles": self.angles}


def rotation_summary(res: SweepResult) -> list[RotationSummary]:
    """Per model (best mean accuracy first): its numbers over the sweep's distinct angles modulo 360."""
    if res.parameter != "angle":
        raise WsvizError(f"A rotation summary needs a rotation sweep, got a {res.parameter} sweep.")
    keep = distinct_angles(res.values)
    if not len(keep):
        raise WsvizError("The sweep has no angles to summarise.")
    angles = np.asarray(res.values, dtype=float)[keep] % 360.0
    others = np.abs(angles) > 1e-6
    out = []
    for m, acc in res.accuracy.items():
        a = np.asarray(acc, dtype=float)[keep]
        agree = np.asarray(res.agreement[m], dtype=float)[keep][others]
        worst = int(np.nanargmin(a)) if np.isfinite(a).any() else 0
        ties = int(np.sum(a == a[worst])) if np.isfinite(a[worst]) else 0  # all angles at it, the named one included
        out.append(RotationSummary(m, len(keep), float(np.mean(a)), float(angles[worst]), float(a[worst]),
                                   float(np.mean(agree)) if len(agree) else float("nan"), ties))
    return sorted(out, key=lambda s: -s.mean_accuracy if np.isfinite(s.mean_accuracy) else np.inf)


@dataclass(frozen=True)
class FlopsMatch:
    """A RepeatNet variant sized to a steerable C_N model's FLOPs, against that model."""

    repeat: str
    steerable: str
    group: str  # "C8"
    repeat_flops: int
    steerable_flops: int

    @property
    def gap(self) -> float:
        """Relative difference |repeat - steerable| / steerable (0.064 = 6.4%)."""
        return abs(self.repeat_flops - self.steerable_flops) / max(self.steerable_flops, 1)

    def sentence(self) -> str:
        more = "more" if self.repeat_flops > self.steerable_flops else "fewer"
        return (f"{self.repeat} ({self.repeat_flops / 1e6:.2f} MFLOPs) and {self.steerable} "
                f"({self.steerable_flops / 1e6:.2f} MFLOPs): matched within {100 * self.gap:.1f}% "
                f"({self.group}; the RepeatNet variant does {100 * self.gap:.1f}% {more} FLOPs).")


def flops_group(card: Mapping) -> str | None:
    """"C4" / "C8" / "C16" for a steerable Rot-MNIST model or a RepeatNet variant sized to one
    (``match='c8'``; the plain CNN, ``mode='none'``, is sized to none), from its card; else None."""
    config = card.get("config") or {}
    if card.get("model") == "steerable_rotmnist" and config.get("N") is not None:
        return f"C{int(config['N'])}"
    if card.get("model") == "repeatnet_rotmnist_cnn" and config.get("mode", "none") != "none" and config.get("match"):
        return str(config["match"]).upper()
    return None


def flops_matches(cards: Mapping[str, Mapping], flops: Mapping[str, int]) -> list[FlopsMatch]:
    """Each RepeatNet variant among ``cards`` ({label: card}) against each steerable model of the group it was
    sized to, with their FLOPs from ``flops`` ({label: FLOPs per image, the accounting's count})."""
    steerable = {label: flops_group(c) for label, c in cards.items() if c.get("model") == "steerable_rotmnist"}
    out = []
    for label, card in cards.items():
        group = flops_group(card)
        if group is None or card.get("model") != "repeatnet_rotmnist_cnn":
            continue
        for s, g in steerable.items():
            if g == group:
                out.append(FlopsMatch(label, s, group, int(flops[label]), int(flops[s])))
    return out
