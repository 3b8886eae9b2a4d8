"""Fixes to training: a diverged run says so wherever it is listed, the Train page's run picker, one
training per --out at a time, and the messages of a stopped or refused run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_active_runs
from streamlit.testing.v1 import AppTest

from wsviz.training.loop import TrainConfig
from wsviz.training.runstore import RunStore, finished_runs, read_run_folder

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"base_width": 4, "depth": 8}
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _wait(store: RunStore, run_id: str, timeout: float = 300) -> None:
    t0 = time.time()
    while store.get(run_id).active and time.time() - t0 < timeout:
        time.sleep(0.5)
    assert not store.get(run_id).active, f"run {run_id} still {store.get(run_id).status} after {timeout} s"


def _app(runs: Path, monkeypatch) -> AppTest:
    import pages._shared as shared

    monkeypatch.setattr(shared, "RUNS", runs)
    shared.scan_checkpoints.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/train.py")
    at.run()
    assert not at.exception, at.exception
    return at


# ------------------------------------------------------------------ 1. a diverged run
def test_a_diverged_background_run_says_so_in_the_store_the_variant_list_and_the_train_page(tmp_path, monkeypatch):
    import pages._shared as shared
    from wsviz.training.jobs import launch

    runs = tmp_path / "runs"
    store = RunStore(runs)
    try:
        run = launch(store, "resnet_digits", "mnist5k", TrainConfig(epochs=2, lr=10, batch_size=64, max_batches=8),
                     name="too-hot")
        _wait(store, run.id)
    finally:
        kill_active_runs(runs)
    card = json.loads((Path(run.out_dir) / "checkpoint" / "card.json").read_text())
    assert card["diverged"] is True  # the loss rose far above chance's
    run = store.get(run.id)
    assert run.status == "done"
    assert run.reason.startswith("diverged: ") and card["diverged_reason"] in run.reason
    # the variant list names it as diverged, from the store and from its folder alike
    view = finished_runs(runs)
    assert [(name, rid) for name, rid, _ in view.done] == [("too-hot [diverged]", run.id)]
    assert view.diverged == {run.id}
    assert read_run_folder(run.out_dir).reason == run.reason
    at = _app(runs, monkeypatch)
    try:
        assert any("[diverged]" in label and run.id[-6:] in label for label in shared.available_variants())
        table = next(d.value for d in at.dataframe if "status" in d.value.columns)
        assert list(table["status"]) == ["done, diverged"]
        assert card["diverged_reason"] in table["reason"][0]
        warned = [w.value for w in at.warning if "too-hot" in w.value]
        assert len(warned) == 1 and "diverged" in warned[0] and card["diverged_reason"] in warned[0], warned
    finally:
        shared.scan_checkpoints.clear()


# ------------------------------------------------------------------ 2. the run picker
def test_the_watch_run_picker_names_runs_without_a_status_that_goes_stale(tmp_path, monkeypatch):
    """A browser keeps showing the label the chosen option had when it was picked: a status in that label read
    'running' after the run had failed. The label is the run's name and id; the line below says its status."""
    runs = tmp_path / "runs"
    store = RunStore(runs)
    run = store.create("resnet_digits", "mnist5k", {"train_config": {"epochs": 5}}, "watched")
    store.claim_slot(run.id, 10, os.getpid(), "cpu")  # this test's process stands in for its job
    try:
        at = _app(runs, monkeypatch)
        picker = at.selectbox(key="watch-select")
        assert picker.options == [f"watched · {run.id[-6:]}"]
        assert any(m.value == "**watched** — running" for m in at.markdown)
        store.finish(run.id, "failed", "boom")
        at.run()
        assert not at.exception, at.exception
        assert at.selectbox(key="watch-select").options == [f"watched · {run.id[-6:]}"]
        assert any(m.value == "**watched** — failed: boom" for m in at.markdown)
    finally:
        store.finish(run.id, "cancelled", "test over")


# ------------------------------------------------------------------ 3. one training per --out
def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsviz.train", "--model", "resnet_digits", "--dataset", "mnist5k", "--batch-size",
            "64", "--max-batches", "2", "--quiet", "--out", str(out), *(f"--set={k}={v}" for k, v in SMALL.items()),
            *extra]


