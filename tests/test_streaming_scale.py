"""At dataset scale: memory that does not grow with the number of images, and torchrun shards.

Each test runs its work in fresh processes (peak memory is a process's; torchrun starts its own).
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIDE = 224


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WSVIZ_CACHE_DIR": "off"}


def _folder(root: Path, n_per_class: int) -> Path:
    """ImageNet's layout, train/ and val/, ``n_per_class`` 224-px JPEGs per class in each (8 distinct
    pictures written under many names: decoding cost and memory are a real folder's)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    pictures = []
    for k in range(8):
        base = np.stack([xx, yy, (xx + yy) / 2], -1) if k % 2 else np.stack([yy, xx, 1 - xx], -1)
        buf = io.BytesIO()
        Image.fromarray((base * 200 + 6 * k).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        pictures.append(buf.getvalue())
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n_per_class):
                (d / f"{i}.jpg").write_bytes(pictures[(2 * i + c) % 8])
    return root


BATCH = 8
PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from wsviz.analysis.sweeps import scale_sweep
    from wsviz.data.stream import eval_data
    from wsviz.models import create_model
    from wsviz.training.loop import TrainConfig
    from wsviz.training.run import run_training

    what, folder, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if what == "sweep":
        model = create_model("resnet_digits", base_width=4, depth=8, in_channels=3, input_size=32)
        data = eval_data("folder:" + folder, "test", size=224)  # decoded at 224 px, fitted to the model per batch
        n = scale_sweep({"m": model}, data, scales=(0.5, 1.0), batch_size=batch).samples
    else:  # one training step, then the evaluation of the whole val/ split, streamed
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, max_batches=1)
        card = run_training("resnet_digits", "folder:" + folder, out, cfg,
                            overrides={"base_width": 4, "depth": 8, "in_channels": 3, "input_size": 112})
        n = card["epochs_done"]
    print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # the process's peak
""")


def _peak(what: str, folder: Path, out: Path) -> tuple[int, int]:
    # glibc raises its mmap threshold as large blocks are freed, after which batch-sized buffers come
    # from the heap and fragment it: the peak then creeps with the number of batches (735 / 765 /
    # 787 MB for 150 / 600 / 1,200 images, measured) though no image is held. A fixed threshold
    # returns freed batches to the system, so the peak is what the process holds (716 / 718 / 718 MB).
    env = {**_env(), "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, what, str(folder), str(out), str(BATCH)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, peak = map(int, proc.stdout.split()[-2:])
    return n, peak


@pytest.mark.slow  # four fresh processes over 900 decoded JPEGs: ~50 s on 2 busy cores
def test_sweep_and_one_batch_training_need_no_more_memory_for_twice_the_images(tmp_path):
    # Each measured in a fresh process: ru_maxrss is a process's lifetime peak, and a process that
    # already ran once holds its allocator's leftovers, which are not the data's.
    small, big = _folder(tmp_path / "small", 150), _folder(tmp_path / "big", 300)
    (n_small, sweep_small), (n_big, sweep_big) = _peak("sweep", small, tmp_path / "s"), _peak("sweep", big, tmp_path / "b")
    assert (n_small, n_big) == (300, 600)  # the val/ split: 2 classes x 150, then x 300
    (_, train_small), (_, train_big) = _peak("train", small, tmp_path / "ts"), _peak("train", big, tmp_path / "tb")
    # What the 300 extra images would hold decoded (uint8, 224 px): 45 MB. One batch's working set:
    # 8 images as float at 224 px, each also rescaled and fitted: well under 4 x 8 x 602 kB = 19 MB.
    one_batch = 4 * BATCH * 3 * SIDE * SIDE * 4
    extra_decoded = 300 * 3 * SIDE * SIDE
    assert one_batch < extra_decoded / 2
    assert sweep_big - sweep_small < one_batch, (sweep_small, sweep_big)
    assert train_big - train_small < one_batch, (train_small, train_big)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # one process, then torchrun's four: ~30 s on 2 busy cores
def test_three_torchrun_ranks_sweep_like_one_process_counting_every_sample_once(tmp_path):
    # 100 test digits over 3 ranks: 34 + 33 + 33, no padding, each rank reading its share through a
    # DataLoader (as folders are read); the gathered sweep is the one (in-memory) process's
    ck = [str(ROOT / "checkpoints" / n) for n in ("scale-resnet20", "scale-msws-shared")]
    args = ["-m", "wsviz", "scale", "--checkpoint", *ck, "--dataset", "mnist5k-scale", "--limit", "100",
            "--values", "0.5", "1.0", "--batch-size", "16", "--no-cache"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
                            f"--master_port={_free_port()}", *args, "--loader", "stream", "--out", str(tmp_path / "three")],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert three.returncode == 0, three.stderr[-3000:]
    assert three.stdout.count("wrote") == one.stdout.count("wrote") == 4  # rank 0 alone writes, once
    info = json.loads((tmp_path / "three" / "scale_sweep.json").read_text())
    assert (info["ranks"], info["samples"], info["samples_per_rank"]) == (3, 100, [34, 33, 33])
    assert _rows(tmp_path / "three" / "scale_sweep.csv") == _rows(tmp_path / "one" / "scale_sweep.csv")
    p1, p3 = np.load(tmp_path / "one" / "scale_predictions.npz"), np.load(tmp_path / "three" / "scale_predictions.npz")
    assert sorted(p1.files) == sorted(p3.files) and all(np.array_equal(p1[k], p3[k]) for k in p1.files)
    assert p3["model:scale-resnet20"].shape == (2, 100)
