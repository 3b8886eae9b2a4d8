"""Reliability: trainings killed, starved of memory or disk, or fed garbage; concurrent sessions;
the run store read while written; repeated analyses on one page.

Every failure must end as a clear ``failed`` run with a reason, leave the run store consistent,
never leave a partial file under a checkpoint's final name, and keep what was already saved.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import Growth, kill_active_runs
from safetensors.torch import load_file

from wsviz import WsvizError
from wsviz.training.checkpoint import load_checkpoint
from wsviz.training.jobs import launch, list_runs
from wsviz.training.loop import TrainConfig
from wsviz.training.runstore import RunStore

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"base_width": 8, "depth": 8}


@pytest.fixture(autouse=True)
def _no_orphans(tmp_path):
    """Whatever happens in a test, no training process it started outlives it."""
    yield
    kill_active_runs(tmp_path / "runs")


def check_checkpoint(folder: Path) -> dict | None:
    """Every file under its final name in a checkpoint folder is whole; returns the card if any.

    Weights are renamed into place before their card, so a card never exists without weights;
    either may be missing (killed before the first save), none may be truncated or left as a
    temporary file once the run is known to be dead.
    """
    if not folder.exists():
        return None
    names = set(os.listdir(folder))
    assert not [n for n in names if n.endswith(".tmp")], f"temporary files left in {folder}: {names}"
    assert names <= {"weights.safetensors", "card.json"}, names
    if "card.json" in names:
        assert "weights.safetensors" in names, "a card without its weights"
        _, card = load_checkpoint(folder)  # parses the card, loads every tensor into the model it names
        return card
    if "weights.safetensors" in names:
        load_file(str(folder / "weights.safetensors"))  # whole: a truncated file raises here
    return None


def integrity_ok(store: RunStore) -> None:
    con = sqlite3.connect(store.db_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def epochs_logged(store: RunStore, run_id: str) -> list[int]:
    return [e for e, _, _ in store.metrics(run_id).get("test_acc", [])]


def train_argv(store: RunStore, run_id: str, out: Path, *, model: str = "resnet_digits",
               dataset: str = "mnist5k", epochs: int = 3, batch: int = 64, max_batches: int = 2,
               overrides: dict | None = None) -> list[str]:
    """What :func:`wsviz.training.jobs.launch` runs, for driving one worker directly."""
    argv = ["--model", model, "--dataset", dataset, "--epochs", str(epochs), "--out", str(out),
            "--batch-size", str(batch), "--max-batches", str(max_batches), "--run-id", run_id,
            "--runs-dir", str(store.root), "--max-running", "1", "--quiet", "--device", "cpu"]
    for k, v in (SMALL if overrides is None else overrides).items():
        argv += ["--set", f"{k}={v}"]
    return argv


def apptest_runs_listed(runs_dir: Path) -> dict[str, str]:
    """Start the app afresh (a new process, as after a restart), open the Train page and return
    the runs it lists as {id: status}."""
    code = textwrap.dedent(f"""
        import json
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(ROOT / "app.py")!r}, default_timeout=300)
        at.run()
        at.switch_page("pages/train.py")
        at.run()
        assert not at.exception, at.exception
        df = [d.value for d in at.dataframe if "status" in d.value.columns][0]
        print(json.dumps(dict(zip(df["id"], df["status"]))))
    """)
    env = dict(os.environ, WSVIZ_RUNS=str(runs_dir))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- killed jobs
def test_ten_trainings_sigkilled_at_random_points(tmp_path):
    """SIGKILL lands anywhere: while Python starts, while queued, mid-epoch, during a save."""
    rng = random.Random(20261123)
    store = RunStore(tmp_path / "runs")
    cfg = TrainConfig(epochs=500, batch_size=64, max_batches=2)
    plans = []
    for i in range(10):
        run = launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, name=f"kill-{i}", max_running=3)
        # half are killed after a random time, half after a random number of epochs plus a random
        # fraction of the next one (which is where checkpoints are written)
        when = ("time", time.time() + rng.uniform(0.1, 15.0)) if i % 2 else ("epoch", rng.randint(1, 3))
        plans.append({"run": run, "when": when, "extra": rng.uniform(0.0, 0.6), "killed": None})

    deadline = time.time() + 240
    while any(p["killed"] is None for p in plans):
        assert time.time() < deadline, [(p["run"].name, p["when"], p["killed"]) for p in plans]
        for p in plans:
            if p["killed"] is not None:
                continue
            kind, arg = p["when"]
            run = store.get(p["run"].id)
            assert run.active, f"{run.name} ended before it was killed: {run.status} {run.reason}"
            due = time.time() >= arg if kind == "time" else len(epochs_logged(store, run.id)) >= arg
            if due:
                if kind == "epoch":
                    time.sleep(p["extra"])
                p["killed"] = (store.get(run.id).status, len(epochs_logged(store, run.id)))
                os.kill(run.pid, signal.SIGKILL)
        time.sleep(0.05)

    t0 = time.time()  # a SIGKILL is delivered asynchronously: give the last ones a moment to die
    while any(r.active for r in list_runs(store)) and time.time() - t0 < 30:  # as the app refreshes its list
        time.sleep(0.1)
    runs = {r.id: r for r in list_runs(store)}  # what the app does on every refresh: reconcile, then list
    assert len(runs) == 10
    integrity_ok(store)
    states = []
    for p in plans:
        r = runs[p["run"].id]
        assert r.status == "failed" and "died" in r.reason, (r.name, r.status, r.reason)
        logged = epochs_logged(store, r.id)
        assert logged == list(range(1, len(logged) + 1))  # no gap, no duplicate
        card = check_checkpoint(Path(r.out_dir) / "checkpoint")
        if card is not None:
            assert not card["complete"] and card["epochs_done"] in (len(logged), len(logged) + 1)
        states.append(p["killed"][0])
    print("killed while (status, epochs logged):", [p["killed"] for p in plans])
    assert "running" in states  # some died mid-training (the others: starting up or queued)
    assert sum(1 for p in plans if p["killed"][1] >= 1) >= 3  # with checkpoints on disk

    listed = apptest_runs_listed(store.root)  # the app, restarted, lists every run as failed
    assert listed == {p["run"].id: "failed" for p in plans}


# ------------------------------------------------------------------------------ failing jobs
def _worker(store: RunStore, tmp_path: Path, **kw) -> tuple[int, object]:
    """Run one worker in this process (as ``python -m wsviz.train --run-id``) and return
    (exit code, the run afterwards)."""
    from wsviz.train import main

    run = store.create(kw.get("model", "resnet_digits"), kw.get("dataset", "mnist5k"), {})
    code = main(train_argv(store, run.id, tmp_path / "ck", **kw))
    return code, store.get(run.id)


def test_nan_loss_ends_as_a_failed_run_with_the_reason(tmp_path, monkeypatch):
    import wsviz.training.run as run_mod

    real = run_mod.load_split

    def poisoned(*a, **k):
        split = real(*a, **k)
        split.images = torch.full_like(split.images, float("nan"))
        return split

    monkeypatch.setattr(run_mod, "load_split", poisoned)
    store = RunStore(tmp_path / "runs")
    code, run = _worker(store, tmp_path)
    assert code == 2
    assert run.status == "failed" and "diverged" in run.reason and "learning rate" in run.reason
    assert check_checkpoint(tmp_path / "ck") is None  # nothing was saved: nothing half-saved either
    integrity_ok(store)


def test_out_of_memory_ends_as_a_failed_run(tmp_path):
    """A real allocation failure: the worker's address space is capped once its imports are done,
    then a batch of 4,000 28x28 images through a 64-wide ResNet needs far more."""
    store = RunStore(tmp_path / "runs")
    run = store.create("resnet_digits", "mnist5k", {})
    argv = train_argv(store, run.id, tmp_path / "ck", batch=4000, max_batches=1, epochs=1,
                      overrides={"base_width": 64, "depth": 8})
    code = textwrap.dedent(f"""
        import resource, sys
        import torch, wsviz.train, wsviz.training.run, wsviz.data.datasets
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        cap = vm + 1_500_000_000
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        sys.exit(wsviz.train.main({argv!r}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    r = store.get(run.id)
    assert out.returncode == 3, out.stderr[-3000:]
    assert r.status == "failed" and r.reason.startswith("out of memory") and "batch size" in r.reason, r.reason
    assert check_checkpoint(tmp_path / "ck") is None
    integrity_ok(store)


def test_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The disk fills up during the second epoch's save: half the file is written, then ENOSPC."""
    import wsviz.training.checkpoint as ck_mod

    real = ck_mod.save_model
    calls = []

    def filling_disk(model, path, *a, **k):
        calls.append(path)
        if len(calls) < 2:
            return real(model, path, *a, **k)
        real(model, path, *a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck_mod, "save_model", filling_disk)
    store = RunStore(tmp_path / "runs")
    code, run = _worker(store, tmp_path, epochs=3)
    assert code == 3
    assert run.status == "failed" and run.reason.startswith("the disk is full"), run.reason
    assert "checkpoint" in run.reason and "free some space" in run.reason
    card = check_checkpoint(tmp_path / "ck")  # epoch 1's checkpoint, whole; no temporary file left
    assert card is not None and card["epochs_done"] == 1
    assert epochs_logged(store, run.id) == [1]
    integrity_ok(store)


@pytest.mark.may_skip_in_ci("mounting a tmpfs needs mount privileges, which a CI container may lack; "
                             "test_full_disk_while_saving_keeps_the_last_checkpoint covers the same path")
def test_full_disk_on_a_real_tiny_filesystem(tmp_path):
    """The same on a real full filesystem: a tmpfs just large enough for one checkpoint."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    probe = tmp_path / "probe.safetensors"
    from safetensors.torch import save_model

    from wsviz.models import create_model

    save_model(create_model("resnet_digits", **SMALL), str(probe))
    size = int(probe.stat().st_size * 1.5) + 16 * 1024  # one checkpoint and its card fit, two weights do not
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the patched-writer test covers the same path)")
    try:
        store = RunStore(tmp_path / "runs")
        run = store.create("resnet_digits", "mnist5k", {})
        out = subprocess.run([sys.executable, "-m", "wsviz.train", *train_argv(store, run.id, mnt / "ck", epochs=4)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        r = store.get(run.id)
        assert out.returncode == 3, out.stderr[-3000:]
        assert r.status == "failed" and r.reason.startswith("the disk is full"), r.reason
        card = check_checkpoint(mnt / "ck")
        assert card is not None and card["epochs_done"] == 1
        integrity_ok(store)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_missing_dataset_at_run_time_fails_the_run(tmp_path):
    """The data was there when the run was queued and is gone when it starts."""
    store = RunStore(tmp_path / "runs")
    code, run = _worker(store, tmp_path, dataset=f"folder:{tmp_path / 'gone'}")
    assert code == 2
    assert run.status == "failed" and "gone" in run.reason, run.reason
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("kwargs,needle", [
    ({"cfg": TrainConfig(lr=1e6)}, "learning rate"), ({"cfg": TrainConfig(batch_size=10**9)}, "batch size"),
    ({"cfg": TrainConfig(epochs=10**7)}, "epochs"), ({"dataset": "imagenet-22k"}, "Unknown dataset"),
    ({"model": "resnet_digitz"}, "resnet_digits"), ({"name": "../../etc/cron.d/x"}, "Run name"),
    ({"overrides": {"base_width": 100000}}, "parameters"),  # refused on the meta device, no memory spent
    ({"overrides": {"base_widht": 8}}, "Did you mean 'base_width'"),  # a typo is an error, not ignored
    ({"overrides": {"base_width": "wide"}}, "base_width"),
])
def test_bad_launches_are_refused_before_anything_is_recorded(tmp_path, kwargs, needle):
    store = RunStore(tmp_path / "runs")
    args = {"model": "resnet_digits", "dataset": "mnist5k", "cfg": TrainConfig(epochs=1), **kwargs}
    name = args.pop("name", None)
    with pytest.raises(WsvizError, match=needle):
        launch(store, args["model"], args["dataset"], args["cfg"], name=name, overrides=args.get("overrides"))
    assert store.list() == []
    assert sorted(os.listdir(store.root)) == sorted(p for p in os.listdir(store.root)  # the store's own files only
                                                    if p.startswith(("wsviz.db", ".wsviz.db")))


# ------------------------------------------------------------------------------- concurrency
def test_three_sessions_launching_at_once_respect_the_job_limit_and_lose_none(tmp_path):
    """Three app sessions (separate processes) press Launch at the same instant; one job may run."""
    runs_dir = tmp_path / "runs"
    gate = tmp_path / "gate"
    gate.mkdir()
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(ROOT / "app.py")!r}, default_timeout=300)
        at.run()
        at.switch_page("pages/train.py")
        at.run()
        at.selectbox[0].set_value("resnet_digits")
        at.selectbox[1].set_value("mnist5k")
        at.number_input[0].set_value(1)
        at.number_input[1].set_value(64)
        [w for w in at.number_input if w.label.startswith("Max batches")][0].set_value(2)
        at.text_input[1].set_value('{{"base_width": 8, "depth": 8}}')
        gate = Path({str(gate)!r})
        (gate / sys.argv[1]).touch()  # this session is ready; press Launch once all three are
        t0 = time.time()
        while len(os.listdir(gate)) < 3:
            assert time.time() - t0 < 240, "the other sessions never got ready"
            time.sleep(0.01)
        at.button[0].click().run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        print([s.value for s in at.success])
    """)
    env = dict(os.environ, WSVIZ_RUNS=str(runs_dir), WSVIZ_MAX_RUNNING="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    t0 = time.time()
    while len(os.listdir(gate)) < 3 and time.time() - t0 < 240:  # a session that dies before it is ready ends
        dead = [(i, p) for i, p in enumerate(procs) if p.poll() is not None]  # the test at once, with its error
        if dead:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            i, p = dead[0]
            pytest.fail(f"session {i} ended (exit {p.returncode}) before it was ready: {p.communicate()[1][-3000:]}")
        time.sleep(0.1)
    outs = [p.communicate(timeout=300) for p in procs]
    failed = [f"session {i} (exit {p.returncode}): {err[-2000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs))
              if p.returncode != 0]
    assert not failed, "\n\n".join(failed)  # every session's own error: the first may only say it waited
    for out, _ in outs:
        assert "Launched run" in out
    store = RunStore(runs_dir)
    created = sorted(r.created for r in store.list())
    assert len(created) == 3  # none lost
    deadline = time.time() + 300
    peak = 0
    while any(r.active for r in list_runs(store)):
        assert time.time() < deadline, store.list()
        peak = max(peak, len(store.list("running")))
        time.sleep(0.05)
    runs = store.list()
    assert [r.status for r in runs] == ["done"] * 3, [(r.status, r.reason) for r in runs]
    assert created[-1] < min(r.finished for r in runs)  # launched together: all three queued before one ended
    assert peak <= 1
    spans = sorted((r.started, r.finished) for r in runs)  # the store's own record: never two at once
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    integrity_ok(store)


def test_run_store_is_read_while_being_written(tmp_path):
    """Two writer processes log metrics as fast as they can while readers in this process list,
    read and reconcile: no 'database is locked', nothing lost, every read self-consistent."""
    store = RunStore(tmp_path / "runs")
    n = 1000
    writer = textwrap.dedent(f"""
        import sys
        from wsviz.training.runstore import RunStore
        s = RunStore({str(store.root)!r})
        r = s.create("resnet_digits", "mnist5k", {{"writer": sys.argv[1]}})
        for i in range({n}):
            s.log_metrics(r.id, i + 1, {{"train_loss": 1.0 / (i + 1), "test_acc": i / {n}}})
        s.finish(r.id, "done", test_accuracy=0.5)
    """)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        s = RunStore(store.root)
        while not stop.is_set():
            try:
                for r in s.list():
                    m = s.metrics(r.id)
                    assert len(m.get("train_loss", [])) == len(m.get("test_acc", []))  # one transaction each
                    s.get(r.id)
                s.reconcile()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(i)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert not errors, errors[:3]
    runs = store.list()
    assert len(runs) == 2 and all(r.status == "done" for r in runs)
    for r in runs:
        assert [e for e, _, _ in store.metrics(r.id)["train_loss"]] == list(range(1, n + 1))
    integrity_ok(store)


# ------------------------------------------------------------------------------------ memory
def test_repeated_analyses_on_one_page_leave_nothing_behind():
    """The Compare page (predictions, feature maps and attributions of two variants) rerun in one
    session, alternating two sample images so nothing is served from a cache: the reruns together
    keep less Python memory than one rerun uses, and not one more tensor, module or hook."""
    code = textwrap.dedent(f"""
        import json, sys
        from dataclasses import asdict
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from conftest import measure_growth
        from streamlit.testing.v1 import AppTest

        at = AppTest.from_file({str(ROOT / "app.py")!r}, default_timeout=300)
        at.session_state["variants"] = ["scale-msws-vanilla", "scale-msws-shared"]
        at.run()
        at.switch_page("pages/compare.py")
        at.run()
        names = at.multiselect(key="sample-compare").options[:2]
        count = [0]
        def once():
            count[0] += 1
            at.multiselect(key="sample-compare").set_value([names[count[0] % 2]]).run()
            assert not at.exception, at.exception
            assert len(at.get("plotly_chart")) >= 2
        growth = measure_growth(once, warmup=4, calls=8)
        print(json.dumps(asdict(growth)))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = Growth(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
    growth.check()
