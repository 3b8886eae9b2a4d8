"""What a training run records and refuses is true: finished runs survive a --resume, a resume with
another length follows the new schedule, DDP cards say how they were trained, a SIGTERM cannot split
a checkpoint, bad schedules are refused up front and a diverged run says so."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from wsviz import WsvizError
from wsviz.data.datasets import load_split
from wsviz.train import main
from wsviz.training.loop import TrainConfig, train
from wsviz.training.run import _effective_batch, build_for_dataset, make_card, reproduce_command
from wsviz.training.state import save_state, state_path

SMALL = {"base_width": 4, "depth": 8}
ARGS = ["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "2", "--batch-size", "32", "--max-batches",
        "2", "--device", "cpu", "--quiet", "--tensorboard", "none", "--set", "base_width=4", "--set", "depth=8"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ----------------------------------------------------------------- 1. finished and killed runs are kept
def test_resume_of_a_finished_run_does_nothing_and_a_fresh_start_does_not_wipe_it(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main([*ARGS, "--out", str(out)]) == 0
    before = _files(out)
    assert json.loads(before["card.json"])["complete"]

    # The SLURM script always passes --resume: a requeue after completion is a successful no-op.
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert _files(out) == before
    # Another length (or other options) cannot continue a complete run: refused, nothing touched.
    capsys.readouterr()
    assert main([*ARGS, "--epochs", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "complete" in err and "--init-from" in err and "--out" in err
    assert _files(out) == before
    # A fresh start into it is refused unless --overwrite.
    assert main([*ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert _files(out) == before
    assert main([*ARGS, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert main([*ARGS, "--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / "card.json").read_text())["train_config"]["seed"] == 1


def test_a_fresh_start_does_not_wipe_a_killed_runs_state(tmp_path, capsys):
    out = tmp_path / "ck"
    save_state(state_path(out), {"epoch": 1, "run": {"model": "resnet_digits"}})
    state = state_path(out).read_bytes()
    assert main([*ARGS, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert state_path(out).read_bytes() == state and not out.exists()
    assert main([*ARGS, "--out", str(out), "--overwrite"]) == 0  # the stale state goes, the run completes
    assert not state_path(out).exists() and json.loads((out / "card.json").read_text())["complete"]


def test_an_overwrite_that_fails_to_start_keeps_the_killed_runs_state(tmp_path, capsys):
    out = tmp_path / "ck"
    save_state(state_path(out), {"epoch": 1, "run": {"model": "resnet_digits"}})
    state = state_path(out).read_bytes()
    empty = tmp_path / "no-data"
    empty.mkdir()
    args = [a if a != "mnist5k" else "cifar10" for a in ARGS]  # a dataset that is not there
    assert main([*args, "--data-root", str(empty), "--out", str(out), "--overwrite"]) == 2
    assert "cifar10" in capsys.readouterr().err
    assert state_path(out).read_bytes() == state  # nothing was started, so nothing is lost


# ----------------------------------------------------------------- 2. a resume with another length
def _data(n: int = 256):
    tr, te = load_split("mnist5k", "train"), load_split("mnist5k", "test")
    return (tr.images[:n], tr.labels[:n]), (te.images[:64], te.labels[:64])


def _lrs(cfg: TrainConfig, resume=None, stop_after: int | None = None):
    torch.manual_seed(0)
    model = build_for_dataset("resnet_digits", "mnist5k", SMALL)
    saved = {}

    def on_state(s):
        saved["state"] = s
        if s["epoch"] == stop_after:
            raise KeyboardInterrupt

    train_data, test_data = _data()
    try:
        res = train(model, train_data, test_data, cfg, resume=resume, on_state=on_state)
    except KeyboardInterrupt:
        return saved["state"]
    return [m.lr for m in res.epochs]


def _cosine(epochs: int, steps: int = 1, lr: float = 0.1) -> list[float]:
    return [lr * (1 + math.cos(math.pi * (e * steps) / (epochs * steps))) / 2 for e in range(epochs)]


@pytest.mark.parametrize("change", [{"epochs": 8}, {"epochs": 8, "step_schedule": True},
                                    {"max_batches": 3, "step_schedule": True}])
def test_a_resume_with_another_length_follows_the_new_cosine_schedule(change):
    step = change.get("step_schedule", False)
    cfg = TrainConfig(epochs=4, batch_size=32, max_batches=2, step_schedule=step)
    state = _lrs(cfg, stop_after=2)
    new = TrainConfig(**{**cfg.to_dict(), "milestones": (), **change})
    lrs = _lrs(new, resume=state)
    want = _cosine(new.epochs, new.max_batches if step else 1)
    assert lrs[:2] == pytest.approx(_cosine(4, 2 if step else 1)[:2])  # the epochs run before the resume
    assert lrs[2:] == pytest.approx(want[2:], abs=1e-9)  # then the new length's curve from where it is
    assert max(lrs[2:]) <= lrs[1]  # never climbs back up


# ----------------------------------------------------------------- 3. DDP cards
def test_the_card_of_a_torchrun_run_records_its_processes_and_command():
    cfg = TrainConfig(epochs=1, amp=False)
    cmd = reproduce_command("resnet_digits", "mnist5k", cfg, {}, "out", 0, world_size=3)
    assert cmd.startswith("torchrun --nproc_per_node 3 -m wsviz.train ") and "--no-amp" in cmd.split()
    assert reproduce_command("resnet_digits", "mnist5k", TrainConfig(epochs=1), {}, "out", 0).startswith(
        "python -m wsviz.train ")
    assert "--no-amp" not in reproduce_command("resnet_digits", "mnist5k", TrainConfig(epochs=1), {}, "out", 0)
    from wsviz.training.loop import TrainResult

    model = build_for_dataset("resnet_digits", "mnist5k", SMALL)
    card = make_card(model, "mnist5k", cfg, TrainResult(), torch.device("cpu"), 0, cmd, True, {}, world_size=3)
    assert card["world_size"] == 3


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(build_for_dataset("resnet_digits", "mnist5k", SMALL))
        losses: list[float] = []
        train_data, test_data = _data(128)
        res = train(model, train_data, test_data, TrainConfig(epochs=1, batch_size=16, max_batches=2), rank=rank,
                    world_size=world, on_step=lambda e, s, loss: losses.append(loss))
        every = [None] * world
        dist.all_gather_object(every, losses)
        if rank == 0:
            Path(out).write_text(json.dumps({"train_loss": res.epochs[0].train_loss, "losses": every}))
    finally:
        dist.destroy_process_group()


def test_ddp_train_loss_is_over_every_process():
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
        got = json.loads(Path(out).read_text())
    every = [x for losses in got["losses"] for x in losses]  # equal batches: the mean of all steps of all ranks
    assert got["losses"][0] != got["losses"][1]
    assert got["train_loss"] == pytest.approx(sum(every) / len(every), rel=1e-6)


# ----------------------------------------------------------------- 4. SIGTERM between the renames
def test_a_sigterm_between_the_renames_waits_until_the_card_is_in_place(tmp_path, monkeypatch):
    from wsviz.training import checkpoint as ck

    class Stop(Exception):
        pass

    def raise_stop(signum, frame):
        raise Stop

    model = build_for_dataset("resnet_digits", "mnist5k", SMALL)
    ck.save_checkpoint(tmp_path, model, {"model": "resnet_digits", "config": model.wsviz_config, "epochs_done": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real = os.replace

    def replace_then_term(a, b):
        real(a, b)
        if str(b).endswith(ck.WEIGHTS):
            signal.pthread_kill(bystander.ident, signal.SIGTERM)  # delivered to another thread of the process
            time.sleep(0.2)  # long enough for that thread to take it: no race left for the old code to win

    # a trainer has other threads (DataLoader, TensorBoard, tqdm): the OS may deliver the signal to any
    # of them, so holding it must not depend on which thread's signal mask is set
    done = threading.Event()
    bystander = threading.Thread(target=done.wait, daemon=True)
    bystander.start()
    old = signal.signal(signal.SIGTERM, raise_stop)
    monkeypatch.setattr(ck.os, "replace", replace_then_term)
    try:
        with pytest.raises(Stop):  # the handler still runs: after both renames
            ck.save_checkpoint(tmp_path, model, {"model": "resnet_digits", "config": model.wsviz_config,
                                                 "epochs_done": 2})
    finally:
        signal.signal(signal.SIGTERM, old)
        done.set()
        bystander.join()
    monkeypatch.undo()
    loaded, card = ck.load_checkpoint(tmp_path)
    assert card["epochs_done"] == 2
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- 5. and 6. bad settings
@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"schedule": "step", "step_size": 0}, "step size"),
    ({"schedule": "step", "step_size": -1}, "step size"),
    ({"schedule": "multistep", "milestones": (5, -2), "epochs": 3}, "milestones"),
    ({"schedule": "multistep", "milestones": (0, 2), "epochs": 3}, "finished epochs >= 1"),
    ({"schedule": "multistep", "milestones": (2, 2), "epochs": 3}, "strictly increasing"),
    ({"optimizer": "adam", "lr": 5.0}, "Adam"),
])
def test_bad_schedules_and_rates_are_refused_before_training(kwargs, needle):
    with pytest.raises(WsvizError, match=needle):
        TrainConfig(**kwargs).validate()


def test_the_cli_refuses_a_zero_step_size_before_training(tmp_path, capsys):
    assert main([*ARGS, "--schedule", "step", "--step-size", "0", "--out", str(tmp_path / "ck")]) == 2
    assert "step size" in capsys.readouterr().err and not (tmp_path / "ck").exists()


def test_milestones_after_the_last_epoch_are_warned_about():
    assert TrainConfig(epochs=3, schedule="multistep", milestones=(2, 5)).notes()
    assert not TrainConfig(epochs=3, schedule="multistep", milestones=(1, 2)).notes()


def test_a_diverged_run_says_so_in_its_card(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main([*ARGS, "--lr", "10", "--momentum", "0.99", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["diverged"] is True and "lower --lr" in card["diverged_reason"]
    assert card["metrics"][-1]["train_loss"] > 3 * math.log(10)
    assert "diverged" in capsys.readouterr().err
    assert main([*ARGS, "--out", str(tmp_path / "ok")]) == 0
    assert "diverged" not in json.loads((tmp_path / "ok" / "card.json").read_text())


def test_a_batch_larger_than_the_training_set_is_noted_and_recorded(caplog):
    data = (torch.zeros(100, 1, 28, 28), torch.zeros(100, dtype=torch.long))
    assert _effective_batch(data, TrainConfig(batch_size=64), 1, 0) == 64
    with caplog.at_level("WARNING"):
        assert _effective_batch(data, TrainConfig(batch_size=500), 1, 0) == 100
        assert _effective_batch(data, TrainConfig(batch_size=500), 3, 0) == 34
    assert "larger than the training set" in caplog.text
