"""What a model reuses, as plain data that needs no torch: the records the accounting
(:mod:`wsviz.models.accounting`) produces, and a sharing map that can be stored as JSON —
the app draws a registered architecture's map from the precomputed file at once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParamUse:
    """One use of a unique parameter in one forward pass."""

    param: str  # the parameter's name in ``model.named_parameters()``
    site: str  # module path where the layer op ran ('' = the model itself)
    op: str  # conv2d, linear, batch_norm, ...
    applied_shape: tuple[int, ...]  # shape of the weight as applied at this site
    derived: bool  # False: the parameter itself; True: a tensor computed from it
    detail: str = ""  # e.g. "stride=1 dilation=2" for a convolution
    kind: str = "direct"  # one of REUSE_KINDS
    applied: int = 0  # applied weights this use accounts for (0 for a modulator)


REUSE_KINDS = ("direct", "tiled", "expanded", "derived", "modulates")


@dataclass(frozen=True)
class ParamReuse:
    """How one unique parameter is reused in one forward pass."""

    param: str
    shape: tuple[int, ...]  # as stored
    uses: tuple[ParamUse, ...]
    applied: int  # weights applied through it, summed over its uses

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def factor(self) -> float:
        """Applied / stored: how many times each stored element is applied (0 for a modulator)."""
        return self.applied / max(self.numel, 1)

    @property
    def sites(self) -> list[str]:
        """Where it is applied, in forward order, each once."""
        return list(dict.fromkeys(u.site for u in self.uses))

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(u.kind for u in self.uses))

    @property
    def reused(self) -> bool:
        """Applied more than once: at several places, or tiled / expanded into a larger weight."""
        return self.applied > self.numel or sum(u.applied > 0 for u in self.uses) > 1

    def places(self, limit: int | None = None) -> str:
        """The places it is applied, comma-separated in forward order; with ``limit`` (characters),
        shortened at a whole name and ending in '(+k more)'."""
        sites = [x or "(model)" for x in self.sites]
        text = ", ".join(sites)
        if limit is None or len(text) <= limit:
            return text
        kept: list[str] = []
        for x in sites:
            if len(", ".join(kept + [x])) > limit:
                break
            kept.append(x)
        return ", ".join(kept) + f", … (+{len(sites) - len(kept)} more)"

    def describe(self) -> str:
        """One line a reader can check against the picture, e.g. 'applied 2 times at 1 place (dilation=1; dilation=2)'."""
        direct = [u for u in self.uses if u.kind == "direct"]
        others = [u for u in self.uses if u.kind in ("tiled", "expanded", "derived")]
        parts = []
        if len(direct) > 1:
            how = sorted({u.detail for u in direct if u.detail})
            places = len({u.site for u in direct})  # msws applies one kernel at several rates in one place
            where = (f"at {places} places" if places == len(direct) else
                     f"{len(direct)} times at {places} place{'s' if places > 1 else ''}")
            parts.append(f"the same weight applied {where}" + (f" ({'; '.join(how)})" if len(how) > 1 else ""))
        elif direct and others:  # one direct use beside tiles or expansions: said, so the counts add up
            parts.append("applied directly at 1 place")
        for kind, verb in (("tiled", "tiled"), ("expanded", "basis-expanded"), ("derived", "transformed")):
            ks = [u for u in self.uses if u.kind == kind]
            if ks:
                f = sum(u.applied for u in ks) / max(self.numel, 1)
                shapes = list(dict.fromkeys("x".join(map(str, u.applied_shape)) for u in ks))
                parts.append(f"{verb} into {len(ks)} applied weight{'s' if len(ks) > 1 else ''} "
                             f"({', '.join(shapes)}), each stored element applied {f:.3g}x by "
                             f"{'them' if len(ks) > 1 else 'it'}")
        if not parts and any(u.kind == "modulates" for u in self.uses):
            parts.append("shapes a weight carried by another parameter (a transform, not a reuse)")
        return "; ".join(parts) or "applied once"


@dataclass
class SharingMap:
    """Everything the sharing map view shows: the counts, and every reused parameter with its uses."""

    unique_params: int
    effective_params: int
    flops: int
    mask_params: int
    reused: list[ParamReuse]
    others: int  # sum of (applied - stored) over the parameters that are not reused (modulators: negative)
    sites: list[str] = field(default_factory=list)  # every place a parameter is applied, in forward order

    @property
    def float_params(self) -> int:
        """Stored real-valued parameters (f-RepeatNet's sign masks are bits, counted apart)."""
        return self.unique_params - self.mask_params

    @property
    def compression(self) -> float:
        """effective / float parameters, as the papers count (see ModelSummary.compression)."""
        return self.effective_params / max(self.float_params, 1)

    def reuse(self) -> dict[str, ParamReuse]:
        return {r.param: r for r in self.reused}

    @classmethod
    def from_summary(cls, s: Any) -> SharingMap:
        """From a :class:`wsviz.models.accounting.ModelSummary`."""
        reuse = s.reuse()
        return cls(s.unique_params, s.effective_params, s.flops, s.mask_params,
                   [r for r in reuse.values() if r.reused],
                   sum(r.applied - r.numel for r in reuse.values() if not r.reused),
                   list(dict.fromkeys(u.site or "(model)" for u in s.uses)))

    def to_dict(self) -> dict:
        d = asdict(self)
        for r in d["reused"]:
            r["shape"] = list(r["shape"])
            for u in r["uses"]:
                u["applied_shape"] = list(u["applied_shape"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SharingMap:
        reused = [ParamReuse(r["param"], tuple(r["shape"]),
                             tuple(ParamUse(**{**u, "applied_shape": tuple(u["applied_shape"])}) for u in r["uses"]),
                             r["applied"]) for r in d["reused"]]
        return cls(d["unique_params"], d["effective_params"], d["flops"], d["mask_params"], reused, d["others"],
                   list(d.get("sites", [])))
