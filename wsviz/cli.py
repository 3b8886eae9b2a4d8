"""``python -m wsviz ...``: the headless entry point (same tables the app shows)."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

from wsviz.errors import WsvizError


def _models(args: argparse.Namespace) -> int:
    from wsviz.analysis.zoo import zoo_table
    from wsviz.models import get_spec, list_models

    specs = [get_spec(n) for n in args.name] if args.name else list_models(args.family)
    rows = zoo_table(specs, accounting=args.summary)
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
        return 0
    for row in rows:
        extra = ""
        if args.summary:
            extra = (f"  unique {row['unique_params']:>12,}  effective {row['effective_params']:>12,}"
                     f"  x{row['compression']:<6}  {row['gflops']:>9} GFLOPs")
        print(f"{row['name']:24s} {row['family']:12s} {row['input']:10s}{extra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wsviz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list registered models (with --summary: params and FLOPs)")
    p.add_argument("--family", help="only this family")
    p.add_argument("--name", nargs="*", help="only these model names")
    p.add_argument("--summary", action="store_true", help="build each model and count params/FLOPs")
    p.add_argument("--csv", action="store_true", help="write CSV to stdout")
    p.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WsvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
