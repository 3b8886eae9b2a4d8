"""Streamed data: ``torch.utils.data`` datasets and loaders, with the recipes' augmentation.

The training loop has two data paths:

* in memory (the fast path, for the small sets every wsviz dataset but ``folder:`` is): the
  split is one tensor, batched by index permutation;
* streamed (this module): a ``Dataset`` that decodes and transforms one image at a time,
  batched by a ``DataLoader`` with worker processes, pinned memory on CUDA and a
  ``DistributedSampler``. Image folders are always streamed (any resolution, any size: never
  loaded whole); in-memory sets are streamed when a recipe augments them, since
  ``torchvision.transforms.v2`` draws its random crop/flip per image only when it sees one
  image at a time.

Augmentation presets (``augment``), applied to training images only; test images get the
preset's deterministic evaluation transform:

* ``none``: nothing (image folders are letterboxed to the model's input size, as uploads are);
* ``cifar``: pad 1/8 of the side (4 pixels at 32) and crop back at random, horizontal flip;
  evaluation as is (He et al.'s CIFAR protocol);
* ``imagenet``: random-resized crop to the input size, horizontal flip; evaluation resizes the
  short side to 8/7 of the input size (256 for 224, 64 for 56) and takes the centre crop.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from wsviz.errors import WsvizError

AUGMENTS = ("none", "cifar", "imagenet")


def check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise WsvizError(f"augmentation must be one of {AUGMENTS}, got {augment!r}.")


def transforms_for(augment: str, size: int, *, train: bool, from_pil: bool, side: int | None = None):
    """The ``torchvision.transforms.v2`` pipeline of a preset, or None when it does nothing.

    ``size`` is the model's input size; ``side`` the side of in-memory images (their crop size
    for ``cifar``). Images from files (``from_pil``) always end at ``size`` x ``size`` uint8, so
    they can be batched; in-memory images are fitted to the model in the loop, as without
    augmentation.
    """
    from torchvision.transforms import v2

    check_augment(augment)
    steps: list = [v2.ToImage()] if from_pil else []
    letterbox = [v2.Resize(None, max_size=size, antialias=True), v2.CenterCrop(size)]  # pads with black
    if augment == "imagenet":
        if train:
            steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(round(size * 8 / 7), antialias=True), v2.CenterCrop(size)]
    else:
        if from_pil:
            steps += letterbox
        if augment == "cifar" and train:
            crop = size if from_pil or side is None else side
            steps += [v2.RandomCrop(crop, padding=max(1, round(crop / 8))), v2.RandomHorizontalFlip()]
    return v2.Compose(steps) if steps else None


class TensorImages(Dataset):
    """An in-memory split as a map-style dataset, each image transformed on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.labels[i]


def read_image(path: str):
    """An image file as an RGB PIL image (as torchvision's ``ImageFolder`` reads it); a file that
    cannot be decoded is a WsvizError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise WsvizError(f"{path} cannot be read as an image ({exc}): replace it with a readable copy, or remove "
                         "it from the image folder.") from exc


class FolderImages(Dataset):
    """One split of an image folder, each image decoded (and transformed) when read.

    Like torchvision's ``ImageFolder`` (``classes``, ``class_to_idx``, ``samples``, ``targets``),
    but over :func:`wsviz.data.datasets.folder_samples`' listing: the training classes label both
    splits, and the files and split are those :func:`wsviz.data.datasets.load_split` reads.
    """

    def __init__(self, split, transform=None) -> None:
        self.root = str(split.base)
        self.classes = list(split.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = list(split.samples)
        self.targets = [y for _, y in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        x = read_image(path)
        return (self.transform(x) if self.transform is not None else x), target


def folder_dataset(root: str | Path, split: str, seed: int, transform=None) -> Dataset:
    """A ``folder:PATH`` split as a :class:`FolderImages` (decoded per image, never whole).

    The same classes, files and split as :func:`wsviz.data.datasets.load_split`
    (:func:`~wsviz.data.datasets.folder_samples`): ``PATH/train`` and ``PATH/test`` (or
    ``PATH/val``) when present, else each class split 80/20 by its own count, seeded.
    """
    from wsviz.data.datasets import folder_samples

    return FolderImages(folder_samples(Path(root), split, seed), transform)  # only under a data root


def train_loader(ds: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 0, pin_memory: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    """Shuffled batches of this rank's share of ``ds``.

    ``DistributedSampler`` shuffles with ``seed`` and the epoch (``set_epoch``) and pads the
    dataset to a multiple of the world size, so every rank gets ``ceil(len / world)`` images and
    runs the same number of steps (an uneven share crashes gloo and hangs NCCL). The last
    partial batch is dropped when a rank has at least one full batch. ``generator`` seeds the
    workers (their augmentation) and is part of the training state a resumed run restores.
    """
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    share = math.ceil(len(ds) / world_size)
    # Workers start afresh each epoch, seeded from ``generator``: a resumed run's workers then draw
    # the same augmentation as the uninterrupted run's (persistent workers would carry their state).
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=share >= batch_size, persistent_workers=False, generator=generator,
                      prefetch_factor=4 if workers > 0 else None)


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``n`` samples for evaluation: indices ``rank, rank + world, ...``.

    Unlike ``DistributedSampler`` it never pads: the shares differ by at most one sample and
    together hold every index exactly once, so gathered predictions count each sample once
    (evaluation runs no collective per step, so uneven shares cannot hang it).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise WsvizError(f"rank must be in 0..{world_size - 1}, got {rank}.")
        self.n, self.rank, self.world = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def eval_loader(ds: Dataset, batch_size: int, *, workers: int = 0, pin_memory: bool = False, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Batches of ``ds`` in order (this rank's :class:`ShardSampler` share under torchrun)."""
    sampler = ShardSampler(len(ds), rank, world_size) if world_size > 1 else None
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)
