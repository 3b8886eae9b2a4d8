"""Per-user quotas (refused with the usage shown) and data roots for folder: datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from wsviz.auth import Actor
from wsviz.data.datasets import dataset_info, load_split
from wsviz.data.loaders import folder_dataset
from wsviz.errors import WsvizError
from wsviz.training.jobs import launch
from wsviz.training.loop import TrainConfig
from wsviz.training.quotas import GB, Quotas, check_launch, usage
from wsviz.training.runstore import RunStore

CFG = TrainConfig(epochs=3, batch_size=64, lr=0.05, max_batches=2)
SPEC = {"model": "resnet_digits", "dataset": "mnist5k", "train_config": CFG.to_dict(), "overrides": {},
        "data_root": None, "device": None, "data_seed": 0}


def test_quota_refusals_name_the_limit_and_the_usage(tmp_path):
    store = RunStore(tmp_path / "runs")
    alice = Actor("alice", "trainer")
    with pytest.raises(WsvizError, match=r"3 epochs is over the limit of 2 epochs per run \(WSVIZ_QUOTA_EPOCHS\)"):
        launch(store, "resnet_digits", "mnist5k", CFG, actor=alice, quotas=Quotas(max_epochs=2))
    run = store.create("resnet_digits", "mnist5k", SPEC, user="alice", role="trainer")
    store.create("resnet_digits", "mnist5k", SPEC, user="bob", role="trainer")  # bob's runs are not alice's
    (Path(run.out_dir) / "blob").write_bytes(b"x" * 3_000_000)
    use = usage(store, "alice")
    assert use.active == 1 and 3_000_000 <= use.disk_bytes < 3_100_000
    with pytest.raises(WsvizError, match=r"'alice' has 1 queued or running run\(s\), the limit is 1"):
        launch(store, "resnet_digits", "mnist5k", CFG, actor=alice, quotas=Quotas(max_active=1))
    check_launch(store, "alice", 3, Quotas(max_active=2))  # one more is allowed
    with pytest.raises(WsvizError, match=r"'alice''s runs take 0\.00 GB of disk, the limit is 0\.002 GB"):
        check_launch(store, "alice", 3, Quotas(max_disk_gb=0.002))
    check_launch(store, "alice", 3, Quotas(max_disk_gb=4_000_000 / GB))
    store.finish(run.id, "cancelled", "cancelled")
    check_launch(store, "alice", 3, Quotas(max_active=1))  # a finished run no longer counts
    assert len(store.list()) == 2  # nothing was recorded by the refused launches


def test_quotas_from_the_environment():
    q = Quotas.from_env({"WSVIZ_QUOTA_RUNS": "2", "WSVIZ_QUOTA_EPOCHS": "50", "WSVIZ_QUOTA_HOURS": "1.5",
                         "WSVIZ_QUOTA_DISK_GB": ""})
    assert q == Quotas(2, 50, 1.5, None) and q.max_seconds == 5400
    with pytest.raises(WsvizError, match="WSVIZ_QUOTA_RUNS must be a number"):
        Quotas.from_env({"WSVIZ_QUOTA_RUNS": "many"})
    with pytest.raises(WsvizError, match="above 0"):
        Quotas.from_env({"WSVIZ_QUOTA_HOURS": "0"})


def _image_folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_folder_datasets_only_under_the_data_roots(tmp_path, monkeypatch):
    inside = _image_folder(tmp_path / "roots" / "data" / "shapes")
    outside = _image_folder(tmp_path / "private")
    monkeypatch.setenv("WSVIZ_DATA_ROOTS", str(tmp_path / "roots" / "data"))
    assert dataset_info(f"folder:{inside}").num_classes == 2
    assert len(load_split(f"folder:{inside}", "train").labels) == 8
    for name in ("folder:/etc", f"folder:{outside}", f"folder:{inside}/../../../private"):
        with pytest.raises(WsvizError, match="not under a data root"):
            dataset_info(name)
    link = tmp_path / "roots" / "data" / "sneaky"
    link.symlink_to(outside)  # a symlink inside a root that leads out of it
    with pytest.raises(WsvizError, match="not under a data root \\(a link or '..' on its way leads out of them\\)"):
        load_split(f"folder:{link}", "train")
    with pytest.raises(WsvizError, match="not under a data root"):
        folder_dataset(link, "train", 0)
    (inside / "b" / "9.png").symlink_to(outside / "a" / "0.png")  # one image that leads out
    with pytest.raises(WsvizError, match="leads out of the data roots"):
        load_split(f"folder:{inside}", "train")
    with pytest.raises(WsvizError, match="leads out of the data roots"):
        folder_dataset(inside, "train", 0)
    (inside / "b" / "9.png").unlink()
    os.symlink(outside / "a", inside / "c")  # a class folder that leads out
    with pytest.raises(WsvizError, match="leads out of the data roots"):
        load_split(f"folder:{inside}", "train")
    monkeypatch.setenv("WSVIZ_DATA_ROOTS", "")
    with pytest.raises(WsvizError, match="no data roots are configured.*WSVIZ_DATA_ROOTS"):
        dataset_info(f"folder:{inside}")
