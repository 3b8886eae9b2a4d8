"""Tying a trained network's convolutions (issue 19's mechanism): the tied model is a shared model
like the papers', its initial weights are what they claim, and bad groups are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from wsviz.data.datasets import load_split
from wsviz.errors import WsvizError
from wsviz.models import summarize
from wsviz.models.sharing import SharedConv2d
from wsviz.models.tie import _input_covariances, initial_weight, reestimate_batchnorm, tie
from wsviz.training.checkpoint import load_checkpoint
from wsviz.training.loop import evaluate

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
GROUPS = [[f"stages.{s}.1.conv2", f"stages.{s}.2.conv2"] for s in range(3)]  # ShaResNet's rule on this WRN


@pytest.fixture(scope="module")
def twin():
    if not (CKPT / "scale-sharesnet-unshared" / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    return load_checkpoint(CKPT / "scale-sharesnet-unshared")[0]


@pytest.fixture(scope="module")
def calib():
    return load_split("mnist5k-scale", "train").spread(512).images  # every class (the split is sorted by class)


def test_tied_twin_is_the_shared_architecture(twin):
    tied = tie(twin, GROUPS, init="mean")
    shared = load_checkpoint(CKPT / "scale-sharesnet")[0]
    s_tied, s_shared = summarize(tied), summarize(shared)
    assert s_tied.unique_params == s_shared.unique_params == 223_610
    assert s_tied.effective_params == summarize(twin).unique_params
    assert {p: r.sites for p, r in s_tied.reuse().items() if r.reused} == \
        {p: r.sites for p, r in s_shared.reuse().items() if r.reused}
    assert isinstance(tied.get_submodule("stages.2.2.conv2"), SharedConv2d)
    assert not isinstance(twin.get_submodule("stages.2.2.conv2"), SharedConv2d)  # the original is untouched


def test_each_use_site_trains_the_one_stored_weight(twin):
    tied = tie(twin, GROUPS, init="mean")
    owner = tied.get_submodule("stages.1.1.conv2").weight
    for site in ("stages.1.1.conv2", "stages.1.2.conv2"):
        owner.grad = None
        x = torch.randn(1, 32, 14, 14)
        tied.get_submodule(site)(x).sum().backward()
        assert owner.grad is not None and owner.grad.abs().sum() > 0, site


def test_initial_weights_are_what_they_claim(twin, calib):
    convs = [twin.get_submodule(p) for p in GROUPS[2]]
    ws = torch.stack([c.weight.detach() for c in convs])
    mean, _ = initial_weight(convs, "mean")
    assert torch.allclose(mean, ws.mean(0))
    medoid, _ = initial_weight(convs, "medoid")
    assert any(torch.equal(medoid, w) for w in ws)
    lstsq, _ = initial_weight(convs, "lstsq", twin, calib)
    covs = _input_covariances(twin, convs, calib)

    def error(w):  # sum over members of ||X_m w - X_m w_m||^2, every output channel
        return sum(float(torch.einsum("od,de,oe->", (w - wm).flatten(1).double(), c, (w - wm).flatten(1).double()))
                   for c, wm in zip(covs, ws))

    assert error(lstsq) < error(mean) and error(lstsq) < error(medoid)  # the least-squares optimum
    assert error(lstsq) <= error(lstsq + 1e-3 * torch.randn_like(lstsq))


def test_lstsq_with_fresh_batchnorm_keeps_most_of_the_accuracy(twin, calib):
    te = load_split("mnist5k-scale", "test").spread(400)
    _, base, _ = evaluate(twin, te.images, te.labels)
    acc = {}
    for init in ("medoid", "mean", "lstsq"):
        tied = reestimate_batchnorm(tie(twin, GROUPS, init=init, images=calib), calib)
        _, acc[init], _ = evaluate(tied, te.images, te.labels)
    # measured on the full test split: untied 96.4%; medoid 38.4%, mean 89.0%, lstsq 92.3% (no fine-tuning)
    assert acc["lstsq"] > acc["mean"] > acc["medoid"] and acc["lstsq"] > base - 0.1, (base, acc)


def test_batchnorm_reestimation_changes_statistics_only(twin, calib):
    tied = tie(twin, GROUPS, init="mean")
    before = {n: p.detach().clone() for n, p in tied.named_parameters()}
    bn = next(m for m in tied.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    reestimate_batchnorm(tied, calib)
    assert not torch.equal(bn.running_mean, stats) and bn.momentum == 0.1 and not tied.training
    assert all(torch.equal(p, before[n]) for n, p in tied.named_parameters())


@pytest.mark.parametrize("groups, words", [
    ([["stages.0.1.conv2", "stages.1.1.conv2"]], "differ in shape"),
    ([["stages.0.1.conv2", "stages.0.9.conv2"]], "no layer 'stages.0.9.conv2'"),
    ([["stages.0.1.conv2", "stages.0.1.bn2"]], "not a convolution"),
    ([["stages.0.1.conv2"]], "two or more"),
    ([["stages.0.1.conv2", "stages.0.2.conv2"], ["stages.0.2.conv2", "stages.0.1.conv1"]], "already in group 1"),
    ([["stages.0.1.conv2", "stages.0.1.conv2"]], "'stages.0.1.conv2' is twice in this group"),
    ([], "No groups"),
])
def test_bad_groups_are_refused_with_the_group_named(twin, groups, words):
    with pytest.raises(WsvizError, match=words):
        tie(twin, groups, init="mean")


def test_an_already_shared_layer_and_a_missing_calibration_are_refused(twin):
    shared = tie(twin, GROUPS, init="mean")
    # the message names the owner, and does not send the user to tie it (it lends its weight already)
    with pytest.raises(WsvizError, match=r"'stages.0.2.conv2' already shares the weight of 'stages.0.1.conv2'; a "
                                         r"layer shares one weight at most, so leave it out"):
        tie(shared, [["stages.0.2.conv2", "stages.0.0.conv2"]], init="mean")
    with pytest.raises(WsvizError, match="calibration images"):
        tie(twin, GROUPS, init="lstsq")
    # the conv that lends its weight cannot be tied to another group: its users would be left behind
    with pytest.raises(WsvizError, match=r"Group \['stages.0.0.conv2', 'stages.0.1.conv2'\]: 'stages.0.1.conv2' "
                                         r"already lends its weight to stages.0.2.conv2"):
        tie(shared, [["stages.0.0.conv2", "stages.0.1.conv2"]], init="mean")
    with pytest.raises(WsvizError, match="Unknown init"):
        tie(twin, GROUPS, init="first")


def test_a_model_without_convolutions_is_refused_naming_the_group():
    from wsviz.analysis.opportunities import candidate_groups

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(WsvizError, match=r"Group \['1', '2'\]: '1' is a Linear, not a convolution") as err:
        tie(mlp, [["1", "2"]], init="mean")
    assert "\n" not in str(err.value)
    with pytest.raises(WsvizError, match="no \\(unshared\\) convolutions"):
        candidate_groups(mlp)


def test_calibration_may_come_as_batches(twin, calib):
    """A DataLoader-like iterable of (images, labels) gives the same kernel as one tensor."""
    loader = [(calib[i:i + 100], torch.zeros(len(calib[i:i + 100]))) for i in range(0, len(calib), 100)]
    a = tie(twin, GROUPS[:1], init="lstsq", images=calib).get_submodule(GROUPS[0][0]).weight
    b = tie(twin, GROUPS[:1], init="lstsq", images=loader).get_submodule(GROUPS[0][0]).weight
    assert torch.allclose(a, b, atol=1e-5)
    from wsviz.models.tie import shuffled

    # BatchNorm: a tensor is batched in a fixed shuffled order; the same batches as an iterable give the same
    mixed = shuffled(calib)
    loader = [(mixed[i:i + 100], torch.zeros(len(mixed[i:i + 100]))) for i in range(0, len(mixed), 100)]
    bn_a = reestimate_batchnorm(tie(twin, GROUPS, "mean"), calib, batch_size=100).get_submodule("stages.2.2.bn2").running_var
    bn_b = reestimate_batchnorm(tie(twin, GROUPS, "mean"), loader).get_submodule("stages.2.2.bn2").running_var
    assert torch.allclose(bn_a, bn_b, rtol=1e-4, atol=1e-6)


def test_batchnorm_reestimation_does_not_depend_on_a_class_sorted_order():
    """The training split is sorted by class: batches of one class each give within-class variances,
    whose average underestimates what training saw (the twin loses 2 points that way). Re-estimated
    on the sorted split, the twin must keep its accuracy, as it does on the same images shuffled; and
    reestimate_batchnorm's docstring gives the numbers measured here, on the whole splits."""
    import copy
    from pathlib import Path

    from wsviz.data.datasets import load_split
    from wsviz.models.tie import calibration_batches, reestimate_batchnorm
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.loop import evaluate

    twin = Path(__file__).resolve().parents[1] / "checkpoints" / "scale-sharesnet-unshared"
    model, card = load_checkpoint(twin)
    tr, te = load_split("mnist5k-scale", "train"), load_split("mnist5k-scale", "test")
    assert (tr.labels[:-1] <= tr.labels[1:]).all()  # sorted by class: the case this guards
    as_trained = evaluate(model, te.images, te.labels)[1]
    again = reestimate_batchnorm(copy.deepcopy(model), tr.images)
    assert evaluate(again, te.images, te.labels)[1] >= as_trained - 0.01
    bn = next(m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ref = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the first BatchNorm sees the inputs through one conv: its variance must match the trained one's
    assert torch.allclose(bn.running_var, ref.running_var, rtol=0.1)
    shuffled = evaluate(again, te.images, te.labels)[1]
    in_order = reestimate_batchnorm(copy.deepcopy(model), list(calibration_batches(tr.images, 128)))  # as they come
    class_sorted = evaluate(in_order, te.images, te.labels)[1]
    doc = " ".join(reestimate_batchnorm.__doc__.split())
    for said in (f"at {100 * as_trained:.1f}% on its {len(te.labels):,} test images",
                 f"kept {100 * class_sorted:.1f}% re-estimated on its class-sorted {len(tr.labels):,}-image "
                 f"training split in batches of 128, {100 * (as_trained - class_sorted):.1f} points lost",
                 f"{100 * shuffled:.1f}% on the same images shuffled, {100 * (as_trained - shuffled):.1f} points lost"):
        assert said in doc, said


# -- lstsq-bn: per-member input scales folded into the BatchNorm before each member ----------------

def _member_outputs(model, paths, images):
    """Each conv's output on ``images`` (hooks; eval mode), in the order of ``paths``."""
    outs = {}
    hs = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: outs.__setitem__(p, o.detach()))
          for p in paths]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in hs:
        h.remove()
    return [outs[p] for p in paths]


