"""A damaged or unwritable run store: the app keeps working, nothing is deleted, runs come back from their folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import damage, read_only

from wsviz.training.loop import TrainConfig
from wsviz.training.run import run_training
from wsviz.training.runstore import (
    RESTORED,
    RunStore,
    RunStoreDamaged,
    RunStoreUnavailable,
    damaged_copies,
    finished_runs,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "scale-msws-vanilla"
PAGES = ["pages/kernels.py", "pages/compare.py", "pages/scale.py", "pages/rotation.py", "pages/embeddings.py",
         "pages/train.py"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One real (tiny) checkpoint, copied into every finished run below."""
    out = tmp_path_factory.mktemp("ck") / "checkpoint"
    run_training("resnet_digits", "mnist5k", out, TrainConfig(epochs=2, batch_size=64, max_batches=2),
                 overrides={"base_width": 8, "depth": 8})
    return out


def make_runs(root: Path, trained: Path) -> tuple[RunStore, dict[str, dict]]:
    """A store with three finished runs, one killed after its first epoch and one cancelled before any;
    returns it and {run id: what the store said about the run, its metrics included}."""
    store = RunStore(root)
    spec = {"model": "resnet_digits", "dataset": "mnist5k", "overrides": {"base_width": 8, "depth": 8}}
    card = json.loads((trained / "card.json").read_text())
    for i in range(3):
        run = store.create("resnet_digits", "mnist5k", spec, name=f"done-{i}")
        shutil.copytree(trained, Path(run.out_dir) / "checkpoint")
        for m in card["metrics"]:
            store.log_metrics(run.id, m["epoch"], {k: m[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc",
                                                                   "lr", "images_per_s")})
        store.finish(run.id, "done", test_accuracy=card["test_accuracy"])
    killed = store.create("resnet_digits", "mnist5k", spec, name="killed")
    shutil.copytree(trained, Path(killed.out_dir) / "checkpoint")
    partial = dict(card, complete=False, epochs=5, epochs_done=1, metrics=card["metrics"][:1])
    (Path(killed.out_dir) / "checkpoint" / "card.json").write_text(json.dumps(partial))
    store.finish(killed.id, "failed", "killed")
    cancelled = store.create("resnet_digits", "mnist5k", spec, name="cancelled")
    store.finish(cancelled.id, "cancelled", "cancelled while queued")
    before = {r.id: {"run": r, "metrics": store.metrics(r.id)} for r in store.list()}
    return store, before


def done_label(run) -> str:
    return f"run:{run.name} ({run.id[-6:]})"


def restored_matches(store: RunStore, before: dict[str, dict]) -> None:
    """Every run is back under its id; finished ones with name, model, spec, accuracy and per-epoch metrics."""
    after = {r.id: r for r in store.list()}
    assert set(after) == set(before)
    for rid, old in before.items():
        new, was = after[rid], old["run"]
        assert (new.name, new.model, new.dataset, new.spec) == (was.name, was.model, was.dataset, was.spec)
        if was.status == "done":
            assert new.status == "done" and new.test_accuracy == pytest.approx(was.test_accuracy)
            got = {k: [(e, v) for e, _, v in rows] for k, rows in store.metrics(rid).items()}
            want = {k: [(e, v) for e, _, v in rows] for k, rows in old["metrics"].items()}
            assert got.keys() == want.keys()
            for k in want:
                assert [e for e, _ in got[k]] == [e for e, _ in want[k]]
                assert [v for _, v in got[k]] == pytest.approx([v for _, v in want[k]])
        else:
            assert new.status == "failed" and new.reason.startswith(RESTORED)
    assert "1 of 5 epochs" in after[next(i for i, o in before.items() if o["run"].name == "killed")].reason


