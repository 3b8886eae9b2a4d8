"""Where sharing costs least (issue 19, scoring): candidate groups and their four scores."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsviz.analysis.opportunities import candidate_groups, score_groups, sharesnet_rule
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


def test_sharesnet_rule_ties_the_twin_into_the_shipped_shared_model(twin):
    from wsviz.models import summarize
    from wsviz.models.tie import tie

    assert sharesnet_rule(twin) == SHARESNET_RULE
    assert summarize(tie(twin, sharesnet_rule(twin), "mean")).unique_params == 223_610  # the shipped shared model


@pytest.mark.parametrize("name, authors", [("resnet34", 13_613_864), ("resnet50", 20_469_800),
                                           ("resnet101", 29_434_920), ("resnet152", 36_821_032)])
def test_sharesnet_imagenet_rule_gives_the_authors_counts(name, authors):
    """reference.md section 5: the authors' ImageNet table, all parameters; basic blocks share conv2 in
    every block, bottlenecks their 3x3 unless strided."""
    import torchvision

    from wsviz.models.tie import tie

    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    groups = sharesnet_rule(model, imagenet=True)
    assert len(groups) == 4 and all(g[0].endswith("conv2") for g in groups)
    tied = tie(model, groups, "mean")
    assert sum(p.numel() for p in tied.parameters()) == authors
    cifar = sharesnet_rule(model)  # the CIFAR rule leaves every stage's first block out
    assert all(not any(n.split(".")[1] == "0" for n in g) for g in cifar)
    assert [len(g) for g in cifar] == [len(g) - (g[0].split(".")[1] == "0") for g in groups]


def test_sharesnet_rule_refuses_a_model_with_nothing_to_share():
    with pytest.raises(WsvizError, match="ShaResNet's rule finds nothing"):
        sharesnet_rule(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)))


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
    assert [r.predicted_cost for r in rows] == sorted(r.predicted_cost for r in rows)  # cheapest first
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
    costs = [float(r["predicted_cost"]) for r in rows]
    assert costs == sorted(costs) and "pts" in capsys.readouterr().out
    stages = json.loads((tmp_path / "stage_similarity.json").read_text())
    assert any(s["layers"] == [f"stages.2.{b}.conv2" for b in range(3)] for s in stages)
    # a budget just above stage 2's saving: stage 2 plus either other group (stage 0's alone falls short)
    assert main(args + ["--budget", "36865", "--verify", "2"]) == 0
    choices = list(csv.DictReader(open(tmp_path / "choices.csv")))
    assert {frozenset(c["groups"].split(" | ")) for c in choices} == {
        frozenset(" + ".join(g) for g in pair) for pair in (SHARESNET_RULE[1:], SHARESNET_RULE[::2])}
    assert "to save 36,865 parameters: tie" in capsys.readouterr().out
    assert main(args + ["--budget", "0"]) == 2
    assert main(["opportunities", "--checkpoint", str(CKPT / "scale-sharesnet-unshared"), "--out", str(tmp_path),
                 "--group", "stages.0.1.conv2,stages.1.1.conv2"]) == 2


def test_default_candidates_overlap_and_are_all_scored(twin):
    """Candidate runs overlap (a run of three holds two runs of two); scoring them all must work."""
    cal = load_split("mnist5k-scale", "train").spread(64)
    groups = [g for g in candidate_groups(twin) if g[0].startswith("stages.1.")]
    assert any(set(a) & set(b) for a in groups for b in groups if a != b)
    rows = score_groups(twin, cal.images, cal.labels, groups=groups)
    assert {r.group for r in rows} == set(groups)


def _opp(name, drop, cka, wsim, conflict):
    from wsviz.analysis.opportunities import Opportunity

    return Opportunity((name, name + "b"), 1, wsim, cka, conflict, drop)


def test_predicted_cost_ranks_each_score_in_its_own_direction():
    from wsviz.analysis.opportunities import predicted_costs

    cheap, mid, dear = _opp("a", 0.1, 0.9, 0.8, 0.1), _opp("b", 1.0, 0.5, 0.4, 0.5), _opp("c", 5.0, 0.2, 0.1, 0.9)
    assert predicted_costs([dear, cheap, mid]) == [1.0, 0.0, 0.5]
    for name in ("measured_drop", "output_cka", "weight_similarity", "gradient_conflict"):  # each alone, same order
        assert predicted_costs([dear, cheap, mid], {name: 1.0}) == [1.0, 0.0, 0.5], name
    # weights matter: a group cheap by drop but dear by CKA moves with the weights
    x, y = _opp("x", 0.1, 0.1, 0.5, 0.5), _opp("y", 2.0, 0.9, 0.5, 0.5)
    assert predicted_costs([x, y], {"measured_drop": 1.0}) == [0.0, 1.0]
    assert predicted_costs([x, y], {"output_cka": 1.0}) == [1.0, 0.0]
    assert predicted_costs([x, y], {"measured_drop": 2.0, "output_cka": 1.0}) == pytest.approx([1 / 3, 2 / 3])
    # a score not measured is left out rather than counted as zero
    unmeasured = [_opp("p", None, 0.9, 0.5, 0.5), _opp("q", None, 0.1, 0.5, 0.5)]
    assert predicted_costs(unmeasured, {"measured_drop": 5.0, "output_cka": 1.0}) == [0.0, 1.0]


def test_stage_similarity_matrices(twin):
    from wsviz.analysis.opportunities import stage_similarity
    from wsviz.analysis.similarity import linear_cka

    x = load_split("mnist5k-scale", "train").spread(64).images
    sims = stage_similarity(twin, x)
    by = {(s.stage, s.role): s for s in sims}
    s = by[("stages.2", "conv2")]
    assert s.layers == ("stages.2.0.conv2", "stages.2.1.conv2", "stages.2.2.conv2")
    assert np.allclose(np.diag(s.output_cka), 1) and np.allclose(s.output_cka, s.output_cka.T)
    w1, w2 = (twin.get_submodule(n).weight.detach().flatten() for n in s.layers[1:])
    assert s.weight_similarity[1, 2] == pytest.approx(float(torch.nn.functional.cosine_similarity(w1, w2, dim=0)),
                                                      abs=1e-6)
    outs = {}
    hooks = [twin.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.flatten(1)))
             for n in s.layers[:2]]
    with torch.no_grad():
        twin.eval()(x)
    for h in hooks:
        h.remove()
    assert s.output_cka[0, 1] == pytest.approx(linear_cka(outs[s.layers[0]].numpy(), outs[s.layers[1]].numpy()))
    assert ("stages.1", "conv1") in by and len(by[("stages.1", "conv1")].layers) == 2  # block 0's conv1 differs
    # the page's heatmaps label the axes by block index, as categories: a two-block stage shows ticks
    # "1" and "2", not a numeric axis with ticks at 1.5 and 2.5
    from wsviz.figures import stage_similarity_figure

    fig = stage_similarity_figure(sims)
    two = next(i for i, t in enumerate(fig.data) if list(t.x) == ["1", "2"])
    axis = "xaxis" if two == 0 else f"xaxis{two + 1}"
    assert fig.layout[axis].type == "category" and fig.layout["y" + axis[1:]].type == "category"


def test_tied_layers_are_not_offered_again(twin):
    from wsviz.models.tie import tie

    tied = tie(twin, [list(SHARESNET_RULE[2])], init="mean")
    flat = {n for g in candidate_groups(tied) for n in g}
    assert not flat & set(SHARESNET_RULE[2])  # neither the use site nor the conv that lends its weight


def test_score_cka_is_linear_cka_of_the_outputs(twin):
    """score_groups computes CKA from Gram matrices in its one pass; it must equal the textbook linear CKA."""
    from wsviz.analysis.opportunities import stage_similarity

    cal = load_split("mnist5k-scale", "train").spread(64)
    sims = {s.layers: s for s in stage_similarity(twin, cal.images)}
    lane = sims[("stages.2.0.conv2", "stages.2.1.conv2", "stages.2.2.conv2")]
    rows = score_groups(twin, cal.images, cal.labels, groups=[lane.layers[:2], lane.layers[1:]])
    by = {r.group: r for r in rows}
    assert by[lane.layers[:2]].output_cka == pytest.approx(lane.output_cka[0, 1], rel=1e-6)
    assert by[lane.layers[1:]].output_cka == pytest.approx(lane.output_cka[1, 2], rel=1e-6)


def test_default_cost_uses_the_other_scores_when_no_drop_was_measured():
    from wsviz.analysis.opportunities import predicted_costs

    rows = [_opp("p", None, 0.9, 0.8, 0.1), _opp("q", None, 0.1, 0.2, 0.9)]
    assert predicted_costs(rows) == [0.0, 1.0]
    measured = [_opp("p", 3.0, 0.9, 0.8, 0.1), _opp("q", 0.5, 0.1, 0.2, 0.9)]
    assert predicted_costs(measured) == [1.0, 0.0]  # the measured drop decides (chosen on held-out data)


def test_one_pass_gives_the_same_matrices_and_the_textbook_gradient_conflict(twin):
    """find_opportunities takes the stage matrices and the gradients from its one pass (gradients of the
    members' weights only): they must equal stage_similarity's and those of a plain full backward pass."""
    from wsviz.analysis.opportunities import find_opportunities, stage_similarity

    cal = load_split("mnist5k-scale", "train").spread(64)
    found = find_opportunities(twin, cal.images, cal.labels, groups=SHARESNET_RULE)
    ref = {s.layers: s for s in stage_similarity(twin, cal.images)}
    assert {s.layers for s in found.stages} == set(ref)
    for s in found.stages:
        assert np.allclose(s.output_cka, ref[s.layers].output_cka) and np.allclose(s.weight_similarity,
                                                                                    ref[s.layers].weight_similarity)
    model = copy.deepcopy(twin).eval()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(cal.images), cal.labels).backward()
    for r in found.rows:
        a, b = (model.get_submodule(n).weight.grad.flatten() for n in r.group)
        assert r.gradient_conflict == pytest.approx(1 - float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                                                    abs=1e-5)
    assert all(p.grad is None for p in twin.parameters())  # the pass leaves no gradients behind


def test_measured_loss_is_the_rise_of_the_held_out_cross_entropy(twin):
    from wsviz.analysis.opportunities import find_opportunities
    from wsviz.models.tie import reestimate_batchnorm, tie

    cal = load_split("mnist5k-scale", "train").spread(128)
    held = load_split("mnist5k-scale", "test").spread(200)
    group = SHARESNET_RULE[0]
    found = find_opportunities(twin, cal.images, cal.labels, groups=[group], held_out=(held.images, held.labels))
    (row,) = found.rows

    def loss_acc(m):
        with torch.no_grad():
            out = m.eval()(held.images).double()
        return (float(torch.nn.functional.cross_entropy(out, held.labels)),
                float((out.argmax(1) == held.labels).double().mean()), out.softmax(1).numpy())

    base = loss_acc(reestimate_batchnorm(copy.deepcopy(twin), cal.images))
    tied = loss_acc(reestimate_batchnorm(tie(twin, [group], "lstsq", cal.images), cal.images))
    assert row.measured_loss == pytest.approx(tied[0] - base[0], rel=1e-4, abs=1e-6)
    assert row.measured_drop == pytest.approx(100 * (base[1] - tied[1]), abs=1e-6)
    p, q = base[2], tied[2]  # KL(untied || tied), image by image, then the mean
    assert row.measured_kl == pytest.approx(float(np.mean((p * (np.log(p) - np.log(q))).sum(1))), rel=1e-4)
    assert row.measured_loss > 0 and row.measured_kl > 0  # tying trained kernels costs something on this model
    # what the costs were measured against is returned (the page says it): the untied model re-estimated
    # on the calibration images, and as trained, on the same held-out images
    assert found.baseline.accuracy == pytest.approx(base[1], abs=1e-12)
    assert found.baseline.as_trained == pytest.approx(loss_acc(twin)[1], abs=1e-12)
    assert (found.baseline.n_calibration, found.baseline.n_held_out) == (128, 200)
    assert find_opportunities(twin, cal.images, cal.labels, groups=[group]).baseline is None  # nothing measured


def _rows(groups_and_savings, drops=None):
    from wsviz.analysis.opportunities import Opportunity

    drops = drops or [0.0] * len(groups_and_savings)
    return [Opportunity(tuple(g), s, 0.0, 0.0, 0.0, d, measured_loss=0.0)
            for (g, s), d in zip(groups_and_savings, drops)]


def test_disjoint_sets_are_every_minimal_disjoint_set_meeting_the_budget():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from wsviz.analysis.opportunities import _disjoint_sets

    layers = [f"l{i}" for i in range(6)]

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.lists(st.sampled_from(layers), min_size=2, max_size=3, unique=True),
                              st.integers(1, 9)), min_size=1, max_size=7), st.integers(1, 20))
    def check(spec, budget):
        rows = _rows(spec)
        got, complete = _disjoint_sets(rows, budget)
        assert complete and got == sorted(_minimal_sets_by_brute_force(rows, budget))

    check()


def _minimal_sets_by_brute_force(rows, budget):
    """Every minimal disjoint set of ``rows`` saving ``budget``, in lexicographic order, by trying every subset."""
    import itertools

    want = []
    for k in range(1, len(rows) + 1):
        for combo in itertools.combinations(range(len(rows)), k):
            sets = [set(rows[i].group) for i in combo]
            if any(a & b for a, b in itertools.combinations(sets, 2)):
                continue
            total = sum(rows[i].params_saved for i in combo)
            if total >= budget and all(total - rows[i].params_saved < budget for i in combo):
                want.append(combo)
    return sorted(want)


def test_the_cheapest_disjoint_sets_are_the_first_of_every_set_sorted_by_cost():
    """The budgeted choice asks for the few cheapest sets only (branch and bound, largest saving first):
    they are exactly the first of every minimal set sorted by (summed cost, saved), ties in lexicographic
    order, as when every set was listed and sorted; with negative costs (a measured drop can be), zero
    savings and ties too."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from wsviz.analysis.opportunities import _disjoint_sets

    layers = [f"l{i}" for i in range(7)]

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.lists(st.sampled_from(layers), min_size=2, max_size=3, unique=True),
                              st.integers(0, 9), st.sampled_from([-0.3, -0.1, 0.0, 0.1, 0.2, 0.5, 0.7, 1.0])),
                    min_size=1, max_size=8), st.integers(1, 25), st.integers(1, 5))
    def check(spec, budget, keep):
        rows = _rows([(g, s) for g, s, _ in spec])
        costs = [c for _, _, c in spec]
        want = sorted(_minimal_sets_by_brute_force(rows, budget),
                      key=lambda s: (sum(costs[i] for i in s), sum(rows[i].params_saved for i in s)))
        got, complete = _disjoint_sets(rows, budget, costs, keep)
        assert complete and got == want[:keep]

    check()


