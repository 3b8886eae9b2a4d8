"""A training run's life across attempts: the wall-time allowance over resumes, a fresh start over
an old run (--overwrite) and its TensorBoard events, the run folder deleted while training, a full
disk's advice, and seeds out of range. Tiny trainings (one batch per epoch) in temporary folders."""

from __future__ import annotations

import errno
import shutil
import signal
import threading
import time
import types
from pathlib import Path

import pytest

from wsviz.errors import WsvizError
from wsviz.training.loop import TrainConfig
from wsviz.training.runstore import RunStore
from wsviz.training.state import load_state, save_state, state_path

MODEL, DATA = "msws_resnet_digits", "mnist5k"
SMALL = {"depth": 8, "base_width": 8}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WSVIZ_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WSVIZ_CACHE_DIR", str(tmp_path / "cache"))
    previous = signal.getsignal(signal.SIGTERM)  # wsviz.train.main installs its own
    yield
    signal.signal(signal.SIGTERM, previous)


def argv(out: Path, *, epochs: int = 3, store: RunStore | None = None, run_id: str | None = None,
         extra: tuple[str, ...] = ()) -> list[str]:
    a = ["--model", MODEL, "--dataset", DATA, "--epochs", str(epochs), "--out", str(out), "--batch-size", "64",
         "--lr", "0.05", "--max-batches", "1", "--device", "cpu", "--quiet", *extra]
    for k, v in SMALL.items():
        a += ["--set", f"{k}={v}"]
    if store is not None:
        a += ["--run-id", run_id, "--runs-dir", str(store.root), "--max-running", "1"]
    return a


def epochs_logged(store: RunStore, run_id: str) -> list[int]:
    return [e for e, _, _ in store.metrics(run_id).get("test_acc", [])]


def shifted_clock(monkeypatch, offset) -> None:
    """wsviz.train's clock (the wall-time quota's) runs ``offset()`` seconds ahead of the real one; its
    live-loss throttle is off, so the quota is checked after every step."""
    import wsviz.train as train_mod

    fake = types.SimpleNamespace(time=lambda: time.time() + offset(), monotonic=time.monotonic, sleep=time.sleep,
                                 perf_counter=time.perf_counter)
    monkeypatch.setattr(train_mod, "time", fake)
    monkeypatch.setattr(train_mod, "LIVE_LOSS_EVERY_S", -1.0)


# --------------------------------------------------------------------------- 1. wall-time quota
def test_a_run_stopped_at_its_wall_time_limit_cannot_resume_into_a_new_allowance(tmp_path, monkeypatch):
    """Stopped at the limit in epoch 2, the run's resume is refused: its allowance is spent (it was
    restarted from zero on every resume)."""
    from wsviz.train import main

    store = RunStore(tmp_path / "runs")
    run = store.create(MODEL, DATA, {"max_seconds": 3600.0})
    out = Path(run.out_dir) / "checkpoint"
    spath = state_path(out)
    with monkeypatch.context() as m:
        shifted_clock(m, lambda: 4000.0 if spath.is_file() else 0.0)  # an hour passes after epoch 1
        assert main(argv(out, store=store, run_id=run.id)) == 1
    r = store.get(run.id)
    assert r.status == "cancelled" and "wall-time limit" in r.reason, r.reason
    assert epochs_logged(store, run.id) == [1] and load_state(spath)["epoch"] == 1

    store.requeue(run.id, keep_epochs=1)
    code = main(argv(out, store=store, run_id=run.id, extra=("--resume",)))
    r = store.get(run.id)
    assert code == 2 and r.status == "failed", (code, r.status, r.reason)
    assert "this run has used its 1 h allowance" in r.reason, r.reason
    assert epochs_logged(store, run.id) == [1]  # nothing trained
    assert not store.metrics(run.id).get("live_loss") or max(e for e, _, _ in store.metrics(run.id)["live_loss"]) < 2
    assert load_state(spath)["epoch"] == 1  # what it had is kept


def test_a_resumed_run_counts_the_time_its_earlier_attempts_used(tmp_path, monkeypatch):
    """A state that has used 3,000 s of a 3,600 s allowance gets 600 s more, not 3,600."""
    from wsviz.train import main
    from wsviz.training.run import run_training

    store = RunStore(tmp_path / "runs")
    run = store.create(MODEL, DATA, {"max_seconds": 3600.0})
    out = Path(run.out_dir) / "checkpoint"
    spath = state_path(out)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(epoch, step, loss):
        if epoch == 2:
            raise Stop

    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, max_batches=1)
    with pytest.raises(Stop):
        run_training(MODEL, DATA, out, cfg, overrides=SMALL, device="cpu", on_step=stop_in_epoch_2, overwrite=False)
    state = load_state(spath)
    assert state["epoch"] == 1
    save_state(spath, {**state, "seconds": 3000.0, "wall_seconds": 3000.0})  # an earlier attempt's 50 minutes

    shifted_clock(monkeypatch, lambda: 1000.0)  # this attempt: 1,000 s, within one allowance, not within what is left
    assert main(argv(out, store=store, run_id=run.id, extra=("--resume",))) == 1
    r = store.get(run.id)
    assert r.status == "cancelled" and "wall-time limit" in r.reason, (r.status, r.reason)
    assert load_state(spath)["epoch"] == 1


