"""Short fine-tunes (issue 19): a cosine annealed per step, distillation from a teacher, and the
average of the last steps' weights; each checked against a hand computation of what it claims."""

from __future__ import annotations

import copy
import math
import shlex

import pytest
import torch
import torch.nn.functional as F

from wsviz import WsvizError
from wsviz.models import create_model
from wsviz.training.loop import TrainConfig, train
from wsviz.training.run import reproduce_command

SMALL = {"base_width": 4, "depth": 8}


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(seed=0, depth=8):
    torch.manual_seed(seed)
    return create_model("resnet_digits", **{**SMALL, "depth": depth})


def _tied(untied):
    """A copy of ``untied`` (depth 20: three blocks a stage) with the conv2 of blocks 2 and 3 of each
    stage tied (ShaResNet's rule)."""
    from wsviz.analysis.opportunities import sharesnet_rule
    from wsviz.models.tie import tie

    return tie(untied, sharesnet_rule(untied), "mean")


def _lrs(cfg, data, monkeypatch):
    """The learning rate each optimiser step ran at."""
    import wsviz.training.loop as loop

    rates = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(loop, "make_optimizer", lambda m, c: Spy(list(m.parameters()), lr=c.lr, momentum=c.momentum))
    train(_model(), data, data, cfg)
    return rates


def test_a_per_step_cosine_anneals_within_one_epoch(monkeypatch):
    data = _data(96)
    steps = 96 // 16
    lrs = _lrs(TrainConfig(epochs=1, batch_size=16, lr=0.1, step_schedule=True), data, monkeypatch)
    want = [0.05 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    assert lrs == pytest.approx(want)
    # stepped per epoch (the default), one epoch runs at a constant rate: the reason for the option
    assert _lrs(TrainConfig(epochs=1, batch_size=16, lr=0.1), data, monkeypatch) == pytest.approx([0.1] * steps)
    # over two epochs the per-step cosine runs over all 12 steps, not 6 twice
    lrs2 = _lrs(TrainConfig(epochs=2, batch_size=16, lr=0.1, step_schedule=True), data, monkeypatch)
    assert lrs2 == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 12)) for k in range(12)])


def test_average_last_ends_with_the_mean_of_the_last_steps_weights():
    data = _data(96)
    model, snaps = _model(), []
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, average_last=3)
    train(model, data, data, cfg, on_step=lambda e, s, loss: snaps.append(copy.deepcopy(model.state_dict())))
    assert len(snaps) == 12
    final = model.state_dict()
    for k, v in final.items():
        if v.is_floating_point():  # weights and BatchNorm statistics alike
            want = torch.stack([s[k] for s in snaps[-3:]]).mean(0)
            assert torch.allclose(v, want, atol=1e-6), k
    moved = [k for k, v in final.items() if v.is_floating_point() and not torch.equal(snaps[-1][k], snaps[-3][k])]
    assert moved  # the steps differ, so the mean is not just the last step


def test_average_last_is_refused_over_more_than_one_epoch():
    with pytest.raises(WsvizError, match="at most the steps of one epoch"):
        train(_model(), _data(96), _data(96), TrainConfig(epochs=1, batch_size=16, average_last=7))


def test_distillation_loss_is_the_softened_kl_to_the_teacher():
    x, y = _data(64)
    teacher = _model(seed=1).eval()
    model = _model()
    start = copy.deepcopy(model).train()
    losses = []
    t, a = 3.0, 0.25
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, distill=t, distill_weight=a)
    train(model, (x, y), (x, y), cfg, teacher=teacher, on_step=lambda e, s, loss: losses.append(loss))
    # one batch of all 64 images (in some order: the loss does not depend on it)
    with torch.no_grad():
        out, tout = start(x), teacher(x)
    kl = (F.softmax(tout / t, 1) * (F.log_softmax(tout / t, 1) - F.log_softmax(out / t, 1))).sum(1).mean()
    want = (1 - a) * F.cross_entropy(out, y) + a * t * t * kl
    assert losses[0] == pytest.approx(float(want), rel=1e-4)


def test_an_aux_loss_is_added_to_every_steps_loss_and_trains_the_model():
    """train(aux_loss=...): the term is in the loss each step reports and in its gradient (a pull of
    the last layer's weights to zero shrinks them, against the same run without it)."""
    x, y = _data(64)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, weight_decay=0.0)  # one batch of all 64 per step
    plain, pulled = _model(), _model()
    first = copy.deepcopy(pulled).train()

    def last(m):
        return [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1].weight

    calls, losses = [], []

    def aux():
        calls.append(1)
        return 10.0 * last(pulled).pow(2).sum()
    train(plain, (x, y), (x, y), cfg)
    train(pulled, (x, y), (x, y), cfg, aux_loss=aux, on_step=lambda e, s, loss: losses.append(loss))
    assert len(calls) == 4  # once per step
    with torch.no_grad():
        want = F.cross_entropy(first(x), y) + 10.0 * last(first).pow(2).sum()
    assert losses[0] == pytest.approx(float(want), rel=1e-4)
    assert last(pulled).pow(2).sum() < 0.8 * last(plain).pow(2).sum()