# ------------------------------------------------------------------------------------ library
@pytest.mark.parametrize("how", ["not a database", "truncated", "zeroed pages"])
def test_a_damaged_store_is_moved_aside_and_rebuilt_from_the_run_folders(tmp_path, trained, how):
    store, before = make_runs(tmp_path / "runs", trained)
    bad = damage(store.db_path, how)
    with pytest.raises(RunStoreDamaged, match="is damaged"):
        RunStore(tmp_path / "runs", recover=False)  # asked not to touch it: it says so and leaves it
    assert store.db_path.read_bytes() == bad and not damaged_copies(tmp_path / "runs")

    reopened = RunStore(tmp_path / "runs")
    rec = reopened.recovery
    assert rec is not None and rec.moved_to.read_bytes() == bad  # kept, byte for byte
    assert damaged_copies(tmp_path / "runs") == [rec.moved_to]
    assert "moved aside" in rec.message() and str(rec.moved_to) in rec.message()
    assert sorted(rec.rebuilt.added) == sorted(before)
    restored_matches(reopened, before)
    assert RunStore(tmp_path / "runs").recovery is None  # sound again: opened as is
    new = reopened.create("resnet_digits", "mnist5k", {})  # and usable for new runs
    assert reopened.get(new.id).status == "queued"


def test_rebuild_is_idempotent_and_finishes_a_run_whose_card_became_complete(tmp_path, trained):
    store, before = make_runs(tmp_path / "runs", trained)
    store.db_path.unlink()  # gone altogether: a new store is filled from the folders
    fresh = RunStore(tmp_path / "runs")
    restored_matches(fresh, before)
    again = fresh.rebuild()
    assert again.added == [] and again.updated == []
    killed = next(r for r in fresh.list() if r.name == "killed")
    shutil.copy(trained / "card.json", Path(killed.out_dir) / "checkpoint" / "card.json")  # its process went on
    assert fresh.rebuild().updated == [killed.id]
    assert fresh.get(killed.id).status == "done"


