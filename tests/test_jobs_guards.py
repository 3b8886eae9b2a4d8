"""Runs are only ever stopped, counted and admitted for what they are (review of the training jobs):
cancel signals a run's own process only, a quota holds when launches arrive together, and a finished
run is not "cancelled" after the fact."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

import wsviz.training.jobs as jobs
import wsviz.training.quotas as quotas_mod
from wsviz.auth import Actor
from wsviz.errors import WsvizError
from wsviz.training.loop import TrainConfig
from wsviz.training.quotas import Quotas
from wsviz.training.runstore import RunStore

CFG = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=1)
SPEC = {"model": "resnet_digits", "dataset": "mnist5k", "train_config": CFG.to_dict(), "overrides": {},
        "data_root": None, "device": None, "data_seed": 0}
ALICE = Actor("alice", "trainer")


def test_cancel_never_signals_a_process_that_reused_the_runs_pid(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create("resnet_digits", "mnist5k", SPEC, user="alice", role="trainer")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # the run's process died and the OS gave its pid to another process: the start time differs
        store.claim_slot(run.id, 4, stranger.pid, "cpu")
        with store._connect() as con:
            con.execute("UPDATE runs SET pid_start='123.0' WHERE id=?", (run.id,))
        after = jobs.cancel(store, run.id, actor=ALICE)
        time.sleep(0.3)
        assert stranger.poll() is None  # still running: never signalled
        assert after.status in ("cancelled", "failed")  # the dead run is settled, not left "running"
    finally:
        stranger.kill()
        stranger.wait()


def test_cancelling_a_finished_run_is_refused_and_records_nothing(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create("resnet_digits", "mnist5k", SPEC, user="alice", role="trainer")
    store.finish(run.id, "done", "finished", 0.9)
    with pytest.raises(WsvizError, match="is done: only a queued or running run can be cancelled"):
        jobs.cancel(store, run.id, actor=ALICE)
    assert [a["action"] for a in store.audit_trail(run.id)] == ["launched"]
    assert not store.get(run.id).cancel_requested


def test_the_runs_quota_holds_when_launches_arrive_together(tmp_path, monkeypatch):
    """Four launches at once against a limit of one run: exactly one is admitted (the count and the new
    run's row are one transaction). The usage count is slowed to widen the window a race needs."""
    store = RunStore(tmp_path / "runs")
    real_usage = quotas_mod.usage

    def slow_usage(*a, **kw):
        use = real_usage(*a, **kw)
        time.sleep(0.3)
        return use

    monkeypatch.setattr(quotas_mod, "usage", slow_usage)
    monkeypatch.setattr(jobs, "_start", lambda store, run, *a, **kw: run)  # no training process
    barrier, results = threading.Barrier(4), []

    def go(i):
        barrier.wait()
        try:
            jobs.launch(RunStore(tmp_path / "runs"), "resnet_digits", "mnist5k", CFG, actor=ALICE,
                        quotas=Quotas(max_active=1), name=f"race{i}")
            results.append("ok")
        except WsvizError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results.count("ok") == 1, results
    assert all("the limit is 1" in r for r in results if r != "ok")
    assert len(store.list()) == 1
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 1  # refused launches leave no folder


def test_a_dataset_missing_from_this_machine_is_refused_at_launch_in_the_pages_words(tmp_path, monkeypatch):
    """CIFAR-10 not on the machine used to queue a run that failed seconds later, advising CLI flags
    (--data-root, --download) the Train page does not have. Now the launch is refused, nothing recorded."""
    monkeypatch.setattr(jobs, "_start", lambda store, run, *a, **kw: run)
    store = RunStore(tmp_path / "runs")
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(WsvizError) as err:
        jobs.launch(store, "resnet_digits", "cifar10", CFG, actor=ALICE, data_root=str(empty))
    said = str(err.value)
    assert "cifar10" in said and str(empty) in said and "--" not in said and "download=True" not in said
    assert store.list() == []
    jobs.launch(store, "resnet_digits", "mnist5k", CFG, actor=ALICE)  # an embedded set is always there


def test_a_run_that_used_its_wall_time_is_not_requeued_by_resume(tmp_path, monkeypatch):
    """The Resume button on a run stopped at WSVIZ_QUOTA_HOURS: refused before it is queued again (it
    was requeued, then failed in its worker), the run left as it was."""
    from wsviz.training.state import save_state, state_path

    monkeypatch.setattr(jobs, "_start", lambda store, run, *a, **kw: run)
    store = RunStore(tmp_path / "runs")
    run = store.create("resnet_digits", "mnist5k", {**SPEC, "max_seconds": 36.0}, user="alice", role="trainer")
    store.finish(run.id, "failed", "stopped: wall-time limit")
    save_state(state_path(tmp_path / "runs" / run.id / "checkpoint"), {"epoch": 2, "wall_seconds": 40.0})
    with pytest.raises(WsvizError, match=r"used its 0\.01 h allowance"):
        jobs.resume(store, run.id, actor=ALICE)
    assert store.get(run.id).status == "failed"
    assert [a["action"] for a in store.audit_trail(run.id)] == ["launched"]
    save_state(state_path(tmp_path / "runs" / run.id / "checkpoint"), {"epoch": 2, "wall_seconds": 20.0})
    assert jobs.resume(store, run.id, actor=ALICE).status == "queued"  # time left: resumed


def test_the_write_lock_is_held_for_the_run_count_only_not_for_measuring_disk_use(tmp_path, monkeypatch):
    """The quota check inside the transaction summed every run folder's size while holding the store's write
    lock (live-loss logging, claim_slot and finish waited; past 30 s they fail). Disk use is measured before."""
    store = RunStore(tmp_path / "runs")
    monkeypatch.setattr(jobs, "_start", lambda store, run, *a, **kw: run)
    in_lock = []
    real_create = RunStore.create

    def create(self, *a, admit=None, **kw):
        def spy():
            in_lock.append(True)
            return admit()
        return real_create(self, *a, admit=spy if admit else None, **kw)

    sizes = []
    real_bytes = quotas_mod.folder_bytes
    monkeypatch.setattr(RunStore, "create", create)
    monkeypatch.setattr(quotas_mod, "folder_bytes", lambda f: sizes.append(bool(in_lock)) or real_bytes(f))
    store.create("resnet_digits", "mnist5k", SPEC, user="alice", role="trainer")
    jobs.launch(store, "resnet_digits", "mnist5k", CFG, actor=ALICE, quotas=Quotas(max_active=5, max_disk_gb=1.0))
    assert in_lock and sizes and not any(sizes)  # measured, but never while the lock was held


def test_a_cluster_launch_does_not_check_the_web_servers_disk_for_the_data(tmp_path, monkeypatch):
    """The cluster's nodes read their own data roots: the server's copy (or its absence) says nothing."""
    monkeypatch.setattr(jobs, "_start", lambda store, run, *a, **kw: run)
    monkeypatch.setattr(jobs, "_backend", lambda b: "slurm")
    store = RunStore(tmp_path / "runs")
    run = jobs.launch(store, "resnet_digits", "cifar10", CFG, actor=ALICE, data_root=str(tmp_path / "empty"),
                      backend="slurm")
    assert run.status == "queued"