# --------------------------------------------------------------------------- 2. --overwrite and TensorBoard
def _loss_steps(folder: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.step for e in ea.Scalars("train/loss_step")]


def test_overwrite_starts_a_fresh_tensorboard_log(tmp_path):
    from wsviz.training.run import run_training

    out, tb = tmp_path / "ck", tmp_path / "ck.tensorboard"
    run_training(MODEL, DATA, out, TrainConfig(epochs=2, batch_size=64, lr=0.05, max_batches=2), overrides=SMALL,
                 device="cpu", tensorboard=tb)
    assert _loss_steps(tb) == [1, 2, 3, 4]
    with pytest.raises(WsvizError):  # an overwrite that cannot start loses nothing
        run_training(MODEL, f"folder:{tmp_path / 'gone'}", out, TrainConfig(epochs=1, batch_size=64, max_batches=1),
                     overrides=SMALL, device="cpu", tensorboard=tb, overwrite=True)
    assert _loss_steps(tb) == [1, 2, 3, 4]
    run_training(MODEL, DATA, out, TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=2), overrides=SMALL,
                 device="cpu", tensorboard=tb, overwrite=True)
    assert _loss_steps(tb) == [1, 2]  # the old run's events are gone, not mixed in
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1


def test_an_overwrite_that_fails_on_its_first_step_keeps_the_killed_runs_state_and_curves(tmp_path):
    """--overwrite dropped the killed run's training state and TensorBoard events once the data was ready,
    before the first step: a new run that then failed (CUDA out of memory on the first batch) left the
    killed run unresumable and its curves gone. They go only when the new run finishes its first epoch."""
    from wsviz.training.run import run_training

    out, tb = tmp_path / "ck", tmp_path / "ck.tensorboard"

    class Killed(Exception):
        pass

    def kill_at_2(m):
        if m.epoch == 2:
            raise Killed

    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, max_batches=2)
    with pytest.raises(Killed):
        run_training(MODEL, DATA, out, cfg, overrides=SMALL, device="cpu", tensorboard=tb, on_epoch=kill_at_2)
    spath = state_path(out)
    saved = spath.read_bytes()
    events = sorted(tb.glob("events.out.tfevents.*"))

    def out_of_memory(epoch, step, loss):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_training(MODEL, DATA, out, cfg, overrides=SMALL, device="cpu", tensorboard=tb, overwrite=True,
                     on_step=out_of_memory)
    assert spath.read_bytes() == saved  # the killed run can still be resumed
    assert all(e.is_file() for e in events)  # and so can its curves
    card = run_training(MODEL, DATA, out, cfg, overrides=SMALL, device="cpu", tensorboard=tb, resume=True)
    assert card["epochs_done"] == 3 and not spath.exists()


# --------------------------------------------------------------------------- 3. run folder deleted while training
@pytest.mark.parametrize("background", [False, True])
def test_the_run_folder_deleted_while_training_is_said_in_one_line(tmp_path, monkeypatch, capsys, background):
    import wsviz.training.run as run_mod
    from wsviz.train import main

    real = run_mod.save_checkpoint
    store = RunStore(tmp_path / "runs") if background else None
    run = store.create(MODEL, DATA, {}) if background else None
    folder = Path(run.out_dir) if background else tmp_path / "sub"
    out = folder / "checkpoint"
    extra = ("--tensorboard", str(folder / "tensorboard")) if background else ()

    def save_then_delete(*a, **k):
        done = real(*a, **k)
        shutil.rmtree(folder)  # someone deletes the run's folder right after epoch 1 is saved
        return done

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_delete)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    code = main(argv(out, store=store, run_id=run.id if run else None, extra=extra))
    err = capsys.readouterr().err
    want = f"the run folder {folder} was deleted while training; launch the run again"
    assert code == 2, err
    assert f"error: {want}" in err and "Traceback" not in err, err
    assert not thread_errors, [(e.exc_type, e.exc_value) for e in thread_errors]
    if background:
        r = store.get(run.id)
        assert r.status == "failed" and r.reason == want, r.reason
    assert not folder.exists()  # not made again by a later save


