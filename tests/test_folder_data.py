"""Image folders (``folder:PATH``): one class list, one file listing and one split for every reader.

``datasets.load_split`` (the app's analyses, tying calibration, the CLI) and ``loaders.folder_dataset``
(training, ``stream.eval_data``) must see the same classes, the same files and the same split, so a
"test" image is never a training image and a label means the same class in both splits. Every image
written here is a solid 32x32 colour whose red channel is its id, so an image is recognised after
decoding (no resizing at 32 px) and a split can be compared file by file across the readers.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsviz.data.datasets import dataset_info, fit_to, load_split
from wsviz.data.loaders import folder_dataset, transforms_for
from wsviz.data.stream import eval_data, take
from wsviz.errors import WsvizError

_NEXT = [1]


def _img(path: Path, side: int = 32) -> int:
    """A solid image whose red value is a fresh id (1..255), returned."""
    ident = _NEXT[0]
    _NEXT[0] = ident % 255 + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (ident, 90, 200)).save(path)
    return ident


def _fill(folder: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        _img(folder / f"{i:03d}.png")


def _ids(images: torch.Tensor) -> list[int]:
    """The id (red value at the centre) of each decoded image, whatever its dtype."""
    x = fit_to(images, 3, images.shape[-1])
    c = images.shape[-1] // 2
    return (x[:, 0, c, c] * 255).round().long().tolist()


def _streamed(root: Path, split: str, seed: int = 0, size: int = 32, augment: str = "none"):
    ds = folder_dataset(root, split, seed, transforms_for(augment, size, train=False, from_pil=True))
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


# ------------------------------------------------------------- 1. one class list for both splits
def test_a_test_split_with_fewer_classes_keeps_the_training_class_numbers(tmp_path):
    root = tmp_path / "insects"
    for c in ("ant", "bee", "cat"):
        _fill(root / "train" / c, 4)
    for c in ("ant", "cat"):  # no bees to test on
        _fill(root / "val" / c, 3)
    ds = folder_dataset(root, "test", 0)
    assert ds.classes == ["ant", "bee", "cat"]
    truth = [("ant", "bee", "cat").index(Path(p).parent.name) for p, _ in ds.samples]
    assert ds.targets == truth and sorted(set(truth)) == [0, 2]  # cat is 2, as in training, not 1 (= bee)
    te = load_split(f"folder:{root}", "test")  # crashed with a raw FileNotFoundError (no val/bee)
    assert te.labels.tolist() == truth
    assert folder_dataset(root, "train", 0).targets == [0] * 4 + [1] * 4 + [2] * 4


def test_a_test_class_that_training_lacks_is_refused(tmp_path):
    root = tmp_path / "insects"
    for c in ("ant", "bee"):
        _fill(root / "train" / c, 4)
    for c in ("ant", "dog"):
        _fill(root / "test" / c, 2)
    for read in (lambda: dataset_info(f"folder:{root}"), lambda: load_split(f"folder:{root}", "test"),
                 lambda: folder_dataset(root, "test", 0), lambda: folder_dataset(root, "train", 0)):
        with pytest.raises(WsvizError, match=r"'dog'.*train"):
            read()


# --------------------------------------------------------- 2. one listing, one split, one decode
def _awkward(root: Path) -> Path:
    """The review's repro: a, b with 20 images each, a/extra/ with 10 more, a hidden b/.hidden.png,
    a hidden folder of each kind (a notebook checkpoint folder beside the classes and inside one)."""
    _NEXT[0] = 1  # 53 distinct ids
    _fill(root / "a", 20)
    _fill(root / "a" / "extra", 10)
    _fill(root / "b", 20)
    _img(root / "b" / ".hidden.png")
    _img(root / ".ipynb_checkpoints" / "0.png")
    _img(root / "b" / ".ipynb_checkpoints" / "0.png")
    return root


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_both_readers_put_the_same_files_in_the_same_split(tmp_path, seed):
    root = _awkward(tmp_path / "awkward")
    splits = {}
    for split in ("train", "test"):
        mem = load_split(f"folder:{root}", split, seed=seed)
        images, labels = _streamed(root, split, seed)
        assert _ids(mem.images) == _ids(images) and mem.labels.tolist() == labels.tolist()
        assert torch.equal(fit_to(mem.images, 3, 32), fit_to(images, 3, 32))  # the same pixels
        splits[split] = (set(_ids(images)), labels.bincount().tolist())
    (train_ids, train_counts), (test_ids, test_counts) = splits["train"], splits["test"]
    assert not train_ids & test_ids  # no test image was trained on
    assert train_counts == [24, 16] and test_counts == [6, 4]  # a: 20 + 10 nested; b: hidden file skipped


def test_hidden_folders_are_not_classes(tmp_path):
    root = _awkward(tmp_path / "awkward")
    assert dataset_info(f"folder:{root}").num_classes == 2
    assert folder_dataset(root, "train", 0).classes == ["a", "b"]
    split = tmp_path / "split"
    for c in ("a", "b"):
        _fill(split / "train" / c, 3)
        _fill(split / "val" / c, 1)
    _img(split / "train" / ".ipynb_checkpoints" / "x.png")
    _img(split / "val" / ".cache" / "x.png")
    assert dataset_info(f"folder:{split}").num_classes == 2
    assert len(load_split(f"folder:{split}", "test").labels) == 2
    assert folder_dataset(split, "test", 0).classes == ["a", "b"]


def test_a_train_folder_without_test_or_val_is_refused(tmp_path):
    root = tmp_path / "half"
    for c in ("a", "b"):
        _fill(root / "train" / c, 5)
    for read in (lambda: dataset_info(f"folder:{root}"), lambda: load_split(f"folder:{root}", "train"),
                 lambda: folder_dataset(root, "train", 0), lambda: folder_dataset(root, "test", 0)):
        with pytest.raises(WsvizError, match=r"train/ but neither test/ nor val/"):
            read()


@pytest.mark.parametrize("augment", ["none", "imagenet"])
def test_load_split_decodes_a_folder_at_the_models_size_like_the_evaluation_transform(tmp_path, augment):
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    te = load_split(f"folder:{root}", "test", size=48, augment=augment)
    images, labels = _streamed(root, "test", size=48, augment=augment)
    assert te.images.shape == (2, 3, 48, 48)
    assert torch.equal(fit_to(te.images, 3, 48), fit_to(images, 3, 48)) and torch.equal(te.labels, labels)
    data = eval_data(f"folder:{root}", "test", size=48, augment=augment)
    assert torch.equal(fit_to(take(data)[0], 3, 48), fit_to(te.images, 3, 48))
    assert load_split(f"folder:{root}", "test").images.shape == (2, 3, 32, 32)  # the default stays 32 px
    with pytest.raises(WsvizError, match="size"):
        load_split(f"folder:{root}", "test", size=0)


# ----------------------------------------------------------------- 3. 80/20 per class, by its count
def test_each_class_is_split_80_20_by_its_own_count(tmp_path):
    root = tmp_path / "uneven"
    _fill(root / "few", 10)
    _fill(root / "many", 100)
    _fill(root / "one", 1)
    _fill(root / "two", 2)
    for split, counts in (("train", [8, 80, 1, 1]), ("test", [2, 20, 0, 1])):
        assert load_split(f"folder:{root}", split).labels.bincount(minlength=4).tolist() == counts
        assert np.bincount(folder_dataset(root, split, 0).targets, minlength=4).tolist() == counts


def test_empty_splits_are_refused_with_what_to_do(tmp_path):
    root = tmp_path / "empty_class"
    _fill(root / "a", 5)
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("no images here")
    for read in (lambda: load_split(f"folder:{root}", "train"), lambda: folder_dataset(root, "train", 0)):
        with pytest.raises(WsvizError, match=r"'b' has no images"):
            read()
    singles = tmp_path / "singles"
    _fill(singles / "a", 1)
    _fill(singles / "b", 1)
    assert len(folder_dataset(singles, "train", 0)) == 2
    for read in (lambda: load_split(f"folder:{singles}", "test"), lambda: folder_dataset(singles, "test", 0)):
        with pytest.raises(WsvizError, match=r"no test images.*at least two images"):
            read()
    split = tmp_path / "split"
    _fill(split / "train" / "a", 3)
    (split / "train" / "b").mkdir(parents=True)
    (split / "val" / "a").mkdir(parents=True)
    with pytest.raises(WsvizError, match=r"'b' has no images"):
        folder_dataset(split, "train", 0)
    with pytest.raises(WsvizError, match=r"No images .*val"):
        folder_dataset(split, "test", 0)


# ------------------------------------------------------------------------- 4. bad input, WsvizError
def _idx_gz(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(head + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("damage", ["truncated", "cut_gzip", "empty", "labels_short"])
def test_a_damaged_fashion_mnist_file_names_the_file_and_what_to_do(tmp_path, monkeypatch, damage):
    import wsviz.data.datasets as datasets

    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    _idx_gz(fm / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28)))
    _idx_gz(fm / "train-labels-idx1-ubyte.gz", np.arange(6))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION", fm)
    assert load_split("fashion-mnist", "train").labels.tolist() == list(range(6))  # the fixture itself reads
    bad = fm / ("train-labels-idx1-ubyte.gz" if damage == "labels_short" else "train-images-idx3-ubyte.gz")
    if damage == "truncated":  # a whole gzip stream of too few pixels
        raw = gzip.decompress(bad.read_bytes())
        bad.write_bytes(gzip.compress(raw[:500]))
    elif damage == "cut_gzip":  # the download stopped half way
        bad.write_bytes(bad.read_bytes()[:40])
    elif damage == "empty":
        bad.write_bytes(gzip.compress(b""))
    else:  # 5 labels for 6 images
        _idx_gz(bad, np.arange(5))
    with pytest.raises(WsvizError, match=rf"{bad.name}.*(reinstall|download)"):
        load_split("fashion-mnist", "train")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_torchvision_mnist_names_the_folder_and_what_to_do(tmp_path, damage):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for p in ("train", "t10k"):
        for kind, arr in (("images-idx3", np.zeros((5, 28, 28))), ("labels-idx1", np.zeros(5))):
            head = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
            (raw / f"{p}-{kind}-ubyte").write_bytes(head + arr.astype(np.uint8).tobytes())
    assert len(load_split("mnist", "train", data_root=tmp_path).labels) == 5
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000] if damage == "truncated" else b"garbage" * 10)
    with pytest.raises(WsvizError, match=r"corrupt.*MNIST.*delete"):
        load_split("mnist", "train", data_root=tmp_path)


def test_take_of_no_samples_and_a_negative_limit_are_refused():
    data = eval_data("mnist5k", "test", limit=20)
    with pytest.raises(WsvizError, match="indices"):
        take(data, [])
    with pytest.raises(WsvizError, match="indices"):
        take(data, [0, 20])
    for k in (-1, -20):
        with pytest.raises(WsvizError, match="limit"):
            eval_data("mnist5k", "test", limit=k)
    assert take(data, [3, 5])[0].shape == (2, 1, 28, 28)
    assert len(eval_data("mnist5k", "test", limit=0)) == 1000  # 0 (like None) is the whole split


# ------------------------------------------------------------- 5. what the analyses take of a folder
def _large_folder(root: Path, side: int = 100) -> None:
    for c in ("a", "b"):
        for i in range(10):
            _img(root / c / f"{i:03d}.png", side)


def test_a_models_sample_of_a_folder_is_decoded_at_its_size_not_a_thumbnail_in_a_black_canvas(tmp_path):
    import torch.nn as nn

    import wsviz
    from wsviz.data.stream import model_sample

    root = tmp_path / "big"
    _large_folder(root)
    net = wsviz.adopt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval(),
                      (3, 64, 64))
    x, y, total = model_sample(f"folder:{root}", "train", net, 6)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.float32 and total == 16
    assert float((x.abs().sum(1) > 0).float().mean()) == 1.0  # the whole canvas is image
    assert sorted(set(y.tolist())) == [0, 1]  # spread over the classes
    want, _ = take(eval_data(f"folder:{root}", "train", size=64), [0, 3, 6, 9, 12, 15])
    assert torch.allclose(x, want.float() / 255 if want.dtype == torch.uint8 else want)


def test_tying_calibration_takes_a_folder_at_the_models_size(tmp_path):
    import torch.nn as nn

    import wsviz
    from wsviz.training.tying import calibration_images

    root = tmp_path / "big"
    _large_folder(root)
    net = wsviz.adopt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval(),
                      (3, 64, 64))
    x = calibration_images(f"folder:{root}", 4, net)
    assert x.shape == (4, 3, 64, 64) and float((x.abs().sum(1) > 0).float().mean()) == 1.0  # was 25%: 32 px padded