def _deep_rows():
    """Every candidate group of the zoo's ResNet-110 (884, overlapping), each costing 0.01 per layer."""
    from wsviz.analysis.opportunities import Opportunity, group_saving

    model = create_model("resnet110")
    return model, [Opportunity(g, group_saving(model, g), 0.0, 0.0, 0.0, 0.0, measured_kl=0.01 * len(g))
                   for g in candidate_groups(model)]


def test_a_budget_one_group_meets_is_found_among_many_groups():
    """ResNet-110 has 884 candidate groups; at a budget of 199,872 the search used to count every set
    reaching it, minimal or not, stop at 200,000 and say that no disjoint groups save it, although one
    group alone saves 626,688. The cheapest set is one run of 7 stage-3 convolutions (6 x 36,864)."""
    from wsviz.analysis.opportunities import choose_groups, most_saved

    model, rows = _deep_rows()
    assert len(rows) == 884 and max(r.params_saved for r in rows) == 626_688 and most_saved(rows) == 1_598_976
    (best,) = choose_groups(model, rows, 199_872, None, None, verify=0)
    assert best.complete and best.params_saved == 221_184 and len(best.groups) == 1 and len(best.groups[0]) == 7
    assert best.predicted == pytest.approx(0.07)
    (whole,) = choose_groups(model, rows, most_saved(rows), None, None, verify=0)  # the most: every lane whole
    assert whole.complete and whole.params_saved == 1_598_976 and len(whole.groups) == 6


