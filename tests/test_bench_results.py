"""The committed benchmark results say what their JSON says, rendered by today's code.

Each tying benchmark writes ``benchmarks/results/STEM.json`` and ``STEM.md``, the md rendered from
the JSON. When a renderer changes its wording (e.g. a target "met" only when an interval shows it),
the md written by an earlier run goes stale while ``checkpoints/REPORT.md``, rendered from the same
JSON, follows: these tests re-render every such md from its JSON, so the two cannot disagree again.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_tie, bench_tie_init, bench_tie_recipe, bench_tie_twins  # noqa: E402
from wsviz.zoo import tying_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _is_bench_tie(res: dict) -> bool:
    """What only bench_tie.write records (bench_tie_init/_recipe/_twins write none of these keys)."""
    return {"only_tie", "candidate_groups", "gap_ci", "ft_steps"} <= set(res)


def _rendered(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"  # as bench_tie.write and bench_tie.write_results write the md


BENCH_TIE = sorted(p for p in RESULTS.glob("*.json") if _is_bench_tie(_load(p)))
HEADING = tying_section(_load(RESULTS / "tie.json"))[0].split(":")[0].split(" (")[0]  # "## Tying a trained model..."


def test_the_bench_tie_results_are_found():
    # the two published runs (checkpoints/tying*.json are byte-for-byte copies of them)
    assert {p.name for p in BENCH_TIE} >= {"tie.json", "tie-fashion-sharesnet-unshared.json"}
    # and every md that reads like tying_section's output has its bench_tie JSON among them
    looks_rendered = {p.stem for p in RESULTS.glob("*.md") if p.read_text().startswith(HEADING)}
    assert looks_rendered == {p.stem for p in BENCH_TIE}


@pytest.mark.parametrize("path", BENCH_TIE, ids=lambda p: p.stem)
def test_bench_tie_md_is_tying_section_of_its_json(path):
    assert path.with_suffix(".md").read_text() == _rendered(tying_section(_load(path)))


@pytest.mark.parametrize("path", BENCH_TIE, ids=lambda p: p.stem)
def test_published_copies_are_the_results(path):
    """REPORT.md renders checkpoints/tying*.json; they are the results --publish wrote beside the md."""
    name = "tying.json" if path.stem == "tie" else f"tying-{path.stem.removeprefix('tie-')}.json"
    assert (ROOT / "checkpoints" / name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize(("prefix", "report"), [("tie-twins-", bench_tie_twins.report),
                                                ("tie-init-", bench_tie_init.report),
                                                ("tie-recipe-", bench_tie_recipe.report)])
def test_other_tying_benchmarks_md_is_their_report(prefix, report):
    paths = sorted(RESULTS.glob(f"{prefix}*.json"))
    assert paths
    for path in paths:
        assert path.with_suffix(".md").read_text() == _rendered(report(_load(path))), path.name


def test_tie_init_results_say_which_recipe_fine_tuned_them():
    """The committed tie-init results (df04c7b, d7157d1) were fine-tuned before commit 8f162bf changed
    wsviz's recipe; they record no recipe, and their report must not pass them off as today's."""
    paths = sorted(RESULTS.glob("tie-init-*.json"))
    assert len(paths) == 3
    for path in paths:
        res = _load(path)
        assert "recipe" not in res
        text = _rendered(bench_tie_init.report(res))
        assert "before commit 8f162bf" in text and "predictions alone" in text and "no feature distillation" in text
        assert "(wsviz's recipe)" not in text
    # a run that records its recipe is reported with it, not with the old one's caveat
    res = _load(paths[0]) | {"recipe": bench_tie_init.recipe_record(4000, 37, 0.01)}
    assert res["recipe"] == {"distill": 4.0, "distill_weight": 0.5, "feature_distill": 3.0, "average_last": 15}
    text = _rendered(bench_tie_init.report(res))
    assert "8f162bf" not in text
    assert "wsviz's recipe: distillation T = 4 at weight 0.5 (the rest from the labels), feature distillation 3" in text


def test_bench_tie_threads_default_and_documented_command_match_the_published_runs():
    """The published runs recorded how many torch threads they used; the default and the commands
    bench_tie documents for publishing must reproduce that, not another setting."""
    recorded = _load(RESULTS / "tie.json")["threads"]  # REPORT.md: "2 torch threads"
    assert _load(RESULTS / "tie-fashion-sharesnet-unshared.json")["threads"] == recorded
    assert bench_tie.parser().parse_args([]).threads == recorded
    doc = bench_tie.__doc__.replace("\\\n", " ")  # a command continued on the next line is one command
    commands = [line.strip() for line in doc.splitlines() if "benchmarks.bench_tie " in line and "--publish" in line]
    assert len(commands) == 2  # the shipped twin's and the Fashion twin's
    for line in commands:
        words = shlex.split(line.split("#")[0].replace("[", "").replace("]", ""))
        assert not any(w.startswith("OMP_NUM_THREADS") for w in words), line
        args = bench_tie.parser().parse_args(words[words.index("benchmarks.bench_tie") + 1:])
        assert args.threads == recorded, line