@pytest.mark.parametrize("kwargs, words", [
    ({"step_schedule": True, "schedule": "step"}, "per-step schedule is the cosine"),
    ({"distill": -1.0}, "distillation temperature"), ({"distill": float("nan")}, "distillation temperature"),
    ({"distill_weight": 1.5}, "distillation weight"), ({"average_last": -2}, "average_last"),
    ({"distill": 4.0, "feature_distill": -1.0}, "feature distillation weight"),
    ({"distill": 4.0, "feature_distill": float("inf")}, "feature distillation weight"),
    ({"feature_distill": 3.0}, "needs distillation on"),
])
def test_bad_fine_tuning_options_are_refused(kwargs, words):
    with pytest.raises(WsvizError, match=words):
        TrainConfig(**kwargs).validate()


def test_distillation_without_a_teacher_says_what_to_give():
    with pytest.raises(WsvizError, match="teacher"):
        train(_model(), _data(32), _data(32), TrainConfig(epochs=1, batch_size=16, distill=4.0))


def test_the_reproduce_command_carries_the_fine_tuning_options():
    from wsviz.train import _config, apply_recipe, build_parser

    cfg = TrainConfig(epochs=1, lr=0.01, step_schedule=True, distill=4.0, distill_weight=0.5, average_last=15,
                      feature_distill=3.0)
    cmd = reproduce_command("resnet_digits", "mnist5k", cfg, {}, "out", 0, init_from="checkpoints/scale-resnet20")
    args = apply_recipe(build_parser().parse_args(shlex.split(cmd)[3:]))
    again = _config(args)
    assert (again.step_schedule, again.distill, again.distill_weight, again.average_last,
            again.feature_distill) == (True, 4.0, 0.5, 15, 3.0)


def test_a_background_job_command_carries_every_training_option(tmp_path):
    """The command a queued run is started with, parsed back by wsviz.train, gives the run's whole
    TrainConfig: an option the job builder forgets would silently train something else."""
    from wsviz.train import _config, apply_recipe, build_parser
    from wsviz.training.jobs import train_command
    from wsviz.training.runstore import RunStore
    from wsviz.training.tying import finetune_config

    store = RunStore(tmp_path / "runs")
    cfg = finetune_config(3, 0.02, max_batches=9, seed=5, batch_size=64, weight_decay=5e-4, augment="cifar",
                          workers=1, loader="stream")
    spec = {"model": "resnet_digits", "dataset": "mnist5k", "train_config": cfg.to_dict(), "overrides": {},
            "data_root": None, "device": None, "data_seed": 2, "init_from": "checkpoints/scale-resnet20"}
    run = store.create("resnet_digits", "mnist5k", spec, "t")
    cmd = train_command(store, run, 1, resume=False, gpus=[])
    again = _config(apply_recipe(build_parser().parse_args(cmd[3:])))
    assert again == cfg
    assert (again.distill, again.average_last, again.step_schedule) == (4.0, 9, True)


def test_recipe_averages_at_most_one_epoch_of_the_training_set_it_is_given():
    """The recipe's 15 averaged steps shrink to a small set's whole epoch (the loop refuses more than
    one epoch), counted as the loop counts it: whole batches, at least one."""
    from wsviz.training.tying import AVERAGE_LAST, finetune_config

    assert AVERAGE_LAST == 15
    assert finetune_config(1, 0.01).average_last == 15
    assert finetune_config(1, 0.01, train_images=60_000).average_last == 15
    assert finetune_config(1, 0.01, train_images=1_437).average_last == 11  # sklearn digits' train split
    assert finetune_config(1, 0.01, train_images=1_437, batch_size=256).average_last == 5
    assert finetune_config(1, 0.01, train_images=100).average_last == 1
    assert finetune_config(1, 0.01, train_images=1_437, max_batches=4).average_last == 4
    assert finetune_config(1, 0.01, train_images=100, distill=False).average_last == 0
    # and the loop takes it: 96 images in batches of 16 are 6 steps
    cfg = finetune_config(1, 0.01, train_images=96, batch_size=16)
    assert cfg.average_last == 6
    untied = _model(seed=1, depth=20)
    train(_tied(untied), _data(96), _data(96), cfg, teacher=untied)