@pytest.mark.timeout(120)  # a search that never calls progress cannot be cancelled: it ran for minutes
def test_the_budget_search_can_be_cancelled_and_says_when_it_was_cut_short():
    """Where too many sets save the budget to look at them all, the search calls ``progress`` as it goes
    (the page's Cancel raises there) and stops after ``max_nodes`` sets: what it found is returned marked
    incomplete, and with nothing found it says the search was cut short, not that no set exists."""
    from wsviz.analysis.opportunities import choose_groups, most_saved

    model, rows = _deep_rows()
    budget = most_saved(rows) - 2304  # one stage-1 layer short of the most: very many near-whole sets

    class Cancel(Exception):
        pass

    def cancel(i, n, what):
        assert "looking for disjoint groups" in what and 0 < i <= n
        raise Cancel

    with pytest.raises(Cancel):
        choose_groups(model, rows, budget, None, None, verify=0, progress=cancel)
    seen = []
    (found,) = choose_groups(model, rows, budget, None, None, verify=0, max_nodes=20_000,
                             progress=lambda i, n, what: seen.append(i))
    assert not found.complete and found.params_saved >= budget and seen and max(seen) <= 20_000
    with pytest.raises(WsvizError, match="was cut short after looking at 3 sets") as err:
        choose_groups(model, rows, budget, None, None, verify=0, max_nodes=3)  # the first set takes 6 groups
    assert "No disjoint" not in str(err.value)


