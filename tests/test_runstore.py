"""The run store on its own, in a temporary folder and without training: what it records, the
queue's rules, reconciling dead runs, rebuilding from folders written by hand, and damaged or
unwritable databases. Every expected value is written out here. Fast: SQLite files only."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import damage, read_only

from wsviz import WsvizError
from wsviz.training import runstore as rs
from wsviz.training.runstore import (
    HOST,
    RESTORED,
    FolderRun,
    RebuildReport,
    Recovery,
    Run,
    RunStore,
    RunStoreDamaged,
    RunStoreError,
    RunStoreUnavailable,
    damaged_copies,
    finished_runs,
    pid_alive,
    process_start_time,
    read_run_folder,
    safe_run_name,
    scan_run_folders,
)

DEAD = "the training process died without finishing (killed, out of memory, or crashed); the last epoch's " \
       "checkpoint, if any, is kept"


def sql(store: RunStore, query: str, *args) -> list[tuple]:
    """A statement run straight on the database (to set up states the API makes over time)."""
    con = sqlite3.connect(store.db_path)
    try:
        rows = con.execute(query, args).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def card(**kw) -> dict:
    base = {"model": "resnet_digits", "dataset": "mnist5k", "config": {"depth": 8}, "train_config": {"epochs": 2},
            "data_seed": 3, "device": "cpu", "test_accuracy": 0.75, "complete": True, "epochs": 2, "epochs_done": 2,
            "metrics": [{"epoch": 1, "train_loss": 1.5, "test_acc": 0.5, "seconds": 9.0},
                        {"epoch": 2, "train_loss": 0.5, "test_acc": 0.75, "seconds": 8.0}]}
    base.update(kw)
    return base


def run_folder(root: Path, run_id: str, meta: dict | None = None, ck: dict | str | None = None,
               log: bool = False) -> Path:
    d = root / run_id
    d.mkdir(parents=True)
    if meta is not None:
        (d / "run.json").write_text(json.dumps(meta))
    if ck is not None:
        (d / "checkpoint").mkdir()
        (d / "checkpoint" / "card.json").write_text(ck if isinstance(ck, str) else json.dumps(ck))
    if log:
        (d / "log.txt").write_text("epoch 1\n")
    return d


# ------------------------------------------------------------------------- small helpers
def test_sqlite_error_kinds():
    def err(code: int | None, text: str = "x", cls=sqlite3.DatabaseError):
        e = cls(text)
        if code is not None:
            e.sqlite_errorcode = code
        return e

    assert rs._sqlite_code(err(11 | 0x200)) == 11 and rs._sqlite_code(err(None)) is None
    assert rs._sqlite_code(err(0x10A)) == 10
    for code, damaged, unwritable in [(11, True, False), (26, True, False), (3, False, True), (8, False, True),
                                     (14, False, True), (1, False, False), (5, False, False)]:
        assert rs._is_damage(err(code | 0x100)) is damaged and rs._is_unwritable(err(code | 0x100)) is unwritable
    assert rs._is_damage(err(None, "File is Not A Database")) and rs._is_damage(err(None, "disk image is MALFORMED"))
    assert not rs._is_damage(err(None, "database is locked"))
    assert not rs._is_damage(err(1, "not a database"))  # the code decides when there is one
    assert not rs._is_damage(ValueError("not a database")) and not rs._is_unwritable(OSError(8, "x"))
    assert rs._is_damage(err(None, "malformed", sqlite3.OperationalError))
    assert rs._is_unwritable(err(8, cls=sqlite3.OperationalError)) and not rs._is_unwritable(err(None))


def test_safe_run_name():
    for ok in ("a", "A-1_b.c", "9" * 64, "x.y"):
        assert safe_run_name(ok) == ok
    for bad in ("", "-a", ".a", "_a", "a b", "a/b", "a..b", "9" * 65, None, 5, "é"):
        with pytest.raises(WsvizError) as e:
            safe_run_name(bad)
        assert str(e.value) == (f"Run name {bad!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit.")


def test_process_start_time_and_liveness():
    me = os.getpid()
    start = process_start_time(me)
    assert start == repr(psutil.Process(me).create_time())
    gone = dead_pid()
    assert process_start_time(gone) is None and process_start_time(-1) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    assert process_start_time(zombie.pid) is None  # exited, not yet reaped
    zombie.wait()
    assert pid_alive(me, start) and pid_alive(me, None)
    assert not pid_alive(me, "1.0") and not pid_alive(None, None) and not pid_alive(0, None)
    assert not pid_alive(gone, None)


def test_small_records():
    assert [Run("i", "n", "m", "d", {}, s, None, None, None, "o", 0.0, None, None, None, False).active
            for s in rs.STATUSES] == [True, True, False, False, False]
    assert RebuildReport().summary() == "0 run(s) restored from their folders, 0 updated"
    three = RebuildReport(["a"], ["b", "c"], {"x": "bad", "y": "worse", "z": "no"})
    assert three.summary() == "1 run(s) restored from their folders, 2 updated, 3 folder(s) skipped (x: bad; y: worse; z: no)"
    four = RebuildReport([], [], {"w": "1", "x": "2", "y": "3", "z": "4"})
    assert four.summary() == "0 run(s) restored from their folders, 0 updated, 4 folder(s) skipped (w: 1; x: 2; y: 3 ...)"
    rec = Recovery(Path("/r/wsviz.db"), Path("/r/wsviz.db.damaged-1"), "boom", RebuildReport(["a"]))
    assert rec.message() == ("The run store /r/wsviz.db was damaged (boom). It was moved aside to /r/wsviz.db.damaged-1 "
                             "(nothing was deleted) and rebuilt from the run folders: 1 run(s) restored from their "
                             "folders, 0 updated. Delete the damaged copy once you no longer need it.")
    assert rs._number(3) == 3.0 and type(rs._number(3)) is float and rs._number(2.5) == 2.5
    assert rs._number(True) is None and rs._number("1") is None and rs._number(None) is None
    assert rs._id_time("20240102-030405-abcdef") == time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1))
    assert rs._id_time("nope") == 0.0
    assert rs.default_root() == Path(os.environ.get("WSVIZ_RUNS", "runs"))


def test_default_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("WSVIZ_RUNS", "/some/where")
    assert rs.default_root() == Path("/some/where")
    monkeypatch.delenv("WSVIZ_RUNS")
    assert rs.default_root() == Path("runs")


# ------------------------------------------------------------------------------- records
def test_create_get_list(tmp_path):
    store = RunStore(tmp_path / "runs")
    assert store.root == (tmp_path / "runs").resolve() and store.db_path == store.root / "wsviz.db"
    assert store.recovery is None and store.list() == []
    t0 = time.time()
    a = store.create("resnet_digits", "mnist5k", {"k": [1, 2]}, user="ann", role="admin")
    b = store.create("m" * 40, "d" * 40, {})
    c = store.create("x", "y", {}, name="my-run")
    assert rs._RUN_ID_RE.fullmatch(a.id) and a.id[:8] == time.strftime("%Y%m%d")
    assert (a.name, a.model, a.dataset, a.spec, a.status, a.reason, a.pid, a.device) == (
        "resnet_digits-mnist5k", "resnet_digits", "mnist5k", {"k": [1, 2]}, "queued", None, None, None)
    assert (a.started, a.finished, a.test_accuracy, a.cancel_requested, a.slot, a.host, a.user) == (
        None, None, None, False, None, None, "ann")
    assert t0 <= a.created <= time.time() and a.out_dir == str(store.root / a.id)
    assert b.name == ("m" * 40 + "-" + "d" * 40)[:64] and b.user is None and c.name == "my-run"
    meta = json.loads((Path(a.out_dir) / "run.json").read_text())
    assert meta == {"id": a.id, "name": a.name, "model": "resnet_digits", "dataset": "mnist5k", "spec": {"k": [1, 2]},
                    "created": a.created, "user": "ann"}
    assert (Path(a.out_dir) / "run.json").read_text() == json.dumps(meta, indent=1)  # indented: read by people too
    assert not list(Path(a.out_dir).glob(".*.tmp"))
    assert [r.id for r in store.list()] == [c.id, b.id, a.id]  # newest first
    store.finish(b.id, "done")
    assert [r.id for r in store.list("done")] == [b.id] and [r.id for r in store.list("queued")] == [c.id, a.id]
    assert store.get(a.id) == a
    trail = store.audit_trail()
    assert trail == [{"run_id": a.id, "action": "launched", "user": "ann", "role": "admin", "time": a.created}]
    with pytest.raises(WsvizError) as e:
        store.get("nope")
    assert str(e.value) == f"No run 'nope' in {store.db_path}."
    with pytest.raises(WsvizError, match="is not allowed"):
        store.create("x", "y", {}, name="../up")


def test_run_dir_stays_in_the_runs_folder(tmp_path):
    store = RunStore(tmp_path / "runs")
    assert store.run_dir("20240102-030405-abcdef") == store.root / "20240102-030405-abcdef"
    for bad in ("", None, 5, "a\x00b"):
        with pytest.raises(WsvizError) as e:
            store.run_dir(bad)
        assert str(e.value) == f"Run id {bad!r} would leave the runs folder (it is not a run id)."
    for bad in ("..", "../x", "a/b", "/etc", "."):
        with pytest.raises(WsvizError) as e:
            store.run_dir(bad)
        assert str(e.value) == f"Run id {bad!r} would leave the runs folder."


def test_metrics_finish_cancel_audit(tmp_path):
    store = RunStore(tmp_path / "runs")
    a = store.create("m", "d", {})
    other = store.create("m", "d", {})
    store.log_metrics(a.id, 1, {"loss": 2, "acc": 0.5})
    store.log_metrics(a.id, 2, {"loss": 1.0}, step=7)
    store.log_metrics(other.id, 1, {"loss": 9.0})
    assert store.metrics(a.id) == {"loss": [(1, None, 2.0), (2, 7, 1.0)], "acc": [(1, None, 0.5)]}
    assert store.metrics("none") == {}
    for bad in ("queued", "running", "nope"):
        with pytest.raises(ValueError) as e:
            store.finish(a.id, bad)
        assert str(e.value) == f"not a final status: {bad}"
    assert store.request_cancel(a.id).cancel_requested and not store.get(other.id).cancel_requested
    t0 = time.time()
    store.finish(a.id, "done", test_accuracy=0.9)
    run = store.get(a.id)
    assert (run.status, run.reason, run.test_accuracy) == ("done", None, 0.9) and t0 <= run.finished <= time.time()
    store.finish(a.id, "failed", "late")  # a finished run stays as it ended
    assert store.get(a.id).status == "done"
    store.finish(other.id, "failed", "why")
    assert (store.get(other.id).status, store.get(other.id).reason, store.get(other.id).test_accuracy) == (
        "failed", "why", None)
    sql(store, "UPDATE runs SET status='running', test_accuracy=0.3 WHERE id=?", other.id)
    store.finish(other.id, "cancelled")
    assert store.get(other.id).test_accuracy == 0.3  # no accuracy given: the known one stays
    store.audit(a.id, "cancelled", "bob")
    store.audit(other.id, "resumed", "cy", "user")
    assert [(t["run_id"], t["action"], t["user"], t["role"]) for t in store.audit_trail()] == [
        (a.id, "cancelled", "bob", None), (other.id, "resumed", "cy", "user")]
    assert [t["action"] for t in store.audit_trail(other.id)] == ["resumed"]
    sql(store, "UPDATE audit SET time=0 WHERE action='resumed'")
    assert [t["action"] for t in store.audit_trail()] == ["resumed", "cancelled"]  # by time


def test_requeue(tmp_path):
    store = RunStore(tmp_path / "runs")
    a = store.create("m", "d", {})
    with pytest.raises(WsvizError) as e:
        store.requeue(a.id, 0)
    assert str(e.value) == f"Run {a.id} is queued: only a failed or cancelled run can be resumed."
    with pytest.raises(WsvizError) as e:
        store.requeue("nope", 0)
    assert str(e.value) == f"No run 'nope' in {store.db_path}."
    store.claim_slot(a.id, 1, os.getpid(), "cpu")
    store.request_cancel(a.id)
    for epoch in (1, 2, 3):
        store.log_metrics(a.id, epoch, {"loss": float(epoch)})
    store.finish(a.id, "failed", "killed")
    t0 = time.time()
    run = store.requeue(a.id, 2)
    assert (run.status, run.reason, run.pid, run.cancel_requested, run.finished, run.slot, run.host) == (
        "queued", None, None, False, None, None, None)
    assert sql(store, "SELECT pid_start FROM runs") == [(None,)]
    assert run.created >= t0 and store.metrics(a.id) == {"loss": [(1, None, 1.0), (2, None, 2.0)]}
    store.finish(a.id, "cancelled")
    assert store.requeue(a.id, 0).status == "queued" and store.metrics(a.id) == {}


# -------------------------------------------------------------------------------- queue
def test_claim_slot_on_the_cpu_first_come_first_served(tmp_path):
    store = RunStore(tmp_path / "runs")
    me = os.getpid()
    a, b, c = (store.create("m", "d", {}) for _ in range(3))
    assert store.claim_slot(c.id, 2, me, "cpu") == "queued"  # a and b were queued before it
    assert store.claim_slot(b.id, 2, me, "cpu") == "running"  # one ahead (a), 2 allowed
    assert store.claim_slot(c.id, 2, me, "cpu") == "queued"  # b runs, a ahead
    assert store.claim_slot(a.id, 2, me, "cpu") == "running"
    assert store.claim_slot(a.id, 2, me, "cpu") == "running"  # already running: said so, nothing changed
    assert store.claim_slot(c.id, 2, me, "cpu") == "queued"  # two running
    assert store.claim_slot(c.id, 3, 1, "cpu") == "running"  # started by (the start time of) process 1
    assert sql(store, "SELECT pid, pid_start FROM runs WHERE id=?", c.id) == [(1, process_start_time(1))]
    run = store.get(a.id)
    assert (run.status, run.pid, run.device, run.slot, run.host) == ("running", me, "cpu", None, HOST)
    assert sql(store, "SELECT pid_start FROM runs WHERE id=?", a.id) == [(process_start_time(me),)]
    assert run.started is not None
    with pytest.raises(WsvizError) as e:
        store.claim_slot("nope", 1, me, "cpu")
    assert str(e.value) == f"No run 'nope' in {store.db_path}."


def test_claim_slot_ties_cancels_and_finished(tmp_path):
    store = RunStore(tmp_path / "runs")
    me = os.getpid()
    a, b = store.create("m", "d", {}), store.create("m", "d", {})
    sql(store, "UPDATE runs SET created=?", time.time())
    first, second = sorted([a.id, b.id])
    assert store.claim_slot(second, 1, me, "cpu") == "queued"  # same time: the smaller id goes first
    store.request_cancel(first)
    assert store.claim_slot(second, 1, me, "cpu") == "running"  # a run being cancelled is not ahead
    assert store.claim_slot(first, 5, me, "cpu") == "cancelled"
    run = store.get(first)
    assert (run.status, run.reason) == ("cancelled", "cancelled while queued") and run.finished is not None
    assert store.claim_slot(first, 5, me, "cpu") == "cancelled"
    store.finish(second, "done")
    assert store.claim_slot(second, 5, me, "cpu") == "done"


def test_claim_slot_gives_each_run_its_own_gpu(tmp_path):
    store = RunStore(tmp_path / "runs")
    me = os.getpid()
    a, b, c, d = (store.create("m", "d", {}) for _ in range(4))
    assert store.claim_slot(b.id, 1, me, "cuda", slots=["3", "5"]) == "running"  # one ahead, two free
    assert store.get(b.id).slot == "5" and store.get(b.id).device == "cuda (GPU 5)"  # the ahead one gets 3
    assert store.claim_slot(c.id, 9, me, "cuda", slots=["3", "5"]) == "queued"  # one free, one ahead
    assert store.claim_slot(a.id, 1, me, "cuda", slots=["3", "5"]) == "running"
    assert store.get(a.id).slot == "3" and store.get(a.id).device == "cuda (GPU 3)"
    assert store.claim_slot(c.id, 9, me, "cuda", slots=["3", "5"]) == "queued"
    store.finish(a.id, "done")
    assert store.claim_slot(d.id, 9, me, "cuda", slots=["3", "5"]) == "queued"  # c is ahead
    assert store.claim_slot(c.id, 9, me, "cuda", slots=["3", "5"]) == "running"
    assert store.get(c.id).slot == "3"
    assert store.claim_slot(d.id, 1, me, "cuda", slots=["3", "5", "7"]) == "running"
    assert store.get(d.id).slot == "7"


def test_claim_slot_frees_the_slots_of_dead_runs_first(tmp_path):
    store = RunStore(tmp_path / "runs")
    a, b = store.create("m", "d", {}), store.create("m", "d", {})
    assert store.claim_slot(a.id, 1, os.getpid(), "cpu") == "running"
    assert store.claim_slot(b.id, 1, os.getpid(), "cpu") == "queued"
    sql(store, "UPDATE runs SET pid_start='1.0' WHERE id=?", a.id)  # its process is gone (the pid was reused)
    assert store.claim_slot(b.id, 1, os.getpid(), "cpu") == "running"
    assert store.get(a.id).status == "failed"


def test_set_pid(tmp_path):
    store = RunStore(tmp_path / "runs")
    a = store.create("m", "d", {})
    store.set_pid(a.id, 1)  # another live process than this one (started before it)
    assert (store.get(a.id).pid, store.get(a.id).host) == (1, HOST)
    assert sql(store, "SELECT pid_start FROM runs") == [(process_start_time(1),)]
    assert process_start_time(1) != process_start_time(os.getpid())
    store.set_pid(a.id, None, host="node7")
    assert (store.get(a.id).pid, store.get(a.id).host) == (None, "node7")
    assert sql(store, "SELECT pid_start FROM runs") == [(None,)]


# ---------------------------------------------------------------------------- reconcile
def test_reconcile_marks_dead_runs_and_leaves_live_and_remote_ones(tmp_path):
    store = RunStore(tmp_path / "runs")
    me = os.getpid()
    live, dead, remote, cancelled, young, old, nohost, done = (store.create("m", "d", {}) for _ in range(8))
    for r in (live, dead, remote, cancelled):
        assert store.claim_slot(r.id, 9, me, "cpu") == "running"
    sql(store, "UPDATE runs SET pid_start='1.0' WHERE id IN (?, ?, ?)", dead.id, remote.id, cancelled.id)
    sql(store, "UPDATE runs SET host='node7' WHERE id=?", remote.id)
    store.request_cancel(cancelled.id)
    sql(store, "UPDATE runs SET created=? WHERE id=?", time.time() - 61, old.id)
    sql(store, "UPDATE runs SET created=? WHERE id=?", time.time() - 55, young.id)
    sql(store, "UPDATE runs SET status='running', pid=?, host=NULL WHERE id=?", dead_pid(), nohost.id)
    store.finish(done.id, "done")
    sql(store, "UPDATE runs SET pid_start='1.0', pid=? WHERE id=?", me, done.id)
    partial = Path(dead.out_dir) / "checkpoint"
    partial.mkdir()
    (partial / ".weights.safetensors.ab12.tmp").write_text("half")
    (partial / ".keep.tmp").mkdir()  # a folder, not a temporary file
    (partial / "card.json").write_text("{}")
    (Path(dead.out_dir) / ".run.json.cd34.tmp").symlink_to(partial / "card.json")
    (Path(live.out_dir) / ".x.tmp").write_text("live")
    t0 = time.time()
    assert sorted(store.reconcile()) == sorted([dead.id, cancelled.id, old.id, nohost.id])
    status = {r.id: (r.status, r.reason) for r in store.list()}
    assert status == {live.id: ("running", None), dead.id: ("failed", DEAD), remote.id: ("running", None),
                      cancelled.id: ("cancelled", "cancelled"), young.id: ("queued", None), old.id: ("failed", DEAD),
                      nohost.id: ("failed", DEAD), done.id: ("done", None)}
    assert t0 <= store.get(dead.id).finished <= time.time() and t0 <= store.get(cancelled.id).finished
    assert sorted(p.name for p in Path(dead.out_dir).rglob("*")) == [".keep.tmp", ".run.json.cd34.tmp", "card.json",
                                                                       "checkpoint", "run.json"]
    assert (Path(live.out_dir) / ".x.tmp").exists()
    assert store.reconcile() == []


def test_partial_files_of_a_run_outside_the_folder_are_not_touched(tmp_path):
    store = RunStore(tmp_path / "runs")
    (tmp_path / ".outside.tmp").write_text("x")
    store._remove_partial_files("../")  # not a run id: nothing is removed, nothing raised
    assert (tmp_path / ".outside.tmp").exists()


# ------------------------------------------------------------------------ run folders
def test_read_run_folder_of_a_finished_run(tmp_path):
    d = run_folder(tmp_path, "20240102-030405-abcdef",
                   {"id": "x", "name": "good-name", "model": "m0", "dataset": "d0", "spec": {"a": 1}, "created": 7.5,
                    "user": "ann"}, card())
    fr = read_run_folder(d)
    mtime = (d / "checkpoint" / "card.json").stat().st_mtime
    assert fr == FolderRun("20240102-030405-abcdef", "good-name", "resnet_digits", "mnist5k", {"a": 1}, "done", None,
                           str(d.resolve()), 7.5, mtime, 0.75, "cpu",
                           [(1, "train_loss", 1.5), (1, "test_acc", 0.5), (2, "train_loss", 0.5), (2, "test_acc", 0.75)],
                           "ann")


def test_read_run_folder_from_the_card_alone(tmp_path):
    c = card(complete=False, epochs=5, epochs_done=1, test_accuracy=None, device=3,
             metrics=[{"epoch": 1, "loss": 2, "flag": True, "note": "x"}, {"epoch": "1"}, "junk", {"loss": 1}])
    d = run_folder(tmp_path, "20240102-030405-abcdef", None, c)
    fr = read_run_folder(d)
    assert (fr.name, fr.model, fr.dataset, fr.status, fr.test_accuracy, fr.device, fr.user) == (
        "resnet_digits-mnist5k", "resnet_digits", "mnist5k", "failed", None, None, None)
    assert fr.spec == {"model": "resnet_digits", "dataset": "mnist5k", "train_config": {"epochs": 2},
                       "config": {"depth": 8}, "data_seed": 3, "restored_from_card": True}
    assert fr.reason == (f"{RESTORED}; its checkpoint holds 1 of 5 epochs (it was stopped, or its training was still "
                         "running and is no longer tracked)")
    assert fr.metrics == [(1, "loss", 2.0)] and type(fr.metrics[0][2]) is float
    assert fr.created == rs._id_time("20240102-030405-abcdef")
    bare = run_folder(tmp_path, "20240102-030406-abcdef", None, {"model": "m", "dataset": "d"})
    fr = read_run_folder(bare)
    assert fr.spec == {"model": "m", "dataset": "d", "train_config": {}, "config": {}, "data_seed": 0,
                       "restored_from_card": True}
    assert fr.status == "failed" and "holds None of None epochs" in fr.reason and fr.metrics == []


def test_read_run_folder_without_a_checkpoint(tmp_path):
    meta = {"name": "bad name!", "model": "m", "dataset": "d", "spec": [1], "created": True, "user": 5}
    d = run_folder(tmp_path, "20240102-030405-abcdef", meta, log=True)
    fr = read_run_folder(d)
    assert (fr.name, fr.status, fr.test_accuracy, fr.device, fr.user, fr.metrics) == ("m-d", "failed", None, None,
                                                                                     None, [])
    assert fr.spec == {"model": "m", "dataset": "d", "train_config": {}, "config": {}, "data_seed": 0,
                       "restored_from_card": True}
    assert fr.reason == f"{RESTORED}; it has no checkpoint (it ended before its first epoch finished)"
    assert fr.finished == (d / "log.txt").stat().st_mtime and fr.created == rs._id_time(d.name)
    nolog = run_folder(tmp_path, "20240102-030406-abcdef", {"model": "m", "dataset": "d", "name": None})
    fr = read_run_folder(nolog)
    assert fr.finished is None and fr.name == "m-d"
    long = run_folder(tmp_path, "20240102-030407-abcdef", {"model": "m" * 50, "dataset": "d" * 50})
    assert read_run_folder(long).name == ("m" * 50 + "-" + "d" * 50)[:64]


def test_read_run_folder_with_a_broken_card_or_record(tmp_path):
    meta = {"model": "m", "dataset": "d"}
    d = run_folder(tmp_path, "20240102-030405-abcdef", meta, "{not json")
    fr = read_run_folder(d)
    assert fr.status == "failed" and fr.reason.startswith(f"{RESTORED}; its checkpoint cannot be used: The model card ")
    assert "is not valid JSON" in fr.reason and fr.finished is None and fr.model == "m"
    only_card = run_folder(tmp_path, "20240102-030406-abcdef", None, "[1]")
    with pytest.raises(WsvizError, match=r"holds a JSON array"):
        read_run_folder(only_card)
    broken_meta = run_folder(tmp_path, "20240102-030407-abcdef", None, card())
    (broken_meta / "run.json").write_text("{broken")
    assert read_run_folder(broken_meta).model == "resnet_digits"  # the card still says enough
    (broken_meta / "run.json").write_text("[1, 2]")
    assert read_run_folder(broken_meta).name == "resnet_digits-mnist5k"
    nothing = run_folder(tmp_path, "20240102-030408-abcdef", None)
    (nothing / "run.json").write_text("{broken")
    with pytest.raises(WsvizError) as e:
        read_run_folder(nothing)
    assert str(e.value).startswith(f"{nothing / 'run.json'} cannot be read (") and str(e.value).endswith(
        ") and there is no checkpoint")
    empty = run_folder(tmp_path, "20240102-030409-abcdef", {"model": "m", "dataset": 5})
    with pytest.raises(WsvizError) as e:
        read_run_folder(empty)
    assert str(e.value) == f"{empty} names no model and dataset (its run.json and card are missing or empty)"
    no_dataset = run_folder(tmp_path, "20240102-030410-abcdef", {"model": "m"})
    with pytest.raises(WsvizError, match="names no model and dataset"):
        read_run_folder(no_dataset)


def test_scan_run_folders_takes_only_run_folders_oldest_first(tmp_path):
    run_folder(tmp_path, "20240102-030405-bbbbbb", {"model": "m", "dataset": "d", "created": 30.0})
    run_folder(tmp_path, "20240102-030405-aaaaaa", {"model": "m", "dataset": "d", "created": 30.0})
    run_folder(tmp_path, "20240102-030409-cccccc", {"model": "m", "dataset": "d", "created": 10.0})
    run_folder(tmp_path, "20240102-030410-dddddd", None, card())
    run_folder(tmp_path, "20240102-030411-eeeeee", {"model": 1, "dataset": "d"})
    run_folder(tmp_path, "20240102-030412-ffffff")  # neither record nor card
    run_folder(tmp_path, "not-a-run-id", {"model": "m", "dataset": "d"})
    run_folder(tmp_path, "20240102-030413-ABCDEF", {"model": "m", "dataset": "d"})
    (tmp_path / "20240102-030414-aaaaaa").write_text("a file")
    (tmp_path / "20240102-030415-aaaaaa").symlink_to(tmp_path / "20240102-030409-cccccc")
    found, skipped = scan_run_folders(tmp_path)
    assert [r.id for r in found] == ["20240102-030409-cccccc", "20240102-030405-aaaaaa", "20240102-030405-bbbbbb",
                                     "20240102-030410-dddddd"]
    assert skipped == {"20240102-030411-eeeeee": f"{tmp_path / '20240102-030411-eeeeee'} names no model and dataset "
                                                 "(its run.json and card are missing or empty)"}
    assert scan_run_folders(tmp_path / "missing") == ([], {})


def test_damaged_copies(tmp_path):
    for name in ("wsviz.db.damaged-2", "wsviz.db.damaged-1", "wsviz.db.damaged-1-wal", "wsviz.db.damaged-1-shm",
                 "wsviz.db", "other.damaged-1"):
        (tmp_path / name).write_text("x")
    (tmp_path / "wsviz.db.damaged-3").mkdir()
    assert damaged_copies(tmp_path) == [tmp_path / "wsviz.db.damaged-1", tmp_path / "wsviz.db.damaged-2"]
    assert damaged_copies(tmp_path / "missing") == []


# ------------------------------------------------------------------------------- rebuild
def test_a_new_database_is_filled_from_the_folders(tmp_path):
    root = tmp_path / "runs"
    run_folder(root, "20240102-030405-aaaaaa", {"model": "m", "dataset": "d", "name": "one", "spec": {"s": 1},
                                                "created": 5.0, "user": "ann"}, card())
    run_folder(root, "20240102-030406-bbbbbb", {"model": "m", "dataset": "d"}, log=True)
    store = RunStore(root)
    runs = {r.id: r for r in store.list()}
    one = runs["20240102-030405-aaaaaa"]
    assert (one.name, one.model, one.spec, one.status, one.reason, one.test_accuracy, one.created, one.user) == (
        "one", "resnet_digits", {"s": 1}, "done", None, 0.75, 5.0, "ann")
    assert (one.device, one.started, one.out_dir, one.pid) == ("cpu", None, str(root.resolve() / one.id), None)
    assert one.finished == (root / one.id / "checkpoint" / "card.json").stat().st_mtime
    assert store.metrics(one.id) == {"train_loss": [(1, None, 1.5), (2, None, 0.5)],
                                     "test_acc": [(1, None, 0.5), (2, None, 0.75)]}
    assert sql(store, "SELECT DISTINCT time FROM metrics") == [(one.finished,)]
    two = runs["20240102-030406-bbbbbb"]
    assert two.status == "failed" and two.reason.startswith(RESTORED)
    assert store.rebuild().summary() == "0 run(s) restored from their folders, 0 updated"


def test_rebuild_adds_missing_and_completes_unfinished_runs(tmp_path, caplog):
    root = tmp_path / "runs"
    store = RunStore(root)
    kept = store.create("m", "d", {})
    store.finish(kept.id, "failed", "killed")
    unfinished = run_folder(root, "20240102-030405-aaaaaa", None, card(complete=False, metrics=[{"epoch": 1, "l": 1.0}]))
    run_folder(root, "20240102-030406-bbbbbb", {"model": "m", "dataset": "d", "created": 6.0})
    run_folder(root, "20240102-030407-cccccc", {"model": 1})
    with caplog.at_level("INFO", logger="wsviz.training.runstore"):
        report = store.rebuild()
    assert report.added == ["20240102-030406-bbbbbb", "20240102-030405-aaaaaa"] and report.updated == []  # oldest first
    assert list(report.skipped) == ["20240102-030407-cccccc"]
    assert caplog.messages == [f"run store {store.db_path} rebuilt: {report.summary()}"]
    assert store.get(kept.id).reason == "killed"  # a run the store knows is left as it is
    assert store.get("20240102-030406-bbbbbb").created == 6.0
    (unfinished / "checkpoint" / "card.json").write_text(json.dumps(card(device="cuda")))  # its process went on
    caplog.clear()
    with caplog.at_level("INFO", logger="wsviz.training.runstore"):
        report = store.rebuild()
    assert report.added == [] and report.updated == ["20240102-030405-aaaaaa"]
    assert "rebuilt: 0 run(s) restored from their folders, 1 updated" in caplog.text
    run = store.get("20240102-030405-aaaaaa")
    assert (run.status, run.reason, run.test_accuracy, run.device) == ("done", None, 0.75, "cuda")
    assert run.finished == (unfinished / "checkpoint" / "card.json").stat().st_mtime
    assert store.metrics(run.id) == {"train_loss": [(1, None, 1.5), (2, None, 0.5)],
                                     "test_acc": [(1, None, 0.5), (2, None, 0.75)]}
    caplog.clear()
    with caplog.at_level("INFO", logger="wsviz.training.runstore"):
        assert store.rebuild().updated == []  # done now: nothing more to do
    assert "rebuilt" not in caplog.text
    # a failed run that was not restored from its folder is not turned into a done one
    sql(store, "UPDATE runs SET status='failed', reason='killed' WHERE id=?", run.id)
    assert store.rebuild().updated == [] and store.get(run.id).status == "failed"
    sql(store, "UPDATE runs SET status='failed', reason=NULL WHERE id=?", run.id)
    assert store.rebuild().updated == []
    sql(store, "UPDATE runs SET status='cancelled', reason=? WHERE id=?", RESTORED, run.id)
    assert store.rebuild().updated == []


def test_rebuild_of_a_run_without_a_finish_time_dates_its_metrics_by_creation(tmp_path):
    root = tmp_path / "runs"
    d = run_folder(root, "20240102-030405-aaaaaa", {"model": "m", "dataset": "d", "created": 4.0}, card())
    os.utime(d / "checkpoint" / "card.json", (0, 0))  # mtime 0: no finish time to date them by
    store = RunStore(root)
    assert sql(store, "SELECT DISTINCT time FROM metrics") == [(4.0,)]


# ------------------------------------------------------------------------- the database
def test_an_older_database_gains_the_new_columns(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    con = sqlite3.connect(root / "wsviz.db")
    con.executescript(rs._SCHEMA.replace("test_accuracy REAL\n", "test_accuracy REAL, host TEXT\n"))
    con.execute("INSERT INTO runs (id, name, model, dataset, spec, status, out_dir, created, host) "
                "VALUES ('r', 'n', 'm', 'd', '{}', 'done', '/x', 1.0, 'h')")
    con.commit()
    con.close()
    store = RunStore(root)
    cols = [r[1] for r in sql(store, "PRAGMA table_info(runs)")]
    assert cols[-3:] == ["host", "slot", "user"] and cols.count("host") == 1
    run = store.get("r")
    assert (run.host, run.slot, run.user, run.status) == ("h", None, None, "done")
    assert sql(store, "PRAGMA journal_mode") == [("wal",)]


def test_a_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStoreUnavailable) as e:
        RunStore(tmp_path / "file" / "runs")
    assert str(e.value) == (f"The runs folder {(tmp_path / 'file' / 'runs').resolve()} cannot be created (Not a "
                            "directory): set WSVIZ_RUNS to a folder you can write, or fix the permissions of its parent.")
    assert isinstance(e.value, RunStoreError) and e.value.exit_code == 1


def test_a_store_whose_folder_went_away(tmp_path):
    store = RunStore(tmp_path / "runs")
    shutil.rmtree(tmp_path / "runs")
    with pytest.raises(RunStoreUnavailable) as e:
        store.list()
    assert str(e.value) == (f"The run store {store.db_path} cannot be opened for writing (unable to open database "
                            f"file): make {store.root} writable, or set WSVIZ_RUNS to a folder you can write. Training "
                            "needs it; shipped checkpoints and finished runs work without it.")


def test_an_error_inside_a_transaction_rolls_it_back(tmp_path):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(KeyError):
        with store._connect() as con:
            con.execute("INSERT INTO audit (run_id, action, user, time) VALUES ('r', 'a', 'u', 1)")
            raise KeyError("x")
    assert store.audit_trail() == []
    with pytest.raises(sqlite3.IntegrityError):  # neither damage nor permissions: raised as it is
        with store._connect() as con:
            con.execute("INSERT INTO audit (run_id, action, user, time) VALUES ('r', 'a', NULL, 1)")
    with store._connect(immediate=True) as con:
        con.execute("INSERT INTO audit (run_id, action, user, time) VALUES ('r', 'a', 'u', 1)")
    assert len(store.audit_trail()) == 1


def test_damage_found_while_in_use_is_reported(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.db_path.write_bytes(b"this is not a database at all\n" * 200)
    with pytest.raises(RunStoreDamaged) as e:
        store.list()
    assert str(e.value) == (f"The run store {store.db_path} is damaged (file is not a database). Run `python -m wsviz "
                            "runs rebuild` (or reload the app) to move it aside and rebuild it from the run folders; "
                            "shipped checkpoints work meanwhile.")


def filled(root: Path) -> RunStore:
    store = RunStore(root)
    for i in range(3):
        r = store.create("m", "d", {"i": i}, name=f"r{i}")
        (Path(r.out_dir) / "checkpoint").mkdir()
        (Path(r.out_dir) / "checkpoint" / "card.json").write_text(json.dumps(card()))
        store.log_metrics(r.id, 1, {"loss": float(i)})
        store.finish(r.id, "done", test_accuracy=0.5)
    return store


@pytest.mark.parametrize("how", ["not a database", "zeroed pages"])
def test_a_damaged_database_is_moved_aside_with_its_log_and_rebuilt(tmp_path, how, caplog, monkeypatch):
    root = tmp_path / "runs"
    store = filled(root)
    ids = sorted(r.id for r in store.list())
    bad = damage(store.db_path, "zeroed pages") if how == "zeroed pages" else b"not a database\n" * 300
    store.db_path.write_bytes(bad)
    check = RunStore._init_db

    def with_stale_log(self):
        """SQLite removes the -wal/-shm files it cannot use when it closes: put them back after each failed open,
        as a process that died mid-write leaves them."""
        try:
            check(self)
        except sqlite3.DatabaseError:
            Path(f"{self.db_path}-wal").write_bytes(b"stale log")
            Path(f"{self.db_path}-shm").write_bytes(b"stale shm")
            raise

    monkeypatch.setattr(RunStore, "_init_db", with_stale_log)
    with pytest.raises(RunStoreDamaged) as e:
        RunStore(root, recover=False)
    reason = "file is not a database" if how == "not a database" else "database disk image is malformed"
    assert str(e.value) == (f"The run store {store.db_path} is damaged ({reason}). Run `python -m wsviz runs rebuild` "
                            "(or reload the app) to move it aside and rebuild it from the run folders; shipped "
                            "checkpoints work meanwhile.")
    assert store.db_path.read_bytes() == bad and damaged_copies(root) == []
    with caplog.at_level("WARNING", logger="wsviz.training.runstore"):
        again = RunStore(root)
    rec = again.recovery
    assert rec is not None and rec.db_path == store.db_path and rec.moved_to.read_bytes() == bad
    assert rec.moved_to.name == f"wsviz.db.damaged-{time.strftime('%Y%m%d')}" + rec.moved_to.name[25:]
    assert Path(f"{rec.moved_to}-wal").read_bytes() == b"stale log"
    assert Path(f"{rec.moved_to}-shm").read_bytes() == b"stale shm"
    assert sorted(rec.rebuilt.added) == ids and sorted(r.id for r in again.list()) == ids
    assert ("malformed" in rec.reason) if how == "zeroed pages" else rec.reason == "file is not a database"
    assert caplog.messages == [f"run store {store.db_path} is damaged ({rec.reason}): moved to {rec.moved_to}"]
    assert RunStore(root).recovery is None
    # damaged again, in the same second: the next copy gets its own name
    again.db_path.write_bytes(bad)
    third = RunStore(root)
    assert third.recovery.moved_to != rec.moved_to and third.recovery.moved_to.read_bytes() == bad
    assert len(damaged_copies(root)) == 2


@pytest.mark.parametrize("taken,expected", [
    ([], ""), ([""], "-2"), (["-wal"], "-2"), (["-shm"], "-2"), (["", "-2-wal"], "-3"), (["", "-2-shm"], "-3"),
    (["", "-2", "-3-shm"], "-4")])
def test_the_name_of_a_moved_aside_copy_never_overwrites(tmp_path, monkeypatch, taken, expected):
    root = tmp_path / "runs"
    store = filled(root)
    monkeypatch.setattr(rs.time, "strftime", lambda fmt, *a: "20240102-030405")
    base = root / "wsviz.db.damaged-20240102-030405"
    for suffix in taken:
        Path(f"{base}{suffix}").write_text("older")
    store.db_path.write_bytes(b"not a database\n" * 300)
    rec = RunStore(root).recovery
    assert rec.moved_to == Path(f"{base}{expected}")
    assert all(Path(f"{base}{suffix}").read_text() == "older" for suffix in taken)


def test_another_process_recovered_it_meanwhile(tmp_path, monkeypatch):
    """The lock is held by the first opener; the next finds a sound database and moves nothing."""
    root = tmp_path / "runs"
    store = filled(root)
    store.db_path.write_bytes(b"not a database\n" * 300)
    check = RunStore._init_db
    calls = []

    def first_fails_then_sound(self):
        calls.append(1)
        if len(calls) == 2:  # meanwhile another process moved the damaged file aside and started a new one
            os.rename(self.db_path, self.db_path.with_name("elsewhere"))
        check(self)

    monkeypatch.setattr(RunStore, "_init_db", first_fails_then_sound)
    opened = RunStore(root)
    assert opened.recovery is None and damaged_copies(root) == [] and len(calls) == 2 and opened.list() == []
    assert (root / ".wsviz.db.lock").exists()


@pytest.mark.may_skip_in_ci("a folder root cannot write needs a read-only tmpfs mount, which a CI container may lack")
def test_an_unwritable_folder_with_a_damaged_or_sound_store(tmp_path):
    root = tmp_path / "runs"
    store = filled(root)
    ids = sorted(r.id for r in store.list())
    with read_only(root) as ro:
        with pytest.raises(RunStoreUnavailable) as e:
            RunStore(ro)
        assert re.fullmatch(re.escape(f"The run store {ro.resolve() / 'wsviz.db'} cannot be opened for writing (")
                            + "(unable to open database file|attempt to write a readonly database)"
                            + re.escape(f"): make {ro.resolve()} writable, or set WSVIZ_RUNS to a folder you can "
                                        "write. Training needs it; shipped checkpoints and finished runs work without "
                                        "it."), str(e.value))
        view = finished_runs(ro)
        assert view.usable is False and view.problem == str(e.value) and view.cancelled == frozenset()
        assert sorted(rid for _, rid, _ in view.done) == ids
    bad = damage(store.db_path, "zeroed pages")
    with read_only(root) as ro:
        with pytest.raises(RunStoreDamaged) as e:
            RunStore(ro)
        msg = str(e.value)
        assert msg.startswith(f"The run store {ro.resolve() / 'wsviz.db'} is damaged (database disk image is malformed")
        assert f", and it cannot be moved aside because {ro.resolve()} cannot be written (" in msg
        assert "): make that folder writable or set WSVIZ_RUNS to another folder. Run `python -m wsviz runs" in msg
        assert (ro / "wsviz.db").read_bytes() == bad and damaged_copies(ro) == []
        with pytest.raises(RunStoreDamaged, match="cannot be moved aside because"):
            RunStore(ro, recover=False)
    store.db_path.write_bytes(b"not a database\n" * 300)
    with read_only(root) as ro:
        with pytest.raises(RunStoreDamaged) as e:
            RunStore(ro)
        assert str(e.value).startswith(f"The run store {ro.resolve() / 'wsviz.db'} is damaged (file is not a database), "
                                       f"and it cannot be moved aside because {ro.resolve()} cannot be written (")
        reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"  # tmpfs as root, else chmod
        assert f"cannot be written ({reason}): make that folder writable" in str(e.value)


def test_probe_damage_reads_without_writing(tmp_path):
    store = filled(tmp_path / "runs")
    assert store._probe_damage() is None
    store.db_path.rename(tmp_path / "kept.db")
    store.db_path.mkdir()  # cannot be opened at all: that is not damage
    assert store._probe_damage() is None
    store.db_path.rmdir()
    (tmp_path / "kept.db").rename(store.db_path)
    null_where_not_null(store.db_path)
    assert str(store._probe_damage()) == "database disk image is malformed (NULL value in runs.reason)"
    damage(store.db_path, "zeroed pages")
    found = store._probe_damage()
    assert isinstance(found, sqlite3.DatabaseError) and str(found).startswith("database disk image is malformed")
    store.db_path.write_bytes(b"not a database\n" * 300)
    assert str(store._probe_damage()) == "file is not a database"


# --------------------------------------------------------------------------- finished runs
def test_finished_runs_lists_done_and_usable_cancelled_runs(tmp_path):
    assert finished_runs(tmp_path / "missing") == rs.StoreView([], None, True)
    root = tmp_path / "runs"
    store = RunStore(root)
    done = store.create("m", "d", {}, name="done")
    store.finish(done.id, "done")
    with_epoch = store.create("m", "d", {}, name="kept")
    (Path(with_epoch.out_dir) / "checkpoint").mkdir()
    (Path(with_epoch.out_dir) / "checkpoint" / "card.json").write_text(json.dumps(card(complete=False)))
    store.finish(with_epoch.id, "cancelled")
    none = store.create("m", "d", {}, name="none")
    store.finish(none.id, "cancelled")
    failed = store.create("m", "d", {}, name="failed")
    store.finish(failed.id, "failed")
    view = finished_runs(root)
    assert view == rs.StoreView([("kept", with_epoch.id, Path(with_epoch.out_dir) / "checkpoint"),
                                 ("done", done.id, Path(done.out_dir) / "checkpoint")], None, True,
                                frozenset([with_epoch.id]))
    (root / "wsviz.db.damaged-1").write_text("x")
    assert finished_runs(root).problem == (
        f"A damaged run store was moved aside to {root / 'wsviz.db.damaged-1'} and the run list rebuilt from the run "
        f"folders (1 damaged copy in {store.root}). Nothing is missing that a folder holds; delete the damaged "
        "copies once you no longer need them.")
    (root / "wsviz.db.damaged-2").write_text("x")
    assert "to " + str(root / "wsviz.db.damaged-2") + " and" in finished_runs(root).problem
    assert "(2 damaged copies in" in finished_runs(root).problem


@pytest.mark.may_skip_in_ci("a folder root cannot write needs a read-only tmpfs mount, which a CI container may lack")
def test_finished_runs_after_a_recovery_and_from_the_folders(tmp_path):
    root = tmp_path / "runs"
    store = filled(root)
    old = [(r.name, r.id) for r in store.list()]
    store.db_path.write_bytes(b"not a database\n" * 300)
    view = finished_runs(root)
    assert view.usable and view.problem.startswith(f"The run store {store.db_path} was damaged (file is not a database)")
    assert len(view.done) == 3
    cancelled = store.create("m", "d", {}, name="c")
    (Path(cancelled.out_dir) / "checkpoint").mkdir()
    (Path(cancelled.out_dir) / "checkpoint" / "card.json").write_text(json.dumps(card(complete=False)))
    done = store.create("m", "d", {}, name="d")
    (Path(done.out_dir) / "checkpoint").mkdir()
    (Path(done.out_dir) / "checkpoint" / "card.json").write_text(json.dumps(card()))
    store.finish(cancelled.id, "cancelled")
    sql(store, "UPDATE runs SET created=created+1 WHERE id=?", done.id)
    damage(store.db_path, "zeroed pages")
    with read_only(root) as ro:
        view = finished_runs(ro)
        assert not view.usable and "cannot be moved aside" in view.problem
        # from the folders: the complete card is done (newest first); the unfinished one is not cancelled there
        assert view.done == [(name, rid, ro.resolve() / rid / "checkpoint") for name, rid in [("d", done.id), *old]]
        assert view.cancelled == frozenset()


def null_where_not_null(db: Path) -> None:
    """Damage that SQLite's quick_check reports as a row (not an error): a NULL where the schema says NOT NULL."""
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM runs WHERE reason IS NULL").fetchone()[0]
    con.execute("PRAGMA writable_schema=ON")
    con.execute("UPDATE sqlite_master SET sql=replace(sql, 'reason TEXT,', 'reason TEXT NOT NULL,') WHERE name='runs'")
    con.commit()
    con.close()


