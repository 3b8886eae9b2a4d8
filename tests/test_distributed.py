"""torchrun: uneven shares, several nodes. Each test trains one tiny epoch on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from wsviz.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "wsviz.train", "--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "1", "--device", "cpu",
         "--quiet", "--set", "base_width=4", "--set", "depth=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _saved_once(out: Path, stdout: str) -> dict:
    assert stdout.count("test accuracy") == 1  # only global rank 0 reports and saves
    assert sorted(os.listdir(out)) == ["card.json", "weights.safetensors"]
    assert len(list(Path(f"{out}.tensorboard").iterdir())) == 1  # beside it, one event file: one writer
    card = json.loads((out / "card.json").read_text())
    assert card["complete"] and card["epochs_done"] == 1
    load_checkpoint(out)
    return card


def test_three_processes_with_uneven_shares_finish_and_save_once(tmp_path):
    # 4,000 images, 3 ranks, batch 667: an uneven split gives rank 0 two steps and the others one,
    # and the collective of rank 0's second step never returns (gloo: "Connection closed by peer").
    # DistributedSampler pads to 1,334 images a rank: two steps each.
    out = tmp_path / "ddp3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", f"--master_port={free_port()}",
           *TRAIN, "--out", str(out), "--batch-size", "667"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = _saved_once(out, proc.stdout)
    assert card["metrics"][0]["epoch"] == 1
    # the card says how it was trained: 3 processes, each with its own --batch-size
    assert card["world_size"] == 3 and card["effective_batch_size"] == 667
    assert card["command"].startswith("torchrun --nproc_per_node 3 -m wsviz.train ")


def test_two_nodes_on_localhost_train_one_model_and_save_it_once(tmp_path):
    out = tmp_path / "nodes"
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               *TRAIN, "--out", str(out), "--batch-size", "64", "--max-batches", "3"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for rank in (0, 1)]
    try:
        results = [n.communicate(timeout=600) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, (_, err) in zip(nodes, results, strict=True):
        assert n.returncode == 0, err[-3000:]
    assert "test accuracy" in results[0][0] and "test accuracy" not in results[1][0]  # node 0 holds global rank 0
    _saved_once(out, results[0][0] + results[1][0])