def test_budgeted_choice_adds_measured_costs_then_measures_the_best_sets_tied_together(twin):
    from wsviz.analysis.opportunities import choose_groups, find_opportunities
    from wsviz.models.tie import reestimate_batchnorm, tie

    cal = load_split("mnist5k-scale", "train").spread(128)
    held = load_split("mnist5k-scale", "test").spread(200)
    groups = [g for g in candidate_groups(twin) if g[0].startswith(("stages.1.", "stages.2."))]
    rows = find_opportunities(twin, cal.images, cal.labels, groups=groups, held_out=(held.images, held.labels)).rows
    budget = 2 * twin.get_submodule("stages.2.1.conv2").weight.numel()
    choices = choose_groups(twin, rows, budget, cal.images, (held.images, held.labels), verify=3)
    assert len(choices) == 3 and all(c.by == "measured_kl" for c in choices)
    by = {r.group: r for r in rows}
    for c in choices:
        flat = [n for g in c.groups for n in g]
        assert len(flat) == len(set(flat)) and c.params_saved == sum(by[g].params_saved for g in c.groups) >= budget
        assert c.predicted == pytest.approx(sum(by[g].measured_kl for g in c.groups))
        assert c.measured == c.measured_kl
    assert [c.measured for c in choices] == sorted(c.measured for c in choices)
    best = choices[0]  # its measurements are those of all its groups tied at once, by hand
    base = reestimate_batchnorm(copy.deepcopy(twin), cal.images).eval()
    tied = reestimate_batchnorm(tie(twin, [list(g) for g in best.groups], "lstsq", cal.images), cal.images).eval()
    with torch.no_grad():
        p, q = base(held.images).double(), tied(held.images).double()
    kl = float((p.softmax(1) * (p.log_softmax(1) - q.log_softmax(1))).sum(1).mean())
    assert best.measured_kl == pytest.approx(kl, rel=1e-4)
    acc = [float((o.argmax(1) == held.labels).double().mean()) for o in (p, q)]
    assert best.measured_drop == pytest.approx(100 * (acc[0] - acc[1]), abs=1e-6)
    unverified = choose_groups(twin, rows, budget, cal.images, (held.images, held.labels), verify=0, by="measured_drop")
    assert [c.predicted for c in unverified] == sorted(c.predicted for c in unverified)
    assert all(c.measured is None for c in unverified)
    assert unverified[0].predicted == pytest.approx(sum(by[g].measured_drop for g in unverified[0].groups))
    with pytest.raises(WsvizError, match="No disjoint candidate groups save"):
        choose_groups(twin, rows, 10 ** 9, cal.images, (held.images, held.labels))
    with pytest.raises(WsvizError, match="Unknown cost"):
        choose_groups(twin, rows, budget, cal.images, (held.images, held.labels), by="weight_similarity")
    with pytest.raises(WsvizError, match="measured cost"):
        choose_groups(twin, find_opportunities(twin, cal.images, cal.labels, groups=groups).rows, budget,
                      cal.images, (held.images, held.labels))


