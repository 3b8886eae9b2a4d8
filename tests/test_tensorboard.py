"""TensorBoard: every run writes event files that TensorBoard's own reader reads back."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from wsviz.training.loop import TrainConfig
from wsviz.training.run import run_training


def test_event_files_hold_the_runs_scalars(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, max_batches=4, schedule="step", step_size=1, gamma=0.5)
    card = run_training("resnet_digits", "mnist5k", tmp_path / "ck", cfg, overrides={"base_width": 4, "depth": 8},
                        tensorboard=tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss_step", "train/loss", "train/accuracy", "test/loss",
                                          "test/accuracy", "lr", "images_per_s"}
    steps = acc.Scalars("train/loss_step")
    assert [e.step for e in steps] == list(range(1, 9))  # 4 steps an epoch, 2 epochs
    for tag, key in (("test/accuracy", "test_acc"), ("train/loss", "train_loss"), ("lr", "lr"),
                     ("images_per_s", "images_per_s")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [4, 8]  # logged at the last step of each epoch
        assert [e.value for e in events] == pytest.approx([m[key] for m in card["metrics"]], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.05, 0.025])  # float32 in the file
