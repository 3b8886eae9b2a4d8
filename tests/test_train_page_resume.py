"""The Train page resumes a cancelled run, whose finished epochs are already a usable variant."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import kill_active_runs
from streamlit.testing.v1 import AppTest

from wsviz.training.loop import TrainConfig
from wsviz.training.run import run_training
from wsviz.training.runstore import RunStore
from wsviz.training.state import state_path

ROOT = Path(__file__).resolve().parents[1]


class Stop(Exception):
    pass


def test_cancelled_run_is_a_variant_and_the_page_resumes_it(tmp_path, monkeypatch):
    import pages._shared as shared

    runs = tmp_path / "runs"
    monkeypatch.setattr(shared, "RUNS", runs)
    shared.scan_checkpoints.clear()
    store = RunStore(runs)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, max_batches=4)
    small = {"base_width": 4, "depth": 8}
    spec = {"model": "resnet_digits", "dataset": "mnist5k", "train_config": cfg.to_dict(), "overrides": small,
            "data_root": None, "device": None, "data_seed": 0}
    run = store.create("resnet_digits", "mnist5k", spec, "stopped")

    def stop_in_epoch_2(epoch, step, loss):
        if epoch == 2:
            raise Stop()

    with pytest.raises(Stop):  # cancelled during epoch 2: epoch 1 is saved, with its training state
        run_training("resnet_digits", "mnist5k", Path(run.out_dir) / "checkpoint", cfg, overrides=small,
                     on_step=stop_in_epoch_2)
    import json

    m = json.loads((Path(run.out_dir) / "checkpoint" / "card.json").read_text())["metrics"][0]
    store.log_metrics(run.id, 1, {k: m[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr")})
    store.finish(run.id, "cancelled", "cancelled by the user")
    assert state_path(Path(run.out_dir) / "checkpoint").is_file()
    try:
        assert any(label.startswith("run:stopped") for label in shared.available_variants())

        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        at.run()
        at.switch_page("pages/train.py")
        at.run()
        assert not at.exception, at.exception
        resume = [b for b in at.button if b.label == "Resume this run"]
        assert resume, [b.label for b in at.button]
        resume[0].click().run()
        assert not at.exception, at.exception
        assert store.get(run.id).status != "cancelled"  # queued (or already running) again
        deadline = time.monotonic() + 300
        while store.get(run.id).status in ("cancelled", "queued", "running"):
            assert time.monotonic() < deadline, (Path(run.out_dir) / "log.txt").read_text()[-2000:]
            time.sleep(0.2)
        done = store.get(run.id)
        assert done.status == "done", (done.reason, (Path(run.out_dir) / "log.txt").read_text()[-2000:])
        assert [e for e, _, _ in store.metrics(run.id)["test_acc"]] == [1, 2]  # epoch 1 kept, epoch 2 added
    finally:
        kill_active_runs(runs)
        shared.scan_checkpoints.clear()
