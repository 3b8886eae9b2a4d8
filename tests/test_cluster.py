"""Jobs on GPU machines and clusters: one job per GPU, psutil liveness, the submitit backend."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import kill_active_runs

from wsviz.training.jobs import launch
from wsviz.training.loop import TrainConfig
from wsviz.training.runstore import RunStore, pid_alive, process_start_time

SMALL = {"base_width": 4, "depth": 8}


@pytest.fixture
def store(tmp_path):
    yield RunStore(tmp_path / "runs")
    kill_active_runs(tmp_path / "runs")


def _wait(store: RunStore, ids: list[str], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while any(store.get(i).active for i in ids):
        assert time.monotonic() < deadline, [store.get(i) for i in ids]
        store.reconcile()
        time.sleep(0.2)


def test_two_fake_gpus_run_two_jobs_at_once_each_pinned_to_its_own(store, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, max_batches=6)
    runs = [launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, name=f"gpu-{i}", max_running=1)
            for i in range(2)]  # max_running=1 (the CPU limit) would run them one after the other
    _wait(store, [r.id for r in runs])
    done = [store.get(r.id) for r in runs]
    assert [r.status for r in done] == ["done", "done"], [r.reason for r in done]
    assert sorted(r.slot for r in done) == ["0", "1"]
    assert sorted(r.device for r in done) == ["cuda (GPU 0)", "cuda (GPU 1)"]
    a, b = done
    assert a.started < b.finished and b.started < a.finished  # they overlapped
    pinned = sorted(line for r in done for line in (Path(r.out_dir) / "log.txt").read_text().splitlines()
                    if line.startswith("pinned to GPU slot"))
    assert pinned == ["pinned to GPU slot 0: CUDA_VISIBLE_DEVICES=0", "pinned to GPU slot 1: CUDA_VISIBLE_DEVICES=1"]


def test_without_gpus_jobs_queue_for_the_cpu_slots(store, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=3)
    runs = [launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, name=f"cpu-{i}", max_running=1)
            for i in range(2)]
    _wait(store, [r.id for r in runs])
    a, b = (store.get(r.id) for r in runs)
    assert a.status == b.status == "done" and a.slot is None and b.slot is None
    assert a.finished <= b.started  # one CPU slot: one after the other, first come first served


def test_liveness_is_asked_of_psutil():
    me = psutil.Process()
    assert process_start_time(me.pid) == repr(me.create_time())
    assert pid_alive(me.pid, process_start_time(me.pid))
    assert not pid_alive(me.pid, "0.0")  # the pid is reused by another process: not our run
    assert process_start_time(2**22 + 12345) is None


def test_submitit_backend_runs_a_job_through_submitits_local_executor(store):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=3)
    run = launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, backend="submitit-local")
    assert run.host.startswith("submitit-local:") and run.pid is None  # queued by submitit, not yet started
    _wait(store, [run.id])
    run = store.get(run.id)
    assert run.status == "done", run.reason
    card = json.loads((Path(run.out_dir) / "checkpoint" / "card.json").read_text())
    assert card["complete"] and card["test_accuracy"] == run.test_accuracy
    assert list((Path(run.out_dir) / "submitit").glob("*_log.out"))  # submitit's own job files
