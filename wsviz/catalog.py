"""The model zoo as a table, precomputed: registry metadata plus exact accounting per model.

Counting parameters and FLOPs builds every registered model (about 40 s on 2 CPU cores, the
ImageNet ResNets dominate) and needs torch, which alone takes seconds to import. The app's
first page shows this table at once from ``catalog.json``, written by

    python -m wsviz.catalog            # regenerate after changing the registry

and ``tests/test_catalog.py`` rebuilds it from the live registry and compares, so the shipped
file cannot drift from the code. Loading it imports neither torch nor the model package.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("catalog.json")
MAPS = Path(__file__).with_name("sharing_maps.json")  # each registered architecture's sharing map
COLUMNS = ["name", "family", "input", "classes", "unique_params", "effective_params", "float_params", "mask_bits",
           "storage_kb", "compression", "gflops", "reused_weights", "reuse", "defaults", "paper", "description"]


@lru_cache(maxsize=1)
def _load(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(Path(path).read_text())["models"])


def load_catalog(path: str | Path = PATH) -> list[dict[str, Any]]:
    """One row per registered model (default configuration), from the shipped file."""
    return [dict(r) for r in _load(str(path))]


def families(path: str | Path = PATH) -> list[str]:
    return sorted({r["family"] for r in _load(str(path))})


def build_catalog(progress=None, maps: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """The same rows computed from the live registry (builds every model); with ``maps``, each
    model's sharing map is stored there too, from the same trace."""
    from wsviz.analysis.zoo import zoo_table

    return [{k: r[k] for k in COLUMNS} for r in zoo_table(progress=progress, maps=maps)]


@lru_cache(maxsize=1)
def _load_maps(path: str) -> dict[str, dict]:
    return json.loads(Path(path).read_text())["maps"]


def load_sharing_map(name: str, path: str | Path = MAPS):
    """The precomputed sharing map (:class:`wsviz.sharingmap.SharingMap`) of a registered architecture at
    its default configuration, or None if it is not in the file. Needs no torch."""
    from wsviz.sharingmap import SharingMap

    d = _load_maps(str(path)).get(name)
    return None if d is None else SharingMap.from_dict(d)


def write_catalog(path: str | Path = PATH, maps_path: str | Path = MAPS) -> Path:
    maps: dict[str, dict] = {}
    rows = build_catalog(progress=lambda i, n, name: print(f"[{i + 1}/{n}] {name}", flush=True), maps=maps)
    Path(path).write_text(json.dumps({"generated_by": "python -m wsviz.catalog", "models": rows}, indent=1) + "\n")
    Path(maps_path).write_text(json.dumps({"generated_by": "python -m wsviz.catalog", "maps": maps},
                                          separators=(",", ":")) + "\n")
    _load.cache_clear()
    _load_maps.cache_clear()
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    from wsviz.cli_errors import CliParser

    ap = CliParser(prog="python -m wsviz.catalog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(PATH))
    args = ap.parse_args(argv)
    print(f"wrote {write_catalog(args.out)}")
    return 0


if __name__ == "__main__":
    from wsviz.cli_errors import run_cli

    raise SystemExit(run_cli(main))
