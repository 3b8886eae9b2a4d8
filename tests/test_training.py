"""Training engine: loop, checkpoints and cards, background jobs, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_active_runs

from wsviz import WsvizError
from wsviz.data.datasets import load_split
from wsviz.training.checkpoint import load_checkpoint, read_card
from wsviz.training.jobs import cancel, launch, list_runs
from wsviz.training.loop import TrainConfig, TrainingFailed, evaluate, train
from wsviz.training.run import build_for_dataset, run_training
from wsviz.training.runstore import RunStore

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"base_width": 8, "depth": 8}


def test_one_epoch_on_rot_digits_writes_a_checkpoint_whose_card_matches_reevaluation(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    card = run_training("resnet_digits", "mnist5k-rot", tmp_path / "ck", cfg, overrides=SMALL)
    assert set(os.listdir(tmp_path / "ck")) == {"weights.safetensors", "card.json"}
    on_disk = read_card(tmp_path / "ck")
    assert on_disk["complete"] and on_disk["epochs_done"] == 1
    for key in ("model", "config", "family", "dataset", "train_split", "test_split", "epochs", "metrics",
                "test_accuracy", "unique_params", "flops", "device", "duration_s", "wsviz_version", "command"):
        assert key in on_disk, key
    model, card2 = load_checkpoint(tmp_path / "ck")
    test = load_split("mnist5k-rot", "test")
    _, acc, preds = evaluate(model, test.images, test.labels)
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-9)
    assert card2["test_accuracy"] == card["test_accuracy"]
    assert len(preds) == 1000
    assert card["unique_params"] == sum(p.numel() for p in model.parameters())


def test_reproduce_command_reproduces_the_run(tmp_path):
    # Options away from their defaults, so a command that drops one trains another run. The test accuracy
    # cannot tell (at 3 batches it is chance's 0.1 for any lr or seed): the weights trained again must be
    # the very same, bit for bit, and the card must record the same options.
    from safetensors.torch import load_file

    cfg = TrainConfig(epochs=1, batch_size=48, lr=0.05, momentum=0.8, weight_decay=5e-4, seed=3, max_batches=3)
    card = run_training("resnet_digits", "mnist5k", tmp_path / "a", cfg, overrides=SMALL, data_seed=2)
    cmd = card["command"].replace(str(tmp_path / "a"), str(tmp_path / "b"))
    subprocess.run(cmd, shell=True, check=True, cwd=ROOT, capture_output=True)
    again = read_card(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "weights.safetensors"), load_file(tmp_path / "b" / "weights.safetensors")
    assert a.keys() == b.keys()
    # the same up to float reduction order: this process's torch thread count (set by earlier tests in a full
    # run) may differ from the subprocess's; a dropped --seed or --lr changes weights by 1e-2 and more
    differ = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4)]
    assert not differ, f"{len(differ)} of {len(a)} weight tensors differ, e.g. {differ[:3]}"
    assert again["train_config"] == card["train_config"] and again["config"] == card["config"]
    assert again["data_seed"] == card["data_seed"] == 2
    assert again["test_accuracy"] == card["test_accuracy"]


def test_training_learns_something():
    torch.manual_seed(0)
    model = build_for_dataset("resnet_digits", "mnist5k", SMALL)
    tr, te = load_split("mnist5k", "train"), load_split("mnist5k", "test")
    res = train(model, (tr.images, tr.labels), (te.images, te.labels), TrainConfig(epochs=2, batch_size=64, lr=0.05))
    assert res.test_acc > 0.5  # chance is 0.1
    assert res.epochs[-1].train_loss < res.epochs[0].train_loss


def test_nan_loss_fails_with_a_reason():
    model = build_for_dataset("resnet_digits", "mnist5k", SMALL)
    x = torch.full((64, 1, 28, 28), float("nan"))
    y = torch.zeros(64, dtype=torch.long)
    with pytest.raises(TrainingFailed, match="Lower the learning rate"):
        train(model, (x, y), (x, y), TrainConfig(epochs=1, batch_size=32))


@pytest.mark.parametrize("kwargs,needle", [
    ({"lr": 1e6}, "learning rate"), ({"lr": float("nan")}, "learning rate"), ({"lr": -1}, "learning rate"),
    ({"batch_size": 0}, "batch size"), ({"batch_size": 10**9}, "batch size"), ({"epochs": 0}, "epochs"),
    ({"optimizer": "lbfgs"}, "optimizer"), ({"schedule": "warp"}, "schedule"),
])
def test_absurd_hyperparameters_are_refused(kwargs, needle):
    with pytest.raises(WsvizError, match=needle):
        TrainConfig(**kwargs).validate()


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(WsvizError, match="mnist5k"):
        load_split("cifar10", "train", data_root=tmp_path)
    with pytest.raises(WsvizError, match="Unknown dataset"):
        load_split("cifar11", "train")


def test_fashion_mnist_from_debian_package():
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    te = load_split("fashion-mnist", "test")
    assert te.images.shape == (10000, 1, 28, 28) and te.images.dtype == torch.uint8
    assert sorted(te.labels.unique().tolist()) == list(range(10))


# ----------------------------------------------------------------------------- jobs
@pytest.fixture(autouse=True)
def _no_stray_jobs(tmp_path):
    """Whatever a job test does, no training process outlives it (a failed test included)."""
    yield
    kill_active_runs(tmp_path / "runs")


def _wait(store: RunStore, run_id: str, pred, timeout: float = 120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        store.reconcile()
        run = store.get(run_id)
        if pred(run):
            return run
        time.sleep(0.2)
    log = Path(store.get(run_id).out_dir, "log.txt")
    raise AssertionError(f"timed out; run is {store.get(run_id)}; log:\n{log.read_text() if log.exists() else ''}")


def test_launch_runs_to_done_in_the_background(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = launch(store, "resnet_digits", "mnist5k", TrainConfig(epochs=2, batch_size=64, max_batches=3),
                 overrides=SMALL, name="smoke")
    assert run.status in ("queued", "running")  # launch returns without waiting for the training
    assert not store.metrics(run.id).get("test_acc")  # (how fast: benchmarks/bench_guards.py)
    seen = {run.status}
    t0 = time.time()
    while time.time() - t0 < 120:
        r = store.get(run.id)
        seen.add(r.status)
        if r.status not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert r.status == "done", Path(r.out_dir, "log.txt").read_text()
    assert "running" in seen
    assert r.test_accuracy is not None
    m = store.metrics(run.id)
    assert [e for e, _, _ in m["test_acc"]] == [1, 2]
    model, card = load_checkpoint(Path(r.out_dir) / "checkpoint")
    assert card["test_accuracy"] == pytest.approx(r.test_accuracy)


def test_cancel_and_queue(tmp_path):
    store = RunStore(tmp_path / "runs")
    cfg = TrainConfig(epochs=500, batch_size=32)
    first = launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, max_running=1)
    second = launch(store, "resnet_digits", "mnist5k", cfg, overrides=SMALL, max_running=1)
    _wait(store, first.id, lambda r: r.status == "running")
    time.sleep(2.0)
    assert store.get(second.id).status == "queued"  # only one may run
    cancel(store, second.id)
    assert _wait(store, second.id, lambda r: not r.active).status == "cancelled"
    cancel(store, first.id)
    r = _wait(store, first.id, lambda r: not r.active, timeout=60)
    assert r.status == "cancelled" and "cancel" in r.reason


def test_sigkilled_job_is_marked_failed_and_its_checkpoint_is_intact(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = launch(store, "resnet_digits", "mnist5k", TrainConfig(epochs=500, batch_size=64, max_batches=4),
                 overrides=SMALL)
    ck = Path(run.out_dir) / "checkpoint"
    _wait(store, run.id, lambda r: (ck / "card.json").exists() and len(store.metrics(r.id).get("test_acc", [])) >= 2)
    pid = store.get(run.id).pid
    os.kill(pid, signal.SIGKILL)
    r = _wait(store, run.id, lambda r: not r.active, timeout=30)
    assert r.status == "failed" and "died" in r.reason
    model, card = load_checkpoint(ck)  # the last finished epoch's checkpoint loads
    assert card["epochs_done"] >= 1 and not card["complete"]
    assert {"weights.safetensors", "card.json"} <= set(os.listdir(ck))
    assert any(x.id == run.id and x.status == "failed" for x in list_runs(store))


def _free_port() -> int:
    """A port no one listens on now, so two suites on one machine do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_train_and_save_once(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "wsviz.train", "--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "1",
           "--out", str(out), "--batch-size", "64", "--max-batches", "4", "--device", "cpu", "--quiet",
           "--set", "base_width=8", "--set", "depth=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # only rank 0 reports and saves
    assert set(os.listdir(out)) == {"weights.safetensors", "card.json"}
    card = json.loads((out / "card.json").read_text())
    assert card["complete"] and card["epochs_done"] == 1
    load_checkpoint(out)


def test_image_folder_dataset(tmp_path):
    """folder:PATH — one sub-folder per class, split 80/20 stratified, images fit to 3x32x32."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for ci, cls in enumerate(["circles", "squares"]):
        (tmp_path / cls).mkdir()
        for i in range(10):
            arr = (torch.rand(20, 30, 3, generator=rng) * 255).to(torch.uint8).numpy()
            arr[..., ci] = 255
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "circles" / "notes.txt").write_text("not an image")
    tr = load_split(f"folder:{tmp_path}", "train")
    te = load_split(f"folder:{tmp_path}", "test")
    assert tr.images.shape == (16, 3, 32, 32) and te.images.shape == (4, 3, 32, 32)
    assert tr.labels.bincount().tolist() == [8, 8] and te.labels.bincount().tolist() == [2, 2]
    with pytest.raises(WsvizError, match="at least two class"):
        load_split(f"folder:{tmp_path / 'circles'}", "train")


def test_train_cli_reports_bad_input_and_exits_2(tmp_path, capsys):
    from wsviz.train import main

    assert main(["--model", "resnet_digitz", "--dataset", "mnist5k", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "resnet_digits" in capsys.readouterr().err
    assert main(["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "1", "--out", str(tmp_path),
                 "--lr", "1e9"]) == 2
    assert "learning rate" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_job_outlives_the_process_that_launched_it(tmp_path):
    """The app may restart: a job launched by a process that then exits still finishes."""
    code = ("import sys; from wsviz.training.jobs import launch; from wsviz.training.runstore import RunStore; "
            "from wsviz.training.loop import TrainConfig; "
            f"r = launch(RunStore({str(tmp_path / 'runs')!r}), 'resnet_digits', 'mnist5k', "
            "TrainConfig(epochs=1, batch_size=64, max_batches=3), overrides={'base_width': 8, 'depth': 8}); "
            "print(r.id)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    store = RunStore(tmp_path / "runs")  # a fresh reader, as after an app restart
    run = _wait(store, proc.stdout.strip(), lambda r: not r.active)
    assert run.status == "done"


def test_queue_is_first_come_first_served(tmp_path):
    store = RunStore(tmp_path / "runs")
    a = store.create("resnet_digits", "mnist5k", {})
    b = store.create("resnet_digits", "mnist5k", {})
    me = os.getpid()
    assert store.claim_slot(b.id, 1, me, "cpu") == "queued"  # a came first
    assert store.claim_slot(a.id, 1, me, "cpu") == "running"
    assert store.claim_slot(b.id, 1, me, "cpu") == "queued"  # the slot is taken
    store.finish(a.id, "done")
    assert store.claim_slot(b.id, 1, me, "cpu") == "running"
    store.finish(b.id, "done")