def test_only_the_tensorboard_folder_deleted_costs_its_curves_not_the_run(tmp_path, monkeypatch, capsys, caplog):
    """Clearing TensorBoard's folder mid-run (to tidy the curves) is not deleting the run: the training
    goes on to the end, the warning says the earlier curves are gone, and later epochs log afresh."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import wsviz.training.run as run_mod
    from wsviz.train import main

    real, saves = run_mod.save_checkpoint, []
    out = tmp_path / "ck"
    tb = tmp_path / "ck.tensorboard"

    def save_then_clear_tensorboard(*a, **k):
        done = real(*a, **k)
        saves.append(1)
        if len(saves) == 1:
            shutil.rmtree(tb)  # right after epoch 1 is saved
        return done

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_clear_tensorboard)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    code = main(argv(out))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err, err
    assert f"the TensorBoard folder {tb} was deleted while training: the curves logged before are gone" in caplog.text
    assert not thread_errors, [(e.exc_type, e.exc_value) for e in thread_errors]
    assert (out / "card.json").is_file() and not state_path(out).exists()  # the run finished
    (events,) = tb.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    # one step per epoch; the folder went after epoch 1 was saved: step 1's loss was logged before (gone),
    # epoch 1's accuracies after it (kept), then everything of epochs 2 and 3
    assert [e.step for e in acc.Scalars("train/loss_step")] == [2, 3]
    assert [e.step for e in acc.Scalars("test/accuracy")] == [1, 2, 3]


# --------------------------------------------------------------------------- 4. full disk
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_full_disk_names_the_file_and_says_to_resume_when_a_state_is_kept(tmp_path, monkeypatch, capsys, fail_at):
    import wsviz.training.checkpoint as ck_mod
    from wsviz.train import main

    real, calls = ck_mod.save_model, []

    def filling_disk(model, path, *a, **k):
        calls.append(path)
        if len(calls) < fail_at:
            return real(model, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck_mod, "save_model", filling_disk)
    out = tmp_path / "ck"
    assert main(argv(out)) == 3
    err = capsys.readouterr().err
    assert "the disk is full" in err and f"writing {out / 'weights.safetensors'})" in err, err
    assert ".tmp" not in err, err
    if fail_at == 2:  # epoch 1's checkpoint and state are whole: resume continues from there
        assert state_path(out).is_file() and load_state(state_path(out))["epoch"] == 1
        assert "--resume" in err and "Resume" in err and "start the run again" not in err, err
    else:  # nothing finished: nothing to resume
        assert not state_path(out).exists()
        assert "start the run again" in err and "--resume" not in err, err


# --------------------------------------------------------------------------- 5. seeds
@pytest.mark.parametrize("seed", [2**63, 18446744073709551617, -1])
def test_a_seed_out_of_range_is_refused_in_words(seed):
    with pytest.raises(WsvizError, match=r"seed must be a whole number from 0 to 2\*\*63 - 1"):
        TrainConfig(seed=seed).validate()
    TrainConfig(seed=2**63 - 1).validate()


@pytest.mark.parametrize("option", ["--seed", "--data-seed"])
def test_the_command_line_refuses_a_huge_seed(tmp_path, capsys, option):
    from wsviz.train import main

    code = main(argv(tmp_path / "ck", epochs=1, extra=(option, "18446744073709551617")))
    err = capsys.readouterr().err
    assert code == 2 and "seed must be a whole number from 0 to 2**63 - 1" in err and "Overflow" not in err, err
    assert not (tmp_path / "ck").exists()


def test_a_full_disk_elsewhere_is_not_said_to_be_the_checkpoint(tmp_path):
    """'No space left on device' from a DataLoader worker's shared memory or from a dataset download was
    reported as 'the disk is full ... while saving the checkpoint; ... resume the run'."""
    import errno as err

    from wsviz.train import failure_reason

    out = tmp_path / "run" / "checkpoint"
    out.mkdir(parents=True)
    save_state(state_path(out), {"epoch": 1})
    shm = failure_reason(RuntimeError("unable to write to file </torch_1234_5678_0>: No space left on device (28)"),
                         str(out))
    assert "shared memory" in shm and "checkpoint" not in shm and "--workers 0" in shm
    download = failure_reason(OSError(err.ENOSPC, "No space left on device", "/data/cifar-10-python.tar.gz"), str(out))
    assert "/data/cifar-10-python.tar.gz" in download and "saving the checkpoint" not in download
    own = failure_reason(OSError(err.ENOSPC, "No space left on device", str(out / "weights.safetensors")), str(out))
    assert "saving the checkpoint" in own and "resume" in own