def test_budgeted_choice_is_ordered_by_the_joint_measurement_not_the_sum(twin, monkeypatch):
    """When the sets measured tied together disagree with their summed costs, the measurement wins."""
    from dataclasses import replace

    from wsviz.analysis import opportunities as opp

    rows = _rows([(("a", "b"), 5), (("c", "d"), 5), (("e", "f"), 5)])
    rows = [replace(r, measured_kl=kl) for r, kl in zip(rows, (0.1, 0.2, 0.3))]  # predicted: {ab, cd} < {ab, ef} < {cd, ef}
    joint = {(("a", "b"), ("c", "d")): 0.9, (("a", "b"), ("e", "f")): 0.5, (("c", "d"), ("e", "f")): 0.1}
    monkeypatch.setattr(opp, "_untied_baseline", lambda model, images, held_out: None)
    monkeypatch.setattr("wsviz.models.tie.tie", lambda model, groups, **kw: tuple(tuple(g) for g in groups))
    monkeypatch.setattr(opp, "_tying_costs", lambda tied, images, held_out, baseline: {
        "measured_drop": 0.0, "measured_loss": 0.0, "measured_kl": joint[tied]})
    choices = opp.choose_groups(twin, rows, 10, torch.zeros(1), (torch.zeros(1), torch.zeros(1)), verify=3)
    assert [c.predicted for c in choices] == pytest.approx([0.5, 0.4, 0.3])
    assert [c.measured for c in choices] == [0.1, 0.5, 0.9]