def test_a_second_training_into_the_same_out_is_refused_and_a_killed_one_resumes(tmp_path):
    from wsviz.training.state import load_state, state_path

    out = tmp_path / "ck"
    first = subprocess.Popen(_train_cmd(out, "--epochs", "500", "--seed", "1"), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not state_path(out).is_file() and first.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        assert state_path(out).is_file(), first.communicate()[0][-2000:]  # the first is training: epoch 1 is saved
        # a second one, at once, even one told to overwrite: refused, saying who writes there and what to do
        second = subprocess.run(_train_cmd(out, "--epochs", "2", "--seed", "2", "--overwrite"), cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert (f"another training is writing to {out} (pid {first.pid}); wait for it to end, or choose another "
                "--out") in second.stderr
        assert first.poll() is None  # the first trains on, alone
        assert len(list((tmp_path / "ck.tensorboard").glob("events.out.tfevents.*"))) == 1
        first.send_signal(signal.SIGKILL)  # killed: the OS lets go of its lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    card = json.loads((out / "card.json").read_text())
    assert card["train_config"]["seed"] == 1  # the second wrote nothing
    done = int(load_state(state_path(out))["epoch"])
    again = subprocess.run(_train_cmd(out, "--epochs", str(done + 1), "--seed", "1", "--resume"), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # no stale lock stands in its way
    card = json.loads((out / "card.json").read_text())
    assert card["complete"] and card["epochs_done"] == done + 1 and card["train_config"]["seed"] == 1
    assert not (tmp_path / "ck.lock").exists()  # let go of, and removed, once the run ended


# ------------------------------------------------------------------ 5. README's folder: commands
def _shell_blocks() -> list[tuple[str, str]]:
    """(where, text) of every shell block of the README, and of `python -m wsviz.train --help`'s examples."""
    import re

    import wsviz.train

    readme = (ROOT / "README.md").read_text()
    blocks = [(f"README block {i}", b) for i, b in enumerate(re.findall(r"```(?:bash|sh|console)\n(.*?)```", readme,
                                                                         re.S))]
    return [*blocks, ("wsviz.train's --help", wsviz.train.__doc__)]


@pytest.mark.parametrize("where,block", _shell_blocks(), ids=lambda v: v if v.startswith(("README", "wsviz")) else "")
def test_every_folder_dataset_command_in_the_docs_sets_a_data_root_that_holds_it(where, block, monkeypatch):
    """A `--dataset folder:PATH` command is refused unless WSVIZ_DATA_ROOTS names a folder above PATH: every one
    the docs show runs as written (an `export` earlier in its block, or the variable set on its line)."""
    import re

    from wsviz.data.datasets import folder_path

    root = None
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s#.*", "", line)
        exported = re.match(r"\s*export WSVIZ_DATA_ROOTS=(\S+)", line)
        if exported:
            root = exported[1]
        for path in re.findall(r"folder:(/\S+)", line):
            own = re.search(r"(?:^|\s)WSVIZ_DATA_ROOTS=(\S+)\s", line)
            given = own[1] if own else root
            assert given, f"{where}: `{line.strip()}` is refused as written: no WSVIZ_DATA_ROOTS is set before it"
            monkeypatch.setenv("WSVIZ_DATA_ROOTS", given)
            folder_path(path)  # the refusal the command would meet, if any


# ------------------------------------------------------------------ 6. messages
class Stop(Exception):
    """Stands for a kill in the second epoch (the first's checkpoint and training state are saved by then)."""


TWIN = ROOT / "checkpoints" / "scale-sharesnet-unshared"
GROUP = "stages.2.1.conv2,stages.2.2.conv2"


def test_the_same_tie_again_after_its_fine_tune_was_killed_says_how_to_resume_it(tmp_path, capsys, monkeypatch):
    import re

    import wsviz.training.run as wrun
    from wsviz.cli import main

    if not (TWIN / "card.json").is_file():
        pytest.skip("needs the shipped checkpoint scale-sharesnet-unshared")
    out = tmp_path / "tied"
    args = ["tie", "--checkpoint", str(TWIN), "--out", str(out), "--group", GROUP, "--calibration", "32",
            "--finetune-epochs", "2", "--max-batches", "1"]
    real = wrun.run_training

    def killed_after_epoch_1(*a, **kw):
        def on_step(epoch, step, loss):
            if epoch == 2:
                raise Stop()
        return real(*a, on_step=on_step, **kw)

    monkeypatch.setattr(wrun, "run_training", killed_after_epoch_1)
    with pytest.raises(Stop):
        main(args)
    monkeypatch.setattr(wrun, "run_training", real)
    capsys.readouterr()
    assert main(args) == 2  # the very same command again
    err = capsys.readouterr().err
    assert "stopped after epoch 1 of 2" in err and "--resume" in err and "already holds a checkpoint" not in err, err
    command = re.search(r"`([^`]+ --resume)`", err)[1]
    done = subprocess.run(command, shell=True, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr  # what it says to run resumes the fine-tune
    card = json.loads((out / "card.json").read_text())
    assert card["complete"] and card["epochs_done"] == 2 and card["tied"]["groups"] == [GROUP.split(",")]


def _killed_in_epoch_2(out: Path) -> None:
    """A run of 2 epochs killed in its second: epoch 1's checkpoint and training state are kept."""
    from wsviz.training.run import run_training
    from wsviz.training.state import state_path

    def on_step(epoch, step, loss):
        if epoch == 2:
            raise Stop()

    with pytest.raises(Stop):
        run_training("resnet_digits", "mnist5k", out, TrainConfig(epochs=2, batch_size=64, max_batches=2),
                     overrides=SMALL, on_step=on_step, tensorboard=None)
    assert state_path(out).is_file()


def test_a_damaged_training_state_on_resume_names_the_way_to_start_again(tmp_path, capsys):
    from wsviz.train import main
    from wsviz.training.state import state_path

    out = tmp_path / "ck"
    _killed_in_epoch_2(out)
    state_path(out).write_bytes(b"\0" * 100)  # damaged: cut short, overwritten
    args = ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "2", "--batch-size", "64", "--max-batches",
            "2", "--quiet", "--tensorboard", "none", "--out", str(out), *(f"--set={k}={v}" for k, v in SMALL.items())]
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "--overwrite instead of --resume" in err, err
    assert "without --resume" not in err
    assert main(args) == 2  # what it said before, "start the run again without --resume", is refused: a run is there
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # the way out it names
    assert json.loads((out / "card.json").read_text())["complete"]


@pytest.mark.parametrize("how", ["other options", "other tensors"])
def test_a_training_state_of_another_run_names_the_way_to_start_again(tmp_path, capsys, how):
    from wsviz.train import main
    from wsviz.training.state import load_state, save_state, state_path

    out = tmp_path / "ck"
    _killed_in_epoch_2(out)
    args = ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "2", "--batch-size", "64", "--max-batches",
            "2", "--quiet", "--tensorboard", "none", "--out", str(out), *(f"--set={k}={v}" for k, v in SMALL.items())]
    if how == "other options":
        args += ["--lr", "0.05"]
        said = "belongs to another run"
    else:  # the same options, but a state whose model tensors are not this model's
        state = load_state(state_path(out))
        state["model"].pop(next(iter(state["model"])))
        save_state(state_path(out), state)
        said = "does not fit this run's model"
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert said in err and "--overwrite instead of --resume" in err and "without --resume" not in err, err


def test_sigterm_on_the_command_line_says_which_epoch_is_kept_and_that_resume_continues(tmp_path):
    from wsviz.training.cards import read_card
    from wsviz.training.run import recorded_epoch
    from wsviz.training.state import state_path

    out = tmp_path / "ck"
    proc = subprocess.Popen(_train_cmd(out, "--epochs", "500"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not state_path(out).is_file() and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    done, kept = read_card(out)["epochs_done"], recorded_epoch(state_path(out))
    assert kept is not None and done >= kept >= 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cancelled: {out} keeps the checkpoint of epoch {done} of 500 and the training state of ")
    assert last.endswith(f"run the same command with --resume to continue after epoch {kept}"), last


@pytest.mark.parametrize("what", ["random bytes", "text", "a pickle cut short"])
def test_import_of_a_garbage_pt_says_it_is_not_a_readable_checkpoint(tmp_path, what):
    import pickle
    import random

    bad = tmp_path / "weights.pt"
    whole = pickle.dumps({"conv1.weight": [0.0] * 64})
    bad.write_bytes({"random bytes": random.Random(0).randbytes(4096), "text": b"<html>404 Not Found</html>\n",
                     "a pickle cut short": whole[: len(whole) // 2]}[what])
    p = subprocess.run([sys.executable, "-m", "wsviz", "import", "--model", "resnet_digits", "--weights", str(bad),
                        "--out", str(tmp_path / "ck")], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 2, p.stderr
    assert f"{bad} is not a readable checkpoint" in p.stderr and "other than tensors" not in p.stderr, p.stderr
    assert not (tmp_path / "ck").exists()


def test_import_of_a_whole_pickle_of_other_objects_still_says_so(tmp_path):
    import collections
    import pickle

    from wsviz.models.convert import read_state_dict

    bad = tmp_path / "weights.pt"
    bad.write_bytes(pickle.dumps({"conv1.weight": collections.OrderedDict(a=collections.Counter("ab"))}))
    with pytest.raises(Exception, match="holds Python objects other than tensors"):
        read_state_dict(bad)


def test_a_killed_background_run_points_at_its_log_on_the_train_page(tmp_path, monkeypatch):
    from wsviz.training.jobs import launch, list_runs

    runs = tmp_path / "runs"
    store = RunStore(runs)
    try:
        run = launch(store, "resnet_digits", "mnist5k", TrainConfig(epochs=500, batch_size=64, max_batches=2),
                     overrides=SMALL, name="killed")
        card = Path(run.out_dir) / "checkpoint" / "card.json"
        t0 = time.time()
        while not card.is_file() and store.get(run.id).active and time.time() - t0 < 120:
            time.sleep(0.2)
        os.kill(store.get(run.id).pid, signal.SIGKILL)  # killed without a word (the OOM killer, kill -9)
        t0 = time.time()
        while store.get(run.id).active and time.time() - t0 < 30:
            list_runs(store)
            time.sleep(0.2)
    finally:
        kill_active_runs(runs)
    log_file = Path(run.out_dir) / "log.txt"
    run = store.get(run.id)
    assert run.status == "failed" and f"its log is {log_file}" in run.reason, run.reason
    at = _app(runs, monkeypatch)
    assert any(m.value.startswith("**killed** — failed: ") and str(log_file) in m.value for m in at.markdown), \
        [m.value for m in at.markdown]


# ------------------------------------------------------------------ 7. the progress bar
def test_the_progress_bar_starts_with_the_first_epoch_and_a_resumed_run_where_it_is(tmp_path, monkeypatch):
    import tqdm

    from wsviz.train import main

    out = tmp_path / "ck"
    made, folder = [], [out]

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            card = folder[0] / "card.json"
            made.append({"bar": self, "epochs saved": json.loads(card.read_text())["epochs_done"]
                         if card.is_file() else 0, "started": self.n})

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    args = ["--model", "resnet_digits", "--dataset", "mnist5k", "--batch-size", "64", "--max-batches", "2",
            "--tensorboard", "none", "--out", str(out), *(f"--set={k}={v}" for k, v in SMALL.items())]
    _killed_in_epoch_2(out)  # a run of 2 epochs with epoch 1 kept
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    # made before epoch 2 (the first this process trains) had finished, counting from epoch 1 kept
    assert [(m["epochs saved"], m["started"]) for m in made] == [(1, 1)]
    assert made[0]["bar"].n == 3 and made[0]["bar"].total == 3
    made.clear()
    folder[0] = tmp_path / "fresh"
    assert main([*args, "--epochs", "2", "--out", str(folder[0])]) == 0
    assert [(m["epochs saved"], m["started"]) for m in made] == [(0, 0)] and made[0]["bar"].n == 2
    bar = made[0]["bar"]
    # its elapsed time covers both epochs: the rate is about 2 epochs over the time both took
    card = json.loads((tmp_path / "fresh" / "card.json").read_text())
    assert bar.format_dict["elapsed"] >= sum(m["seconds"] for m in card["metrics"]) * 0.9
