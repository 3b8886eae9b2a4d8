"""Where sharing costs least (issue 19, scoring): candidate groups and their four scores."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from wsviz.analysis.opportunities import candidate_groups, score_groups
from wsviz.data.datasets import load_split
from wsviz.errors import WsvizError
from wsviz.models import create_model
from wsviz.training.checkpoint import load_checkpoint

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
SHARESNET_RULE = [(f"stages.{s}.1.conv2", f"stages.{s}.2.conv2") for s in range(3)]


@pytest.fixture(scope="module")
def twin():
    if not (CKPT / "scale-sharesnet-unshared" / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    return load_checkpoint(CKPT / "scale-sharesnet-unshared")[0]


def test_candidates_are_same_shape_runs_within_a_stage(twin):
    groups = candidate_groups(twin)
    assert set(SHARESNET_RULE) <= set(groups)  # ShaResNet's rule is among the candidates
    for g in groups:
        shapes = {tuple(twin.get_submodule(n).weight.shape) for n in g}
        stages = {n.rsplit(".", 2)[0] for n in g}
        assert len(g) >= 2 and len(shapes) == 1 and len(stages) == 1, g
    shared = create_model("sharesnet_wrn_digits", shared=True)  # already shared layers are not offered again
    assert not set(SHARESNET_RULE) & set(candidate_groups(shared))


def test_a_model_without_convolutions_is_refused():
    with pytest.raises(WsvizError, match="no \\(unshared\\) convolutions"):
        candidate_groups(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_scores_mean_what_they_say(twin):
    cal = load_split("mnist5k-scale", "train").spread(200)
    held = load_split("mnist5k-scale", "test").spread(300)
    model = copy.deepcopy(twin)
    with torch.no_grad():  # make one group's members identical: sharing them must cost (almost) nothing
        model.get_submodule("stages.1.2.conv2").weight.copy_(model.get_submodule("stages.1.1.conv2").weight)
    rows = score_groups(model, cal.images, cal.labels, groups=SHARESNET_RULE, held_out=(held.images, held.labels))
    by = {r.group: r for r in rows}
    same = by[SHARESNET_RULE[1]]
    assert same.weight_similarity == pytest.approx(1.0) and same.gradient_conflict >= -1e-9
    assert abs(same.measured_drop) < 2.0
    for r in rows:
        assert -1 <= r.weight_similarity <= 1 and 0 <= r.output_cka <= 1 and 0 <= r.gradient_conflict <= 2
        assert r.params_saved == model.get_submodule(r.group[0]).weight.numel()
    assert [r.measured_drop for r in rows] == sorted(r.measured_drop for r in rows)  # cheapest first
    untouched = score_groups(twin, cal.images, cal.labels, groups=SHARESNET_RULE)
    assert untouched[0].measured_drop is None and by[SHARESNET_RULE[1]].weight_similarity > \
        next(r for r in untouched if r.group == SHARESNET_RULE[1]).weight_similarity


def test_cli_ranks_the_groups(tmp_path, capsys):
    import csv

    from wsviz.cli import main

    if not (CKPT / "scale-sharesnet-unshared" / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    args = ["opportunities", "--checkpoint", str(CKPT / "scale-sharesnet-unshared"), "--out", str(tmp_path),
            "--calibration", "128", "--limit", "200"]
    for g in SHARESNET_RULE:
        args += ["--group", ",".join(g)]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "opportunities.csv")))
    assert {r["group"] for r in rows} == {" + ".join(g) for g in SHARESNET_RULE}
    drops = [float(r["measured_drop_pts"]) for r in rows]
    assert drops == sorted(drops) and "pts" in capsys.readouterr().out
    assert main(["opportunities", "--checkpoint", str(CKPT / "scale-sharesnet-unshared"), "--out", str(tmp_path),
                 "--group", "stages.0.1.conv2,stages.1.1.conv2"]) == 2