def test_damage_that_quick_check_reports_is_damage(tmp_path):
    root = tmp_path / "runs"
    store = filled(root)
    ids = sorted(r.id for r in store.list())
    null_where_not_null(store.db_path)
    with pytest.raises(RunStoreDamaged) as e:
        RunStore(root, recover=False)
    assert str(e.value).startswith(f"The run store {store.db_path} is damaged (database disk image is malformed (NULL "
                                   "value in runs.reason)). Run `python -m wsviz runs rebuild`")
    rec = RunStore(root).recovery
    assert rec.reason == "database disk image is malformed (NULL value in runs.reason)"
    assert sorted(rec.rebuilt.added) == ids


@pytest.fixture
def statements(monkeypatch):
    """Every SQL statement the run store sends, in order."""
    sent: list[str] = []
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        con = connect(*args, **kwargs)
        con.set_trace_callback(sent.append)
        return con

    monkeypatch.setattr(rs.sqlite3, "connect", traced)
    return sent


def _begins(sent: list[str]) -> list[str]:
    return [q for q in sent if q.startswith("BEGIN")]


def test_what_reads_before_it_writes_takes_the_write_lock_first(tmp_path, statements):
    """Two processes must not both read "a slot is free" and both take it: claim_slot, reconcile,
    requeue and rebuild begin with BEGIN IMMEDIATE (the write lock), not a deferred BEGIN."""
    store = RunStore(tmp_path / "runs")
    a = store.create("m", "d", {})
    store.finish(a.id, "failed", "killed")
    for call in (store.rebuild, lambda: store.requeue(a.id, 0)):
        statements.clear()
        call()
        assert _begins(statements)[0] == "BEGIN IMMEDIATE"
    # reconcile first reads, without the lock, which runs a cluster runs (their scheduler is asked outside
    # it: sacct may take seconds); what it decides and writes is read again under the lock
    statements.clear()
    store.reconcile()
    assert _begins(statements) == ["BEGIN", "BEGIN IMMEDIATE"]
    first = statements[statements.index("BEGIN") + 1:statements.index("COMMIT")]
    assert first and all(q.startswith("SELECT") for q in first)
    statements.clear()
    store.claim_slot(a.id, 1, os.getpid(), "cpu")
    assert _begins(statements) == ["BEGIN", "BEGIN IMMEDIATE", "BEGIN IMMEDIATE"]  # its reconcile, then its claim
    statements.clear()
    store.get(a.id)
    store.list()
    store.request_cancel(a.id)
    assert set(_begins(statements)) == {"BEGIN"}


