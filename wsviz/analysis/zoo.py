"""The model zoo as a table: registry metadata plus parameter and FLOP accounting."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from wsviz.models import ModelSpec, create_model, get_spec, list_models, summarize


def spec_row(spec: ModelSpec) -> dict[str, Any]:
    """Registry metadata of one model as a flat row."""
    return {
        "name": spec.name, "family": spec.family,
        "input": f"{spec.in_channels}x{spec.input_size}x{spec.input_size}",
        "classes": spec.num_classes, "paper": spec.paper, "description": spec.description,
        "defaults": ", ".join(f"{k}={v}" for k, v in spec.defaults.items()),
    }


def accounting_row(name: str, maps: dict[str, dict] | None = None, **overrides: Any) -> dict[str, Any]:
    """Unique (every stored element), float (the papers' parameters: sign masks apart, as bits) and
    effective parameters, compression (effective / float), storage, FLOPs and how it reuses weights (how many stored
    weights are applied more than once, and by which mechanism: direct / tiled / expanded)."""
    s = summarize(create_model(name, **overrides))
    if maps is not None:  # the sharing map too, from the same trace (the app draws it from the catalog)
        from wsviz.sharingmap import SharingMap

        maps[name] = SharingMap.from_summary(s).to_dict()
    reused = [r for r in s.reuse().values() if r.reused]
    return {"unique_params": s.unique_params, "effective_params": s.effective_params,
            "float_params": s.float_params, "mask_bits": s.mask_bits, "storage_kb": round(s.storage_bytes / 1024, 1),
            # unrounded: the page rounds once, to the digits it shows (rounding here too made
            # msws_resnet101 1.31x in the table and 1.32x in its sharing map)
            "compression": s.compression, "gflops": s.flops / 1e9,
            "reused_weights": len(reused),
            "reuse": ", ".join(sorted({k for r in reused for k in r.kinds if k != "modulates"})) or "none"}


def zoo_table(specs: Iterable[ModelSpec] | None = None, accounting: bool = True,
              progress: Callable[[int, int, str], None] | None = None,
              maps: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """One row per registered model (default configuration), optionally with accounting.

    ``progress(i, n, name)`` is called before each model is built (the app shows a bar). With
    ``maps`` (a dict), each model's sharing map is stored there by name.
    """
    specs = list(specs) if specs is not None else [get_spec(n) for n in list_models()]
    rows = []
    for i, spec in enumerate(specs):
        if progress:
            progress(i, len(specs), spec.name)
        row = spec_row(spec)
        if accounting:
            row.update(accounting_row(spec.name, maps))
        rows.append(row)
    return rows