def test_the_recipe_is_the_one_its_benchmark_adopted():
    """finetune_config: half the loss from the untied model's predictions at T = 4, half from the labels,
    feature distillation at weight 3 (results/tie-recipe-plan.md, fourth plan); any field given overrides."""
    from wsviz.training.tying import finetune_config

    cfg = finetune_config(1, 0.01)
    assert (cfg.distill, cfg.distill_weight, cfg.feature_distill, cfg.average_last) == (4.0, 0.5, 3.0, 15)
    assert finetune_config(1, 0.01, feature_distill=0.0, distill_weight=1.0).feature_distill == 0.0
    labels = finetune_config(1, 0.01, distill=False)
    assert (labels.distill, labels.feature_distill, labels.average_last) == (0.0, 0.0, 0)
    labels.validate()


def test_feature_distillation_is_the_blocks_relative_error_and_trains_the_student_only():
    """tying.feature_distillation after a forward pass of both models on one batch: the weight times the
    mean over the tied convs' blocks of ||s - t||^2 / ||t||^2, zero for an exact copy of the teacher;
    its gradient reaches the student's weights, never the teacher's; remove() takes every hook off."""
    from wsviz.analysis.opportunities import sharesnet_rule
    from wsviz.training.tying import feature_distillation

    untied = _model(seed=3, depth=20).eval()
    rule = sharesnet_rule(untied)
    x = torch.rand(8, 1, 28, 28)
    twin = copy.deepcopy(untied)
    term, remove = feature_distillation(twin, untied, rule, 3.0)
    twin(x), untied(x)
    assert float(term()) == pytest.approx(0.0, abs=1e-12)
    remove()
    tied = _tied(untied).eval()
    blocks = list(dict.fromkeys(p.rsplit(".", 1)[0] for g in rule for p in g))
    assert len(blocks) == 2 * len(rule)
    want = []
    for b in blocks:  # each block's output by a hook of the test's own
        got = {}
        hs = [m.get_submodule(b).register_forward_hook(lambda mod, i, o, k=k: got.__setitem__(k, o.detach()))
              for k, m in (("s", tied), ("t", untied))]
        with torch.no_grad():
            tied(x), untied(x)
        for h in hs:
            h.remove()
        want.append(float((got["s"] - got["t"]).pow(2).sum() / got["t"].pow(2).sum()))
    term, remove = feature_distillation(tied, untied, rule, 3.0)
    tied(x), untied(x)
    value = term()
    assert float(value) == pytest.approx(3.0 * sum(want) / len(want), rel=1e-5) and float(value) > 0
    value.backward()
    assert tied.get_submodule(rule[0][0]).weight.grad is not None
    assert all(p.grad is None for p in untied.parameters())
    remove()
    assert not any(m._forward_hooks for m in (*tied.modules(), *untied.modules()))


def test_a_fine_tune_with_feature_distillation_adds_the_term_and_leaves_no_hooks():
    """train() with cfg.feature_distill: the first step's loss is the recipe's mix of labels and
    predictions plus the feature term of the starting model; a model with nothing tied is refused
    with what to do; afterwards neither model keeps a hook, also when a step fails."""
    from wsviz.analysis.opportunities import sharesnet_rule
    from wsviz.training.loop import TrainingFailed
    from wsviz.training.tying import feature_distillation

    x, y = _data(64)
    untied = _model(seed=1, depth=20).eval()
    tied = _tied(untied)
    start = copy.deepcopy(tied).train()
    t, a, w = 4.0, 0.5, 3.0
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, distill=t, distill_weight=a, feature_distill=w)
    losses = []
    train(tied, (x, y), (x, y), cfg, teacher=untied, on_step=lambda e, s, loss: losses.append(loss))
    term, remove = feature_distillation(start, untied, sharesnet_rule(untied), w)
    with torch.no_grad():
        out, tout = start(x), untied(x)
        feat = term()
    remove()
    kl = (F.softmax(tout / t, 1) * (F.log_softmax(tout / t, 1) - F.log_softmax(out / t, 1))).sum(1).mean()
    want = (1 - a) * F.cross_entropy(out, y) + a * t * t * kl + feat
    assert float(feat) > 0.01 and losses[0] == pytest.approx(float(want), rel=1e-4)
    assert not any(m._forward_hooks for m in (*tied.modules(), *untied.modules()))
    with pytest.raises(WsvizError, match="no tied groups"):
        train(_model(), (x, y), (x, y), cfg, teacher=untied)
    with pytest.raises(TrainingFailed):
        train(_tied(untied), (x, y), (x, y), replace_cfg(cfg, lr=10.0), teacher=untied,
              aux_loss=lambda: torch.tensor(float("nan")))
    assert not any(m._forward_hooks for m in untied.modules())


def replace_cfg(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
