"""Resume: a run killed after an epoch and continued with --resume ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_active_runs
from safetensors.torch import load_file

from wsviz import WsvizError
from wsviz.training.loop import TrainConfig
from wsviz.training.state import load_state, save_state, state_path

ROOT = Path(__file__).resolve().parents[1]
# Streamed data with augmentation (in a worker process), a multistep schedule and momentum: every piece of
# state a resumed run must restore is in play.
ARGS = ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "3", "--batch-size", "32",
        "--max-batches", "6", "--lr", "0.05", "--schedule", "multistep", "--milestones", "1", "--augment", "cifar",
        "--workers", "1", "--device", "cpu", "--quiet", "--set", "base_width=8", "--set", "depth=8"]
# Runs wsviz.train, but SIGKILLs the process right after the training state of epoch 1 is on disk.
KILL_AFTER_EPOCH_1 = """
import os, signal, sys
import wsviz.training.state as st
real = st.save_state
def save_then_die(path, state):
    real(path, state)
    if state["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
st.save_state = save_then_die
from wsviz.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train(args: list[str], *, kill: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILL_AFTER_EPOCH_1, *args] if kill else [sys.executable, "-m", "wsviz.train", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_killed_after_epoch_1_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = _train([*ARGS, "--out", str(whole)])
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _train([*ARGS, "--out", str(cut)], kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((cut / "card.json").read_text())["epochs_done"] == 1  # the checkpoint of epoch 1 is kept
    assert state_path(cut).is_file()
    epoch1 = json.loads((cut / "card.json").read_text())["metrics"][0]

    resumed = _train([*ARGS, "--out", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(whole / "weights.safetensors")), load_file(str(cut / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k  # bit for bit
    card, ref = json.loads((cut / "card.json").read_text()), json.loads((whole / "card.json").read_text())
    assert card["complete"] and card["epochs_done"] == 3 and card["test_accuracy"] == ref["test_accuracy"]
    assert card["metrics"][0] == epoch1  # epoch 1's metrics are those the killed run measured
    same = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")
    assert [{k: m[k] for k in same} for m in card["metrics"]] == [{k: m[k] for k in same} for m in ref["metrics"]]
    assert not state_path(cut).exists()  # a complete run leaves no training state behind

    # TensorBoard: the killed run's events after epoch 1 are purged; each step is logged once.
    steps = _scalars(Path(f"{cut}.tensorboard"), "train/loss_step")
    assert [s for s, _ in steps] == list(range(1, 19))
    assert steps == _scalars(Path(f"{whole}.tensorboard"), "train/loss_step")


def test_resume_refuses_a_state_of_another_run(tmp_path):
    from wsviz.training.run import run_training

    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, max_batches=2)
    small = {"base_width": 8, "depth": 8}
    path = state_path(tmp_path / "ck")
    save_state(path, {"epoch": 1, "run": {"model": "resnet_digits", "config": {}, "dataset": "mnist5k"}})
    with pytest.raises(WsvizError, match="belongs to another run"):
        run_training("resnet_digits", "mnist5k", tmp_path / "ck", cfg, overrides=small, resume=True)
    path.write_bytes(b"\x80\x04 not a state")
    with pytest.raises(WsvizError, match="cannot be read"):
        load_state(path)


def test_state_round_trips_every_kind_of_value(tmp_path):
    import random
    from collections import Counter

    import numpy as np
    import torch

    state = {"t": torch.arange(6.0).view(2, 3), "scalar": torch.tensor(3.5), "np": np.random.get_state(),
             "py": random.getstate(), "c": Counter({30: 1, 60: 2}), 0: {"momentum_buffer": None},
             "inf": float("inf"), "list": [1, (2, "x")], "flag": True}
    back = load_state(save_state(tmp_path / "s.safetensors", state))
    assert back["t"].equal(state["t"]) and back["scalar"].equal(state["scalar"])
    assert back["np"][0] == state["np"][0] and (back["np"][1] == state["np"][1]).all() and back["np"][2:] == state["np"][2:]
    assert back["py"] == state["py"] and back["c"] == state["c"] and isinstance(back["c"], Counter)
    assert back[0] == {"momentum_buffer": None} and back["inf"] == float("inf") and back["list"] == [1, (2, "x")]
    assert back["flag"] is True


def test_app_resume_continues_a_killed_job_and_keeps_its_first_epochs(tmp_path):
    from wsviz.training.jobs import launch, list_runs, resumable, resume
    from wsviz.training.runstore import RunStore

    store = RunStore(tmp_path / "runs")
    try:
        cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, max_batches=8)
        run = launch(store, "resnet_digits", "mnist5k", cfg, overrides={"base_width": 8, "depth": 8})
        state = state_path(Path(run.out_dir) / "checkpoint")
        deadline = time.monotonic() + 300
        while not state.exists():
            assert time.monotonic() < deadline and store.get(run.id).status in ("queued", "running"), \
                (Path(run.out_dir) / "log.txt").read_text()[-2000:]
            time.sleep(0.02)
        os.kill(store.get(run.id).pid, signal.SIGKILL)
        while store.get(run.id).active:
            list_runs(store)  # marks the vanished process failed
            time.sleep(0.1)
        killed = store.get(run.id)
        assert killed.status == "failed" and resumable(killed)
        kept = load_state(state)["epoch"]
        before = [e for e, _, _ in store.metrics(run.id)["test_acc"]]
        assert before[:kept] == list(range(1, kept + 1))

        resume(store, run.id)
        while store.get(run.id).active:
            assert time.monotonic() < deadline, (Path(run.out_dir) / "log.txt").read_text()[-2000:]
            time.sleep(0.2)
        assert store.get(run.id).status == "done", store.get(run.id).reason
        assert [e for e, _, _ in store.metrics(run.id)["test_acc"]] == [1, 2, 3, 4]  # each epoch once
        card = json.loads((Path(run.out_dir) / "checkpoint" / "card.json").read_text())
        assert card["complete"] and [m["epoch"] for m in card["metrics"]] == [1, 2, 3, 4]
        with pytest.raises(WsvizError, match="only a failed or cancelled run"):
            resume(store, run.id)
    finally:
        kill_active_runs(tmp_path / "runs")


def test_a_state_saved_before_a_training_field_existed_resumes_with_that_fields_default(tmp_path):
    """A state written by an older wsviz has no entry for a TrainConfig field added since (here
    feature_distill): it is read as the field's default, so the run resumes; the field set to
    anything else is still another run."""
    import dataclasses

    from wsviz.training.run import _FREE_ON_RESUME, _check_resumable

    cfg = TrainConfig(epochs=2, distill=4.0)
    old = {k: v for k, v in cfg.to_dict().items() if k not in _FREE_ON_RESUME and k != "feature_distill"}
    state = {"epoch": 1, "run": {"model": "m", "config": {}, "dataset": "d", "data_seed": 0, "train_config": old}}
    _check_resumable(state, "m", {}, "d", cfg, 0, tmp_path / "s")
    with pytest.raises(WsvizError, match="train_config differ"):
        _check_resumable(state, "m", {}, "d", dataclasses.replace(cfg, feature_distill=3.0), 0, tmp_path / "s")
