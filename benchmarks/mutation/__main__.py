"""Mutation testing: does the test suite notice a small bug planted in a module where a silent
bug would make wsviz lie?

For each module, mutmut 3 plants one small change at a time (an operator flipped, a constant
off by one, an argument dropped) and runs only the tests that reach the changed function. A
mutant is *killed* when a test fails, *survived* when every test still passes. The score is
killed / (killed + survived + timeout + no tests) per module.

One module at a time, each in its own copy of the repository (so the per-module settings live in
that copy's ``pyproject.toml`` and the working tree gets no ``mutants/`` folder), with only the
module's own test files and one worker by default (these machines have two shared cores).

    python -m benchmarks.mutation                   # every module ready to run (see MODULES)
    python -m benchmarks.mutation stats uploads     # some of them
    python -m benchmarks.mutation --list
    python -m benchmarks.mutation accounting --max-children 2

Writes ``benchmarks/mutation/results.json`` (merged with earlier runs, one entry per module),
``benchmarks/mutation/RESULTS.md`` (the table) and ``benchmarks/mutation/survivors/<module>.diff``
(every surviving mutant as a diff). Why each survivor is left alive is written up by hand in
``benchmarks/mutation/SURVIVORS.md``. Not part of ``.ci/run``: it takes tens of minutes per module.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent
ROOT = OUT.parents[1]


@dataclass(frozen=True)
class Target:
    source: str  # the file mutated
    tests: tuple[str, ...]  # the test files (or node ids) run against its mutants
    functions: tuple[str, ...] = ()  # score only mutants of these functions ("" = the whole file)
    note: str = ""
    ready: bool = True  # False: not run by default (the module is being rewritten elsewhere)
    copy: tuple[str, ...] = field(default=())  # extra paths the tests need beside wsviz/ and tests/


MODULES: dict[str, Target] = {
    "stats": Target("wsviz/analysis/stats.py", ("tests/test_stats.py", "tests/test_stats_claims.py") + tuple(
        f"tests/test_zoo_report.py::{t}" for t in (
            "test_compare_over_seeds_is_welch_and_its_tost_matches_statsmodels",
            "test_equivalence_over_seeds_needs_a_tight_spread_not_just_no_difference",
            "test_newcombe_paired_interval_matches_the_formula_and_never_collapses",
            "test_wilson_interval_does_not_collapse_at_the_extremes"))),
    "similarity": Target("wsviz/analysis/similarity.py", ("tests/test_attribution_embeddings_similarity.py",)),
    "uploads": Target("wsviz/data/uploads.py", ("tests/test_uploads.py",), copy=("README.md",)),  # the corpus-size test reads it
    "sharing": Target("wsviz/models/sharing.py", ("tests/test_sharing.py", "tests/test_sharing_layers.py",
                                                 "tests/test_msws_training.py")),
    "checkpoint": Target(
        "wsviz/training/checkpoint.py",
        tuple(f"tests/test_security.py::{t}" for t in (
            "test_a_pickle_saved_as_the_weights_is_refused_and_never_run",
            "test_pickle_files_next_to_a_checkpoint_are_ignored", "test_truncated_or_damaged_weights_are_refused",
            "test_a_safetensors_file_whose_header_length_looks_like_a_pickle_is_accepted",
            "test_weights_that_do_not_fit_their_card_are_refused",
            "test_a_card_describing_a_huge_model_is_refused_without_building_it",
            "test_every_model_but_e2cnn_builds_on_the_meta_device", "test_bad_cards_are_refused_with_the_reason",
            "test_a_missing_card_or_weights_file_is_refused")) + ("tests/test_checkpoint_loader.py",),
        functions=("load_checkpoint", "load_weights", "_file_shapes", "_load_into", "_checked_config",
                   "_NoRandomFill", "build_on_meta", "_meta_model", "_check_fit", "_identity"),
        note="the loader: load_checkpoint, load_weights and what they call (saving is tested by the training "
             "tests); the loader tests of test_security.py, not its app tests",
        copy=("checkpoints",)),
    "accounting": Target("wsviz/models/accounting.py", (
        "tests/test_sharing.py", "tests/test_accounting.py",
        "tests/test_truthful_views.py::test_reuse_report_accounts_for_effective_params",
        "tests/test_truthful_views.py::test_repeatnet_tiling_is_counted_against_the_realised_block",
        "tests/test_truthful_views.py::test_e2cnn_basis_expansion_is_counted_against_the_expanded_filters",
        "tests/test_param_counts.py::test_wsms_macs_resnet110"), copy=("checkpoints",)),
    "sweeps": Target("wsviz/analysis/sweeps.py", ("tests/test_sweeps.py",)),
    "kernels": Target("wsviz/analysis/kernels.py", ("tests/test_kernels.py",) + tuple(
        f"tests/test_analysis.py::{t}" for t in (
            "test_top_k_kernels_are_the_k_largest", "test_kernel_layers_are_places_with_their_reuse",
            "test_kernel_layers_of_steerable_model_are_expanded_filters", "test_unknown_layer_is_a_clear_error",
            "test_kernel_set_similarity_meaning", "test_blending_weights_and_extremes"))),
    # test_training.py and test_reliability.py start training processes (minutes per mutant); test_runstore.py
    # exercises the store itself in a temporary folder, without training
    "runstore": Target("wsviz/training/runstore.py", ("tests/test_runstore.py",)),
}

COUNTED = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault")
LINE = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+?)\s*$")


def _copy_repo(dest: Path, target: Target) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutants")
    for part in ("wsviz", "tests", *target.copy):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / part)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _configure(dest: Path, target: Target) -> None:
    """The module's [tool.mutmut] section: the project's base settings plus this module's files."""
    text = (dest / "pyproject.toml").read_text()
    base = tomllib.loads(text).get("tool", {}).get("mutmut", {})
    cfg = dict(base)
    cfg["only_mutate"] = [target.source]
    cfg["pytest_add_cli_args_test_selection"] = list(target.tests)
    cfg["also_copy"] = list(target.copy)
    section = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items())
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:[^\[].*\n|\n)*", "\n", text)
    (dest / "pyproject.toml").write_text(text.rstrip() + "\n\n[tool.mutmut]\n" + section + "\n")


