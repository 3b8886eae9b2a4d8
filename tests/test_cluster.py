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


# ------------------------------------------------------------------ SLURM, through submitit, on a fake cluster
# sbatch, sacct and scancel are stand-ins written here: submitit itself runs unchanged and calls them, so
# these tests exercise the real submission, state query and cancellation path. The job's state is a file.
FAKE = {
    "srun": "exit 0",
    "sbatch": 'if [ -f "$FAKE_SLURM/refuse" ]; then cat "$FAKE_SLURM/refuse" >&2; exit 1; fi\n'
              'echo "Submitted batch job $(cat "$FAKE_SLURM/id")"',
    "sacct": 'echo "JobID|State|NodeList"\necho "$(cat "$FAKE_SLURM/id")|$(cat "$FAKE_SLURM/state")|node7"',
    "scancel": 'echo "$@" >> "$FAKE_SLURM/scancel.log"\necho "CANCELLED by 1000" > "$FAKE_SLURM/state"',
}


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A fake SLURM cluster on PATH; returns its folder (``id``: the next job's id, ``state``: its state)."""
    import os
    import uuid

    home = tmp_path / "slurm"
    (home / "bin").mkdir(parents=True)
    for name, body in FAKE.items():
        exe = home / "bin" / name
        exe.write_text("#!/bin/sh\n" + body + "\n")
        exe.chmod(0o755)
    # submitit's state watcher is shared by the whole process: a fresh id per test, never one it cached
    (home / "id").write_text(str(uuid.uuid4().int % 10**9))
    (home / "state").write_text("PENDING")
    monkeypatch.setenv("FAKE_SLURM", str(home))
    monkeypatch.setenv("PATH", f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return home


def _slurm_launch(store, slurm):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=3)
    run = launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, backend="slurm")
    assert run.host == f"slurm:{(slurm / 'id').read_text()}" and run.status == "queued"
    return run


def test_cancelling_a_slurm_job_still_pending_cancels_it_on_the_cluster_and_frees_the_users_slot(store, slurm):
    """A pending job never runs the worker that would read the cancel request: scancel it, then settle it."""
    from wsviz.training.jobs import cancel

    run = _slurm_launch(store, slurm)
    store.reconcile()
    assert store.get(run.id).status == "queued"  # sacct says PENDING: it may still start
    run = cancel(store, run.id)
    assert (slurm / "scancel.log").read_text().split() == [(slurm / "id").read_text()]
    assert run.status == "cancelled" and not run.active
    from wsviz.training.quotas import Quotas, check_active

    check_active(store, run.user, Quotas(max_active=1))  # the user's one run slot is free again: no refusal


def test_a_slurm_job_that_ended_without_its_run_saying_so_is_marked_failed_naming_the_job(store, slurm):
    run = _slurm_launch(store, slurm)
    (slurm / "state").write_text("NODE_FAIL")
    assert store.reconcile() == [run.id]
    run = store.get(run.id)
    job = (slurm / "id").read_text()
    assert run.status == "failed"
    assert f"SLURM job {job}" in run.reason and "NODE_FAIL" in run.reason and "submitit" in run.reason


def test_a_slurm_job_whose_state_cannot_be_read_is_left_as_it_is(store, slurm):
    """No sacct answer (a login node without accounting): nothing is known, so nothing is settled."""
    run = _slurm_launch(store, slurm)
    (slurm / "bin" / "sacct").write_text("#!/bin/sh\necho 'sacct: error: accounting storage is disabled' >&2\nexit 1\n")
    (slurm / "state").write_text("FAILED")
    assert store.reconcile() == []
    assert store.get(run.id).status == "queued"


def test_a_refused_slurm_submission_says_why_and_holds_no_slot(store, slurm):
    from wsviz.errors import WsvizError

    (slurm / "refuse").write_text("sbatch: error: invalid partition specified: gpu")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=3)
    with pytest.raises(WsvizError, match="invalid partition specified"):
        launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, backend="slurm")
    (run,) = store.list()
    assert run.status == "failed" and "invalid partition" in run.reason


def test_a_slurm_job_script_drops_the_access_tokens_sbatch_would_hand_it(store, slurm, monkeypatch):
    """sbatch exports the server's environment to the job: its script unsets the tokens before srun."""
    monkeypatch.setenv("WSVIZ_TOKEN", "secret-trainer-token")
    monkeypatch.setenv("WSVIZ_SLURM", '{"slurm_setup": ["module load cuda"]}')
    run = _slurm_launch(store, slurm)
    (script,) = (Path(run.out_dir) / "submitit").glob("*_submission.sh")
    lines = script.read_text().splitlines()
    unset = lines.index("unset WSVIZ_TOKEN WSVIZ_VIEWER_TOKEN")
    assert unset < lines.index("module load cuda") < next(i for i, x in enumerate(lines) if x.startswith("srun"))
    assert "secret-trainer-token" not in script.read_text()