def test_a_damaged_database_that_cannot_be_moved_aside(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    store = filled(root)
    store.db_path.write_bytes(b"not a database\n" * 300)

    def busy(src, dst):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(rs.os, "rename", busy)
    with pytest.raises(RunStoreDamaged) as e:
        RunStore(root)
    assert str(e.value) == (f"The run store {store.db_path} is damaged (file is not a database), and it cannot be moved "
                            f"aside (Device or resource busy): make {store.root} writable. Run `python -m wsviz runs "
                            "rebuild` (or reload the app) to move it aside and rebuild it from the run folders; shipped "
                            "checkpoints work meanwhile.")
    def unexplained(src, dst):
        raise OSError("no reason given")  # no errno, no strerror: the error itself is shown

    monkeypatch.setattr(rs.os, "rename", unexplained)
    with pytest.raises(RunStoreDamaged, match=r"cannot be moved aside \(no reason given\): make "):
        RunStore(root)


def test_a_database_that_cannot_be_opened_once_locked(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    filled(root)
    calls = []

    def damaged_then_unopenable(self):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("file is not a database")
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(RunStore, "_init_db", damaged_then_unopenable)
    with pytest.raises(RunStoreUnavailable) as e:
        RunStore(root)
    assert str(e.value).startswith(f"The run store {root.resolve() / 'wsviz.db'} cannot be opened for writing (unable "
                                   "to open database file): make ")


def test_opening_an_existing_store_does_not_rebuild_it(tmp_path):
    root = tmp_path / "runs"
    store = RunStore(root)
    run_folder(root, "20240102-030405-aaaaaa", {"model": "m", "dataset": "d"})
    assert RunStore(root).list() == []  # known database: only `runs rebuild` adds folders
    assert store.rebuild().added == ["20240102-030405-aaaaaa"]


def test_the_default_and_nested_runs_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunStore().root == tmp_path / "runs" and (tmp_path / "runs" / "wsviz.db").is_file()
    assert RunStore(tmp_path / "a" / "b" / "runs").db_path.is_file()  # parents made too


def test_queued_runs_get_a_minute_for_their_worker_to_start(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs")
    runs = [store.create("m", "d", {}) for _ in range(3)]
    for r, age in zip(runs, (59.5, 60.0, 60.5)):
        sql(store, "UPDATE runs SET created=? WHERE id=?", 1000.0 - age, r.id)
    monkeypatch.setattr(rs, "time", SimpleNamespace(time=lambda: 1000.0))
    assert sorted(store.reconcile()) == sorted(r.id for r in runs[1:])  # 60 s and more: its worker never came


def test_processes_opening_a_new_store_at_the_same_moment_all_get_it(tmp_path):
    """Sessions and jobs that open a fresh run store at once: each gets a usable store. Unserialised, one
    switched the new database to WAL while another read it ("database is locked") or two added the same
    column ("duplicate column name"), and the loser was told the store cannot be used (7 of 60 opens
    failed: 15 rounds of 4 processes)."""
    code = ("import sys, time\n"
            "from wsviz.training.runstore import RunStore\n"
            "start = float(sys.argv[2])\n"
            "while time.time() < start: pass\n"  # every process opens at the same instant
            "s = RunStore(sys.argv[1]); s.list(); print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    failures = []
    for trial in range(10):
        folder = tmp_path / f"runs{trial}"
        start = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(start)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            if p.returncode != 0 or out.strip() != "ok":
                failures.append(err.strip().splitlines()[-1] if err.strip() else out)
    assert not failures, failures