def test_concurrent_openers_move_the_damaged_store_aside_once(tmp_path, trained, monkeypatch):
    """Four openers that all found the database damaged before any of them moved it: one moves it."""
    store, before = make_runs(tmp_path / "runs", trained)
    damage(store.db_path, "not a database")
    barrier, stores, errors, seen = threading.Barrier(4, timeout=60), [], [], threading.local()
    check = RunStore._init_db

    def first_check_waits_for_all(self):
        if getattr(seen, "done", False):
            return check(self)
        seen.done = True
        try:
            check(self)
        finally:
            barrier.wait()  # every opener has seen the damage before any goes on

    monkeypatch.setattr(RunStore, "_init_db", first_check_waits_for_all)

    def opener():
        try:
            stores.append(RunStore(tmp_path / "runs"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(damaged_copies(tmp_path / "runs")) == 1
    assert sum(s.recovery is not None for s in stores) == 1
    monkeypatch.setattr(RunStore, "_init_db", check)
    restored_matches(RunStore(tmp_path / "runs"), before)


def test_an_unwritable_folder_lists_finished_runs_from_their_folders(tmp_path, trained):
    store, before = make_runs(tmp_path / "runs", trained)
    damage(store.db_path, "truncated")
    with read_only(tmp_path / "runs") as runs:
        bad = (runs / "wsviz.db").read_bytes()
        with pytest.raises(RunStoreDamaged, match="cannot be moved aside"):
            RunStore(runs)
        view = finished_runs(runs)
        assert not view.usable and "cannot be moved aside" in view.problem
        assert sorted(rid for _, rid, _ in view.done) == sorted(i for i, o in before.items()
                                                                 if o["run"].status == "done")
        assert (runs / "wsviz.db").read_bytes() == bad and not damaged_copies(runs)


def test_an_unwritable_folder_with_a_sound_store(tmp_path, trained):
    make_runs(tmp_path / "runs", trained)
    with read_only(tmp_path / "runs") as runs:
        with pytest.raises(RunStoreUnavailable, match="writable"):
            RunStore(runs)
        view = finished_runs(runs)
        assert len(view.done) == 3 and "WSVIZ_RUNS" in view.problem


def test_runs_rebuild_command(tmp_path, trained):
    store, before = make_runs(tmp_path / "runs", trained)
    bad = damage(store.db_path, "not a database")
    out = subprocess.run([sys.executable, "-m", "wsviz", "runs", "rebuild", "--runs-dir", str(tmp_path / "runs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "moved aside" in out.stdout and "5 run(s) restored" in out.stdout
    assert damaged_copies(tmp_path / "runs")[0].read_bytes() == bad
    restored_matches(RunStore(tmp_path / "runs"), before)


# ------------------------------------------------------------------------------------ the app
@pytest.fixture
def app_runs(monkeypatch):
    """Point the app's pages at a runs folder (in this process: AppTest runs the scripts here)."""
    sys.path.insert(0, str(ROOT))
    import pages._shared as shared

    def use(folder: Path) -> None:
        monkeypatch.setattr(shared, "RUNS", Path(folder))
        shared.scan_checkpoints.clear()

    yield use
    shared.scan_checkpoints.clear()


def open_every_page(variants: list[str]):
    """Run the app, then every page, with ``variants`` chosen; returns the AppTest after each page."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state["variants"] = variants
    at.run()
    assert not at.exception, at.exception
    yield "pages/models.py", at
    for page in PAGES:
        at.switch_page(page)
        at.run()
        assert not at.exception, (page, at.exception)
        yield page, at


@pytest.mark.skipif(not (ROOT / "checkpoints" / SHIPPED / "card.json").is_file(), reason="needs the shipped zoo")
@pytest.mark.parametrize("how", ["not a database", "truncated", "unwritable folder"])
def test_every_page_opens_with_a_broken_run_store(tmp_path, trained, app_runs, how):
    store, before = make_runs(tmp_path / "runs", trained)
    finished = next(o["run"] for o in before.values() if o["run"].status == "done")
    runs = tmp_path / "runs"
    with read_only(runs) if how == "unwritable folder" else _nothing(runs) as runs:
        bad = (runs / "wsviz.db").read_bytes() if how == "unwritable folder" else damage(runs / "wsviz.db", how)
        app_runs(runs)
        run_label = done_label(finished)
        for page, at in open_every_page([SHIPPED, run_label]):
            if page == "pages/models.py":  # the entry script's sidebar (AppTest runs other pages without it)
                options = at.multiselect(key="variants").options
                assert SHIPPED in options and run_label in options, options
                notes = [w.value for w in at.sidebar.warning]
                assert len(notes) == 1, notes  # one message, saying what happened and what to do
                if how == "unwritable folder":
                    assert "cannot be opened for writing" in notes[0] and "WSVIZ\\_RUNS" in notes[0]
                else:
                    assert "moved aside" in notes[0] and "Delete the damaged cop" in notes[0]
            elif page == "pages/train.py":
                if how == "unwritable folder":
                    assert any("Training is unavailable" in e.value for e in at.error)
                else:
                    table = [d.value for d in at.dataframe if "status" in d.value.columns][0]
                    assert set(table["id"]) == set(before)
            elif page in ("pages/compare.py", "pages/scale.py"):
                assert not at.error and len(at.metric) == 2  # the shipped checkpoint and the finished run predict
            elif page == "pages/kernels.py":
                assert {s.label for s in at.selectbox} >= {f"Layer of {SHIPPED}", f"Layer of {run_label}"}
        if how == "unwritable folder":
            assert (runs / "wsviz.db").read_bytes() == bad
        else:
            assert [p.read_bytes() for p in damaged_copies(runs)] == [bad]


@contextmanager
def _nothing(folder: Path):
    yield folder


def _notice_script():
    from pages._shared import run_store_notice

    run_store_notice()


def test_the_sidebar_rebuilds_the_run_list_on_request(tmp_path, trained, app_runs):
    """The sidebar's notice and its button, run on their own (AppTest reruns app.py's pages without the sidebar)."""
    from streamlit.testing.v1 import AppTest

    store, before = make_runs(tmp_path / "runs", trained)
    damage(store.db_path, "not a database")
    app_runs(tmp_path / "runs")
    at = AppTest.from_function(_notice_script, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert len(at.warning) == 1 and "moved aside" in at.warning[0].value
    extra = RunStore(tmp_path / "runs").create("resnet_digits", "mnist5k", {}, name="copied-in")
    with RunStore(tmp_path / "runs")._connect() as con:  # a folder the store does not know (copied from elsewhere)
        con.execute("DELETE FROM runs WHERE id=?", (extra.id,))
    at.button(key="rebuild-runs").click().run()
    assert not at.exception, at.exception
    assert [s.value for s in at.success] == [r"1 run\(s\) restored from their folders, 0 updated"]  # markdown-escaped
    assert extra.id in {r.id for r in RunStore(tmp_path / "runs").list()}