def test_the_batchnorms_that_can_absorb_a_scale_are_found_and_the_others_refused(twin, calib):
    from wsviz.models.tie import absorbing_norms

    paths = ["stages.0.1.conv2", "stages.2.2.conv2", "stages.0.1.conv1", "stages.1.0.conv1", "stages.1.0.shortcut"]
    found = absorbing_norms(twin, [twin.get_submodule(p) for p in paths], calib)
    # conv2 and an inner conv1 see relu(bn(.)) of their own block's BN, which feeds nothing else; the
    # first conv of stage 1 shares relu(bn1(x)) with its block's projection shortcut, so a scale folded
    # into bn1 would change the shortcut too: refused (and so is the shortcut itself)
    assert found == ["stages.0.1.bn2", "stages.2.2.bn2", "stages.0.1.bn1", None, None]
    assert torch.equal(twin.stages[0][1].bn2.weight, load_checkpoint(CKPT / "scale-sharesnet-unshared")[0]
                       .stages[0][1].bn2.weight)  # the trial rescaling was undone


def test_lstsq_bn_reproduces_the_members_outputs_better_and_changes_only_what_it_says(twin, calib):
    tied = {init: tie(twin, GROUPS, init=init, images=calib[:256]) for init in ("lstsq", "lstsq-bn")}
    t = tied["lstsq-bn"]
    assert t.wsviz_tie["init"] == "lstsq-bn"
    assert t.wsviz_tie["rescaled_norms"] == [p.replace("conv2", "bn2") for g in GROUPS for p in g]
    members = [p for g in GROUPS for p in g]
    want = _member_outputs(twin, members, calib[:128])

    def error(model):  # what each member conv computes, against what it computed untied
        return sum(float(((o - w) ** 2).sum()) for o, w in zip(_member_outputs(model, members, calib[:128]), want))

    assert error(tied["lstsq-bn"]) < 0.8 * error(tied["lstsq"]), (error(tied["lstsq-bn"]), error(tied["lstsq"]))
    # same architecture and counts; apart from the tied kernels only the named BNs' weight and bias moved
    assert summarize(t).unique_params == summarize(tied["lstsq"]).unique_params == 223_610
    source = dict(twin.named_parameters())
    rescaled = {f"{n}.{k}" for n in t.wsviz_tie["rescaled_norms"] for k in ("weight", "bias")}
    owners = {f"{g[0]}.weight" for g in GROUPS}
    for name, p in t.named_parameters():
        if name not in rescaled | owners:
            assert torch.equal(p, source[name]), name
    for bn in t.wsviz_tie["rescaled_norms"]:  # a positive scale per channel, the same for weight and bias
        new, old = t.get_submodule(bn), twin.get_submodule(bn)
        a = new.weight / old.weight
        assert (a > 0).all() and torch.allclose(new.bias, a * old.bias, rtol=1e-4, atol=1e-6), bn


