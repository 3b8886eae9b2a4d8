"""bench_tie pointed at any checkpoint (issue 19, "on CIFAR-10 when a user points the recipe at
it"): the original steps, the rule and the from-scratch baseline come from the checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_tie import TWIN, from_scratch, original_steps  # noqa: E402
from wsviz.analysis.opportunities import sharesnet_rule  # noqa: E402
from wsviz.models import summarize  # noqa: E402
from wsviz.models.tie import tie  # noqa: E402
from wsviz.training.checkpoint import load_checkpoint  # noqa: E402


def test_original_steps_come_from_the_card():
    _, card = load_checkpoint(TWIN)
    assert original_steps(card, 4000) == 12 * 31  # 12 epochs of whole batches of 128
    assert original_steps({"epochs_done": 3, "train_config": {"batch_size": 100}}, 50_000) == 1500
    assert original_steps({"epochs_done": 2, "train_config": {"batch_size": 512}}, 100) == 2  # one short batch
    with pytest.raises(SystemExit, match="does not say how it was trained"):
        original_steps({}, 4000)


def test_from_scratch_is_the_tied_architecture_with_fresh_weights():
    plain, card = load_checkpoint(TWIN)
    rule = sharesnet_rule(plain)
    tied = tie(plain, rule, "mean")
    fresh = from_scratch(card, tied, rule, 0)
    assert summarize(fresh).unique_params == summarize(tied).unique_params == 223_610
    a, b = fresh.get_submodule("stages.1.1.conv2").weight, tied.get_submodule("stages.1.1.conv2").weight
    assert not torch.allclose(a, b)
    assert fresh.get_submodule("stages.1.2.conv2").weight is fresh.get_submodule("stages.1.1.conv2").weight
    assert torch.equal(from_scratch(card, tied, rule, 0).get_submodule("stages.0.0.conv1").weight,
                       fresh.get_submodule("stages.0.0.conv1").weight)  # the seed fixes it
    # a model the registry cannot build (an adopted one): its modules' own initialisation, re-run
    other = from_scratch({"model": "no-such-model"}, tied, rule, 1)
    assert summarize(other).unique_params == 223_610
    assert not torch.allclose(other.get_submodule("stages.1.1.conv2").weight, b)
