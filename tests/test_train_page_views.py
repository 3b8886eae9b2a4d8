"""What the Train page shows of runs: the live loss by optimiser step (not the batch within its epoch),
the time a resumed run has left, several runs' test accuracy with unique names and one panel per
dataset, and the folder TensorBoard reads. The views on records written here, a small training for
the steps it records, and the page itself (AppTest) on a run store filled by hand."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from wsviz.training.loop import TrainConfig
from wsviz.training.run import run_training
from wsviz.training.runstore import LIVE_LOSS, LIVE_LOSS_IN_EPOCH, Run, RunStore
from wsviz.training.watch import (
    loss_curve,
    loss_figure,
    overlay_figure,
    progress,
    tensorboard_hint,
    trace_name,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"base_width": 4, "depth": 8}


class Stop(Exception):
    pass


def record(run_id: str = "20240102-030405-aaaaaa", *, model: str = "resnet_digits", dataset: str = "mnist5k",
           status: str = "running", started: float | None = 1000.0, epochs: int = 5) -> Run:
    """A run record as the store returns it, without a store."""
    return Run(run_id, f"{model}-{dataset}", model, dataset, {"train_config": {"epochs": epochs}}, status, None, 1,
               "cpu", f"/runs/{run_id}", 900.0, started, None, None, False)


# ------------------------------------------------------------------ 1. the live loss's x axis
def test_run_training_counts_optimiser_steps_from_the_start_and_a_resume_continues_them(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, max_batches=3)
    seen = []

    def stop_in_epoch_2(epoch, step, loss):
        seen.append((epoch, step))
        if epoch == 2:
            raise Stop()

    with pytest.raises(Stop):
        run_training("resnet_digits", "mnist5k", tmp_path / "ck", cfg, overrides=SMALL, on_step=stop_in_epoch_2,
                     tensorboard=None)
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 4)]
    seen.clear()
    run_training("resnet_digits", "mnist5k", tmp_path / "ck", cfg, overrides=SMALL, resume=True, tensorboard=None,
                 on_step=lambda epoch, step, loss: seen.append((epoch, step)))
    assert seen == [(2, 4), (2, 5), (2, 6)]  # epoch 2 again, from the step after epoch 1's last


def test_a_job_records_its_live_loss_by_optimiser_step(tmp_path, monkeypatch):
    import wsviz.train as wtrain

    monkeypatch.setattr(wtrain, "LIVE_LOSS_EVERY_S", -1.0)  # every step, not once a second
    store = RunStore(tmp_path / "runs")
    run = store.create("resnet_digits", "mnist5k", {}, "steps")
    args = wtrain.apply_recipe(wtrain.build_parser().parse_args(
        ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "2", "--batch-size", "64",
         "--max-batches", "3", "--out", str(Path(run.out_dir) / "checkpoint"), "--tensorboard", "none",
         "--run-id", run.id, "--runs-dir", str(store.root), "--quiet",
         *(f"--set={k}={v}" for k, v in SMALL.items())]))
    wtrain._train(args, wtrain._config(args), wtrain.parse_set(args.set), store, 0, 1, None, "cpu")
    live = store.metrics(run.id)[LIVE_LOSS]
    assert [(e, s) for e, s, _ in live] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert LIVE_LOSS_IN_EPOCH not in store.metrics(run.id)


def test_the_loss_curve_runs_on_across_epochs_for_new_and_old_records():
    new = {LIVE_LOSS: [(1, 1, 0.9), (1, 3, 0.8), (2, 5, 0.7), (2, 6, 0.6), (3, 8, 0.5)]}
    assert loss_curve(new) == ([1, 3, 5, 6, 8], [0.9, 0.8, 0.7, 0.6, 0.5])
    # Recorded before the store kept the optimiser step: the batch within each epoch, 3 batches an epoch.
    old = {LIVE_LOSS_IN_EPOCH: [(1, 1, 0.9), (1, 3, 0.8), (2, 2, 0.7), (2, 3, 0.6), (3, 1, 0.5)]}
    assert loss_curve(old) == ([1, 3, 5, 6, 7], [0.9, 0.8, 0.7, 0.6, 0.5])
    # An old run resumed by this version: its first epoch the old way, the rest by optimiser step.
    both = {LIVE_LOSS_IN_EPOCH: [(1, 1, 0.9), (1, 3, 0.8)], LIVE_LOSS: [(2, 4, 0.7), (2, 6, 0.6)]}
    assert loss_curve(both) == ([1, 3, 4, 6], [0.9, 0.8, 0.7, 0.6])
    assert loss_curve({}) == ([], [])
    fig = loss_figure(old)
    assert list(fig.data[0].x) == [1, 3, 5, 6, 7] and fig.layout.xaxis.title.text == "optimiser step"


# ------------------------------------------------------------------ 2. the time left after a resume
def test_the_time_left_of_a_resumed_run_counts_only_the_epochs_since_it_started():
    # Epochs 1 and 2 ran before a cancel; resumed at t=1000, epoch 3 took 50 s; 2 of 5 epochs to go.
    resumed = record(started=1000.0, epochs=5)
    p = progress(resumed, [(1, 100.0), (2, 200.0), (3, 1050.0)], now=1060.0)
    assert (p.done, p.epochs, p.since_start, p.elapsed, p.left) == (3, 5, 1, 60.0, 90.0)  # 2 x 50 s, less 10 s run
    assert p.caption() == "Epoch 3 of 5 done (1 since it was resumed 60 s ago); about 90 s left."
    # The same run never stopped: every epoch counts.
    fresh = record(started=10.0, epochs=4)
    p = progress(fresh, [(1, 60.0), (2, 110.0)], now=120.0)
    assert (p.since_start, p.left) == (2, 90.0) and p.caption() == "Epoch 2 of 4 done after 110 s; about 90 s left."
    # Resumed, no epoch finished since: no estimate yet (the kept epochs say nothing of this process's pace).
    p = progress(resumed, [(1, 100.0), (2, 200.0)], now=1030.0)
    assert p.left is None and p.caption() == ("Epoch 2 of 5 done (0 since it was resumed 30 s ago); the time left "
                                              "is known once an epoch finishes.")
    # Slower than the epochs before: no negative time.
    p = progress(resumed, [(1, 100.0), (2, 200.0), (3, 1050.0)], now=1200.0)
    assert p.left == 0.0 and p.caption().endswith("this epoch is taking longer than the ones before it.")
    assert progress(record(status="cancelled"), [(1, 100.0)], now=1060.0) is None
    assert progress(record(started=None), [(1, 100.0)], now=1060.0) is None
    assert progress(resumed, [], now=1060.0) is None


def test_metric_times_say_when_each_epoch_was_recorded(tmp_path):
    store = RunStore(tmp_path / "runs")
    a, b = store.create("m", "d", {}), store.create("m", "d", {})
    t0 = time.time()
    store.log_metrics(a.id, 1, {"test_acc": 0.5, "lr": 0.1})
    store.log_metrics(a.id, 2, {"test_acc": 0.6})
    store.log_metrics(b.id, 1, {"test_acc": 0.7})
    times = store.metric_times(a.id, "test_acc")
    assert [e for e, _ in times] == [1, 2] and all(t0 <= t <= time.time() for _, t in times)
    assert store.metric_times(a.id, "nothing") == [] and store.metric_times("none", "test_acc") == []


# ------------------------------------------------------------------ 3. several runs overlaid
def test_the_overlay_names_every_run_and_never_shares_an_axis_between_datasets():
    one = record("20240102-030405-aaaaaa", dataset="mnist5k")
    two = record("20240102-030406-bbbbbb", dataset="mnist5k")  # the same model and dataset: names still differ
    rot = record("20240102-030407-cccccc", dataset="mnist5k-rot")
    acc = {one.id: [(1, None, 0.5), (2, None, 0.75)], two.id: [(1, None, 0.25)], rot.id: [(1, None, 0.125)]}
    fig = overlay_figure([one, two, rot], acc)
    names = [t.name for t in fig.data]
    assert names == ["resnet_digits · 20240102-030405-aaaaaa (mnist5k)",
                     "resnet_digits · 20240102-030406-bbbbbb (mnist5k)",
                     "resnet_digits · 20240102-030407-cccccc (mnist5k-rot)"]
    assert names == [trace_name(r) for r in (one, two, rot)]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == [50.0, 75.0]
    assert fig.data[0].yaxis == fig.data[1].yaxis != fig.data[2].yaxis  # one panel per dataset
    assert fig.data[0].xaxis != fig.data[2].xaxis
    assert [a.text for a in fig.layout.annotations] == ["test accuracy on mnist5k", "test accuracy on mnist5k-rot"]
    single = overlay_figure([one, two], acc)
    assert {t.yaxis for t in single.data} == {"y"} and len(single.layout.annotations) == 1


# ------------------------------------------------------------------ 4. TensorBoard's folder
def test_the_tensorboard_hint_names_the_run_stores_folder(tmp_path):
    root = tmp_path / "my runs"
    assert tensorboard_hint(root, "process") == f"TensorBoard: `tensorboard --logdir '{root}'`."
    assert tensorboard_hint(root, "submitit-local") == f"TensorBoard: `tensorboard --logdir '{root}'`."
    slurm = tensorboard_hint(tmp_path, "slurm")
    assert slurm.startswith(f"TensorBoard: `tensorboard --logdir {tmp_path}`, on a machine that sees that folder")
    assert "SLURM" in slurm


# ------------------------------------------------------------------ the page
def test_the_train_page_shows_the_views(tmp_path, monkeypatch):
    """The page on a store filled by hand: a resumed run at work (this test's process stands in for its
    job), two finished runs of the same model on two datasets, and the SLURM backend in WSVIZ_BACKEND."""
    import pages._shared as shared

    runs = tmp_path / "elsewhere"
    monkeypatch.setattr(shared, "RUNS", runs)
    monkeypatch.setenv("WSVIZ_BACKEND", "slurm")
    shared.scan_checkpoints.clear()
    store = RunStore(runs)
    done = []
    for dataset, acc in (("mnist5k", 0.5), ("mnist5k-rot", 0.25)):
        r = store.create("resnet_digits", dataset, {"train_config": {"epochs": 1}})
        store.log_metrics(r.id, 1, {"test_acc": acc})
        store.claim_slot(r.id, 10, os.getpid(), "cpu")
        store.finish(r.id, "done", test_accuracy=acc)
        done.append(r)
    time.sleep(0.01)
    run = store.create("resnet_digits", "mnist5k", {"train_config": {"epochs": 5}}, "resumed")
    for epoch in (1, 2, 3):
        store.log_metrics(run.id, epoch, {"test_acc": 0.1 * epoch})
    store.log_metrics(run.id, 1, {LIVE_LOSS_IN_EPOCH: 2.0}, step=3)  # from before the cancel, the old way
    store.log_metrics(run.id, 3, {LIVE_LOSS: 1.0}, step=8)
    store.claim_slot(run.id, 10, os.getpid(), "cpu")
    now = time.time()
    con = sqlite3.connect(store.db_path)
    con.execute("UPDATE runs SET started=? WHERE id=?", (now - 100, run.id))  # resumed 100 s ago
    con.execute("UPDATE metrics SET time=? WHERE run_id=? AND key='test_acc' AND epoch<3", (now - 1000, run.id))
    con.execute("UPDATE metrics SET time=? WHERE run_id=? AND key='test_acc' AND epoch=3", (now - 50, run.id))
    con.commit()
    con.close()
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        at.run()
        at.switch_page("pages/train.py")
        at.run()
        assert not at.exception, at.exception
        captions = [c.value for c in at.caption]
        assert any(f"`tensorboard --logdir {store.root}`" in c and "SLURM" in c for c in captions), captions
        eta = next(c for c in captions if c.startswith("Epoch 3 of 5 done"))
        assert "(1 since it was resumed" in eta, eta
        left = float(re.search(r"about (\d+) s left", eta).group(1))
        assert 30 <= left <= 50, eta  # 2 epochs x 50 s, less the 50 s this one has run
        charts = {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
        loss = next(s for s in charts.values() if s["layout"]["title"]["text"] == "Training loss")
        assert loss["data"][0]["x"] == [3, 8]
        at.multiselect(key="overlay-runs").set_value([r.id for r in done]).run()
        assert not at.exception, at.exception
        overlay = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                       if json.loads(c.proto.spec)["data"][0].get("name", "").startswith("resnet_digits · "))
        assert [t["name"] for t in overlay["data"]] == [trace_name(store.get(r.id)) for r in done]
        assert len({t.get("yaxis", "y") for t in overlay["data"]}) == 2
    finally:
        store.finish(run.id, "cancelled", "test over")
        shared.scan_checkpoints.clear()