def test_parameters_saved_count_the_bias_a_tied_layer_stops_storing():
    """A tied use site applies its owner's weight and bias, so a group of biased convolutions saves both:
    the table's count is what the model's accounting says the tie saved."""
    from wsviz.analysis.opportunities import group_saving
    from wsviz.models import summarize
    from wsviz.models.adopt import adopt
    from wsviz.models.tie import tie

    model = adopt(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *[nn.Conv2d(8, 8, 3, padding=1, bias=True)
                                                                 for _ in range(3)],
                                nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_shape=(1, 8, 8))
    group = ["1", "2", "3"]
    tied = tie(model, [group], init="mean")
    saved = summarize(model).unique_params - summarize(tied).unique_params
    assert group_saving(model, group) == saved == 2 * (8 * 8 * 9 + 8)
    plain = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(2)])
    assert group_saving(plain, ["0", "1"]) == 8 * 8 * 9


def test_the_most_a_choice_can_save_counts_every_layer_once(twin):
    """Candidate groups overlap (a run of three holds two runs of two), so adding up their savings
    overstates what any choice saves; most_saved is the best disjoint choice (brute force on small
    chains, hypothesis), and on the twin what tying every lane whole saves by the model's accounting."""
    import itertools

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from wsviz.analysis.opportunities import candidate_groups, most_saved, selection_saving
    from wsviz.models import summarize
    from wsviz.models.tie import tie

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.integers(2, 5), st.integers(1, 9)), min_size=1, max_size=3))
    def check(chains):
        rows = []
        for c, (n, size) in enumerate(chains):  # every contiguous run of each chain, as candidate_groups gives
            layers = [f"c{c}.{i}" for i in range(n)]
            rows += [(layers[a:b], (b - a - 1) * size) for a in range(n) for b in range(a + 2, n + 1)]
        rows = _rows(rows)
        best = 0
        for k in range(1, min(len(rows), 4) + 1):
            for combo in itertools.combinations(rows, k):
                if all(not set(a.group) & set(b.group) for a, b in itertools.combinations(combo, 2)):
                    best = max(best, sum(r.params_saved for r in combo))
        assert most_saved(rows) == best == sum((n - 1) * size for n, size in chains)
        assert most_saved(rows) <= sum(r.params_saved for r in rows)

    check()
    rows = _rows([(g, 0) for g in candidate_groups(twin)])
    rows = [type(r)(r.group, (len(r.group) - 1) * twin.get_submodule(r.group[0]).weight.numel(), 0.0, 0.0, 0.0, 0.0)
            for r in rows]
    lanes: dict[tuple[str, str], tuple[str, ...]] = {}  # (stage, conv) -> its longest run
    for r in rows:
        lane = (r.group[0].split(".")[1], r.group[0].split(".")[-1])
        lanes[lane] = max(lanes.get(lane, ()), r.group, key=len)
    whole = [list(g) for g in lanes.values()]
    saved = summarize(twin).unique_params - summarize(tie(twin, whole, init="mean")).unique_params
    assert most_saved(rows) == saved < sum(r.params_saved for r in rows)
    # a picked selection that overlaps is said to, and counts only its disjoint part
    a, b, c = (next(r for r in rows if r.group == g) for g in (("stages.0.0.conv2", "stages.0.1.conv2"),
                                                              ("stages.0.1.conv2", "stages.0.2.conv2"),
                                                              ("stages.1.1.conv1", "stages.1.2.conv1")))
    assert selection_saving([a, c]) == (a.params_saved + c.params_saved, [])
    assert selection_saving([a, b, c]) == (c.params_saved, ["stages.0.1.conv2"])


class _BiasBlock(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=bias)

    def forward(self, x):
        return torch.relu(self.conv(x))


class _BiasNet(nn.Module):
    """Three blocks whose convs match in shape but not in bias (True, True, False)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(_BiasBlock(True), _BiasBlock(True), _BiasBlock(False))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


def test_every_default_candidate_can_be_tied():
    """Candidates are grouped by everything tying needs to match (shape, groups, bias): blocks with and
    without a bias are not offered together, so the valid pair is scored instead of the whole run
    aborting on the first invalid group; a user's invalid group still gets its one-line error."""
    from wsviz.analysis.opportunities import find_opportunities
    from wsviz.models.tie import tie

    net = _BiasNet().eval()
    assert candidate_groups(net) == [("blocks.0.conv", "blocks.1.conv")]
    x, y = torch.randn(8, 4, 8, 8), torch.arange(8) % 3
    rows = find_opportunities(net, x, y, held_out=(x, y)).rows
    assert [r.group for r in rows] == [("blocks.0.conv", "blocks.1.conv")]
    for g in candidate_groups(net):
        tie(net, [g], "mean")
    with pytest.raises(WsvizError, match=r"^Group \['blocks.1.conv', 'blocks.2.conv'\]: .*bias[^\n]*$"):
        find_opportunities(net, x, y, groups=[("blocks.1.conv", "blocks.2.conv")])


class _AliasBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


