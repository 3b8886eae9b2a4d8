"""Under torchrun every rank draws its own augmentation (random crops and flips), reproducibly: the same
(seed, rank, epoch) draws the same, so a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from wsviz.data.loaders import TensorImages, transforms_for
from wsviz.training.loop import TrainConfig, _Batches, seed_everything


def _dots(rank: int, world: int, workers: int, epoch: int = 1, seed: int = 0) -> list[tuple[int, int]]:
    """Where each image's single bright dot landed after the cifar preset's random crop and flip."""
    imgs = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    imgs[:, :, 16, 16] = 255
    ds = TensorImages(imgs, torch.arange(64), transforms_for("cifar", 32, train=True, from_pil=False, side=32))
    cfg = TrainConfig(epochs=1, batch_size=8, augment="cifar", workers=workers, seed=seed)
    seed_everything(cfg.seed)  # as train() does on every rank
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _Batches(ds, cfg, rank, world, gen, torch.device("cpu"), 32)
    out = []
    for xb, _ in batches.epoch(epoch):
        for im in xb:
            p = (im[0] > 0).nonzero()
            out.append(tuple(p[0].tolist()) if len(p) else (-1, -1))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_draw_different_augmentation_and_each_rank_repeats_itself(workers):
    r0, r1 = _dots(0, 2, workers), _dots(1, 2, workers)
    assert sum(a == b for a, b in zip(r0, r1)) < len(r0) // 2, (r0, r1)  # not the same crops on both ranks
    assert _dots(1, 2, workers) == r1  # reproducible per rank
    assert _dots(1, 2, workers, epoch=2) != r1  # and new draws each epoch