def _in_scope(name: str, target: Target) -> bool:
    if not target.functions:
        return True
    # mutant names: wsviz.training.checkpoint.x_load_checkpoint__mutmut_3, ...xǁClassǁmethod__mutmut_1
    local = name.rsplit(".", 1)[-1]
    local = re.sub(r"__mutmut_\d+$", "", local)
    local = local[2:] if local.startswith("x_") else local.lstrip("xǁ")
    return any(local == f or local.startswith(f + "ǁ") for f in target.functions)


ENV = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CI="")


def run_module(key: str, target: Target, max_children: int, work: Path) -> dict:
    dest = work / key
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    _copy_repo(dest, target)
    _configure(dest, target)
    t0 = time.time()
    log = (dest / "mutmut.log").open("w")
    proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                          cwd=dest, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if proc.returncode != 0:
        print(f"   mutmut exited with {proc.returncode}; see {dest / 'mutmut.log'}", flush=True)
    return collect(key, target, dest, (time.time() - t0) / 60, max_children)


def collect(key: str, target: Target, dest: Path, minutes: float | None, max_children: int) -> dict:
    """Score one module from the mutmut results in its copy ``dest`` (also after an interrupted run)."""
    env = ENV
    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest, env=env,
                         capture_output=True, text=True)
    statuses: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = LINE.match(line)
        if m and "__mutmut_" in m["name"]:
            statuses[m["name"]] = m["status"]
    scoped = {n: s for n, s in statuses.items() if _in_scope(n, target)}
    counts = {s: sum(1 for v in scoped.values() if v == s) for s in sorted(set(scoped.values()))}
    considered = sum(counts.get(s, 0) for s in COUNTED)
    killed = counts.get("killed", 0)
    survivors = sorted(n for n, s in scoped.items() if s != "killed")
    diffs = []
    for name in survivors:
        show = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=dest, env=env,
                              capture_output=True, text=True)
        diffs.append(show.stdout.strip())
    (OUT / "survivors").mkdir(parents=True, exist_ok=True)
    (OUT / "survivors" / f"{key}.diff").write_text("\n\n".join(diffs) + "\n" if diffs else "")
    if not statuses:
        raise SystemExit(f"no mutmut results for {key}; see {dest / 'mutmut.log'}")
    return {
        "module": target.source, "tests": list(target.tests), "scope": target.note or "whole file",
        "mutants": considered, "killed": killed, "score": round(killed / considered, 4) if considered else None,
        "counts": counts, "survivors": survivors, "max_children": max_children,
        "minutes": round(minutes, 1) if minutes is not None else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_report(new: dict) -> None:
    """Merge ``new`` (module -> result) into results.json (re-read now: other runs may have written it)."""
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").exists() else {}
    results.update(new)
    (OUT / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    lines = ["# Mutation testing results", "",
             "Written by `python -m benchmarks.mutation` (mutmut 3, one worker). Score = killed / mutants;",
             "every survivor is listed with the reason it is left alive in SURVIVORS.md.", "",
             "| module | tests | mutants | killed | score | other | minutes |", "|---|---|---:|---:|---:|---|---:|"]
    for key in MODULES:
        r = results.get(key)
        if not r:
            lines.append(f"| `{MODULES[key].source}` | not run yet | | | | | |")
            continue
        other = ", ".join(f"{v} {k}" for k, v in r["counts"].items() if k != "killed") or "-"
        score = f"{100 * r['killed'] / r['mutants']:.1f}%" if r["mutants"] else "-"  # not the rounded r["score"]
        scope = f" ({r['scope']})" if r["scope"] != "whole file" else ""
        lines.append(f"| `{r['module']}`{scope} | {', '.join(Path(t).name for t in r['tests'])} | {r['mutants']} "
                     f"| {r['killed']} | {score} | {other} | {r['minutes']} |")
    (OUT / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"any of {', '.join(MODULES)} (default: the ready ones)")
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutant workers (default 1)")
    ap.add_argument("--work", type=Path, default=None, help="where the per-module copies go (default: a temp dir)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="do not run: score the results already in --work (e.g. after an interrupted run)")
    args = ap.parse_args(argv)
    if args.list:
        for k, t in MODULES.items():
            print(f"{k:12} {t.source:34} {'ready' if t.ready else 'not run by default'}  {' '.join(t.tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    keys = args.modules or [k for k, t in MODULES.items() if t.ready]
    if args.collect and not args.work:
        ap.error("--collect needs --work, the folder of an earlier run")
    work = args.work or Path(tempfile.mkdtemp(prefix="wsviz-mutation-"))
    for key in keys:
        if args.collect:
            r = collect(key, MODULES[key], work / key, None, args.max_children)
        else:
            print(f"== {key}: mutating {MODULES[key].source} against {' '.join(MODULES[key].tests)}", flush=True)
            r = run_module(key, MODULES[key], args.max_children, work)
        print(f"   {key}: {r['killed']}/{r['mutants']} killed ({r['counts']}) in {r['minutes']} min", flush=True)
        write_report({key: r})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