@pytest.mark.parametrize("alias", ["weight", "module"])
def test_convolutions_that_already_share_a_tensor_are_refused_and_not_offered(alias):
    """An own model may tie weights by aliasing (blocks[1].conv.weight = blocks[0].conv.weight, or one conv
    module at two places): those layers are already shared, like SharedConv2d's, so they are no
    candidates and a group naming one gets a one-line error; every saving shown is what the
    accounting says the tie saves."""
    from wsviz.analysis.opportunities import group_saving
    from wsviz.models import summarize
    from wsviz.models.adopt import adopt
    from wsviz.models.tie import tie

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.blocks = nn.Sequential(*[_AliasBlock() for _ in range(4)])
            self.fc = nn.Linear(8, 10)
            if alias == "weight":
                self.blocks[1].conv.weight = self.blocks[0].conv.weight
            else:
                self.blocks[1].conv = self.blocks[0].conv

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    net = adopt(Net().eval(), input_shape=(1, 8, 8))
    assert candidate_groups(net) == [("blocks.2.conv", "blocks.3.conv")]
    base = summarize(net).unique_params
    for g in candidate_groups(net):
        assert group_saving(net, g) == base - summarize(tie(net, [g], "mean")).unique_params
    for g in (["blocks.0.conv", "blocks.1.conv"], ["blocks.1.conv", "blocks.2.conv"]):
        with pytest.raises(WsvizError, match=r"^Group \[.*already shares its weight[^\n]*$"):
            tie(net, [g], "mean")


def test_a_plain_cnn_offers_its_runs_of_same_shape_convolutions():
    """A flat Sequential (VGG) has no numbered blocks: its convolutions are the blocks, and a stage ends
    where the resolution changes (a pooling layer) or another convolution comes between. vgg11's three
    (512, 512, 3, 3) convs are features.13 | pool | features.16, features.18: one candidate."""
    import torchvision

    from wsviz.analysis.opportunities import find_opportunities, stage_similarity
    from wsviz.models import summarize
    from wsviz.models.adopt import adopt
    from wsviz.models.tie import tie

    with torch.device("meta"):
        vgg = torchvision.models.vgg11()
    assert candidate_groups(vgg) == [("features.16", "features.18")]
    net = adopt(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                              nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval(), input_shape=(1, 8, 8))
    assert candidate_groups(net) == [("2", "4"), ("11", "12")]
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 3
    found = find_opportunities(net, x, y, held_out=(x, y))
    base = summarize(net).unique_params
    assert {r.group: r.params_saved for r in found.rows} == {
        g: base - summarize(tie(net, [g], "mean")).unique_params for g in (("2", "4"), ("11", "12"))}
    assert [s.layers for s in found.stages] == [s.layers for s in stage_similarity(net, x)]
    assert ("2", "4", "8", "11", "12") in [s.layers for s in found.stages]


def test_no_candidates_is_said_truly():
    from wsviz.analysis.opportunities import find_opportunities, stage_similarity

    apart = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                          nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 1, 16, 16)
    apart(x)
    assert candidate_groups(apart) == []
    with pytest.raises(WsvizError, match=r"^No candidate groups: no two convolutions [^\n]*pooling[^\n]*$"):
        find_opportunities(apart, x, torch.zeros(4, dtype=torch.long))
    assert [s.layers for s in stage_similarity(apart, x)] == [("1", "3")]  # apart, yet comparable
    with pytest.raises(WsvizError, match=r"^No stage has two convolutions [^\n]*$"):
        stage_similarity(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3)), x)