def test_lstsq_bn_is_lstsq_where_no_batchnorm_can_absorb_a_scale(calib):
    from wsviz.models.tie import initial_weight as iw

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = calib[:64]
    scaled = tie(net, [["2", "4"]], init="lstsq-bn", images=x)
    plain = tie(net, [["2", "4"]], init="lstsq", images=x)
    assert scaled.wsviz_tie["rescaled_norms"] == []
    assert torch.allclose(scaled.get_submodule("2").weight, plain.get_submodule("2").weight, atol=1e-6)
    assert torch.allclose(plain.get_submodule("2").weight, iw([net[2], net[4]], "lstsq", net, x)[0])
    with pytest.raises(WsvizError, match="lstsq-bn.*calibration images"):
        tie(net, [["2", "4"]], init="lstsq-bn")
    with pytest.raises(WsvizError, match="needs the whole model.*tie"):  # it cannot rescale BNs from here
        iw([net[2], net[4]], "lstsq-bn", net, x)


def test_the_init_docstring_says_which_recipe_its_fine_tunes_ran_with():
    """The module docstring quotes lstsq-bn vs lstsq after fine-tuning from benchmarks/results/tie-init-*.md;
    where those runs say they ran with a recipe a later commit replaced, the docstring must say so."""
    import re

    import wsviz.models.tie as tie_module

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    before = {m.group(1) for p in results.glob("tie-init-*.md")
              for m in re.finditer(r"ran before commit (\w+)[^.]*were not repeated", " ".join(p.read_text().split()))}
    if not before:
        pytest.skip("no tie-init result says its fine-tunes are out of date")
    doc = " ".join(tie_module.__doc__.split())
    for commit in before:
        assert re.search(rf"before commit {commit}\b[^.]*not repeated", doc), commit