# Candidates of every registry model and option (the rest have none), as they were before plain CNNs got
# candidates too: the flat rule must add nothing where every convolution sits in a numbered block.
REGISTRY_CANDIDATES = {
    "msws_resnet101 sharing=vanilla": 238, "msws_resnet152 sharing=vanilla": 620, "msws_resnet18 sharing=shared": 1,
    "msws_resnet18 sharing=unshared": 1, "msws_resnet18 sharing=vanilla": 5, "msws_resnet34 sharing=shared": 17,
    "msws_resnet34 sharing=unshared": 17, "msws_resnet34 sharing=vanilla": 44, "msws_resnet50 sharing=vanilla": 17,
    "msws_resnet_digits sharing=shared": 1, "msws_resnet_digits sharing=unshared": 1,
    "msws_resnet_digits sharing=vanilla": 4, "resnet110": 884, "resnet_digits": 14, "shardnet_vgg kind=E": 10,
    "sharesnet101 shared=False": 238, "sharesnet152 shared=False": 620, "sharesnet34 shared=False": 44,
    "sharesnet34 shared=True": 17, "sharesnet50 shared=False": 17, "sharesnet_resnet164 shared=False": 425,
    "sharesnet_wrn28_10 shared=False": 27, "sharesnet_wrn28_10 shared=True": 9, "sharesnet_wrn40_4 shared=False": 75,
    "sharesnet_wrn40_4 shared=True": 30, "sharesnet_wrn_digits shared=False": 14,
    "sharesnet_wrn_digits shared=True": 5, "wsms_resnet101 integration=1x1 shared=False": 481,
    "wsms_resnet101 integration=1x1 shared=True": 1, "wsms_resnet101 integration=3x3 shared=False": 481,
    "wsms_resnet101 integration=3x3 shared=True": 1, "wsms_resnet101 integration=none shared=False": 481,
    "wsms_resnet101 integration=none shared=True": 1, "wsms_resnet110 integration=1x1 shared=False": 1785,
    "wsms_resnet110 integration=1x1 shared=True": 289, "wsms_resnet110 integration=3x3 shared=False": 1785,
    "wsms_resnet110 integration=3x3 shared=True": 289, "wsms_resnet110 integration=none shared=False": 1785,
    "wsms_resnet110 integration=none shared=True": 289, "wsms_resnet152 integration=1x1 shared=False": 1263,
    "wsms_resnet152 integration=1x1 shared=True": 1, "wsms_resnet152 integration=3x3 shared=False": 1263,
    "wsms_resnet152 integration=3x3 shared=True": 1, "wsms_resnet152 integration=none shared=False": 1263,
    "wsms_resnet152 integration=none shared=True": 1, "wsms_resnet50 integration=1x1 shared=False": 39,
    "wsms_resnet50 integration=1x1 shared=True": 1, "wsms_resnet50 integration=3x3 shared=False": 39,
    "wsms_resnet50 integration=3x3 shared=True": 1, "wsms_resnet50 integration=none shared=False": 39,
    "wsms_resnet50 integration=none shared=True": 1, "wsms_resnet_digits integration=1x1 shared=False": 30,
    "wsms_resnet_digits integration=1x1 shared=True": 4, "wsms_resnet_digits integration=3x3 shared=False": 30,
    "wsms_resnet_digits integration=3x3 shared=True": 4, "wsms_resnet_digits integration=none shared=False": 30,
    "wsms_resnet_digits integration=none shared=True": 4,
}


def test_registry_models_keep_their_candidates():
    import itertools

    from wsviz.analysis.opportunities import _place
    from wsviz.models import get_spec, list_models

    seen = {}
    for name in list_models():
        spec = get_spec(name)
        for values in itertools.product(*spec.choices.values()):
            options = dict(zip(spec.choices, values))
            label = name + "".join(f" {k}={v}" for k, v in options.items())
            try:
                with torch.device("meta"):  # shapes only: fast
                    model = create_model(name, **options)
            except (RuntimeError, NotImplementedError):  # e2cnn's bases need real tensors
                model = create_model(name, **options)
            try:
                groups = candidate_groups(model)
            except WsvizError:  # no unshared convolutions at all
                groups = []
            assert all(_place(n) is not None for g in groups for n in g), label
            seen[label] = len(groups)
    assert {k: v for k, v in seen.items() if v} == REGISTRY_CANDIDATES
    assert len(seen) == 116


def test_the_most_a_choice_saves_is_true_for_any_groups():
    """Groups a user passes need not be runs: a chain of overlapping groups (a+b, b+c) is not itself a
    group, so tying it whole is no choice. most_saved is the best disjoint choice (brute force), and the
    budget's refusal says it."""
    import itertools

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from wsviz.analysis.opportunities import choose_groups, most_saved

    rows = _rows([(("a", "b"), 36_864), (("b", "c"), 36_864)])
    assert most_saved(rows) == 36_864
    with pytest.raises(WsvizError, match=r"^No disjoint candidate groups save 73,728 parameters: the most any choice "
                                         r"of disjoint groups saves is 36,864;[^\n]*$"):
        choose_groups(None, rows, 73_728, None, None, verify=0, by="measured_drop")

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.sets(st.sampled_from("abcdefg"), min_size=2, max_size=4), min_size=1, max_size=7),
           st.integers(1, 5))
    def check(groups, size):
        rows = _rows([(sorted(g), (len(g) - 1) * size) for g in groups])
        best = max(sum(r.params_saved for r in combo) for k in range(len(rows) + 1)
                   for combo in itertools.combinations(rows, k)
                   if all(not set(a.group) & set(b.group) for a, b in itertools.combinations(combo, 2)))
        assert most_saved(rows) == best

    check()
