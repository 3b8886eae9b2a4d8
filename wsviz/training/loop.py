"""The training loop: one readable function for every registered model.

Around it (not inside it): configuration and its validation, evaluation, checkpointing
through a callback, devices. Data are in-memory tensors (every wsviz dataset fits), batched
by index permutation, so the loop costs no more than a plain PyTorch loop.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsviz.data.datasets import fit_to
from wsviz.errors import WsvizError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "step", "multistep", "cosine")


@dataclass
class TrainConfig:
    """Hyperparameters. Defaults follow the papers' SGD recipe (lr 0.1, momentum 0.9, wd 1e-4)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    step_size: int = 30  # "step": multiply lr by gamma every step_size epochs
    milestones: tuple[int, ...] = ()  # "multistep": epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    seed: int = 0
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    max_batches: int | None = None  # cap per epoch, for smoke runs

    def validate(self) -> None:
        """Refuse absurd values with a message saying what range is sensible."""
        def bad(msg: str) -> None:
            raise WsvizError(msg)

        if not isinstance(self.epochs, int) or not 1 <= self.epochs <= 10_000:
            bad(f"epochs must be a whole number from 1 to 10000, got {self.epochs!r}.")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 65_536:
            bad(f"batch size must be a whole number from 1 to 65536, got {self.batch_size!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 10):
            bad(f"learning rate must be in (0, 10], got {self.lr!r}; the papers use 0.1 (SGD) or 1e-3 (Adam).")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if not 0 <= self.weight_decay <= 1:
            bad(f"weight decay must be in [0, 1], got {self.weight_decay!r}.")
        if not 0 < self.gamma <= 1:
            bad(f"gamma must be in (0, 1], got {self.gamma!r}.")
        if self.max_batches is not None and self.max_batches < 1:
            bad(f"max_batches must be at least 1, got {self.max_batches!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float
    images_per_s: float


@dataclass
class TrainResult:
    epochs: list[EpochMetrics] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def test_acc(self) -> float:
        return self.epochs[-1].test_acc if self.epochs else float("nan")


class TrainingFailed(WsvizError):
    """The run cannot go on (NaN loss...); the message says why and what to try."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma)
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    return None


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
             device: torch.device | str = "cpu") -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) of ``model`` in eval mode."""
    model.eval()
    c, h = _in_shape(model)
    total, correct, preds = 0.0, 0, []
    for i in range(0, len(labels), batch_size):
        x = fit_to(images[i:i + batch_size].to(device), c, h)
        y = labels[i:i + batch_size].to(device)
        out = model(x)
        total += float(F.cross_entropy(out, y, reduction="sum"))
        p = out.argmax(1)
        correct += int((p == y).sum())
        preds.append(p.cpu())
    n = max(len(labels), 1)
    return total / n, correct / n, torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _in_shape(model: nn.Module) -> tuple[int, int]:
    m = getattr(model, "module", model)  # DDP wraps the model
    cfg = m.wsviz_config
    return cfg["in_channels"], cfg["input_size"]


def train(
    model: nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TrainResult:
    """Train ``model`` on ``train_data`` and evaluate on ``test_data`` after every epoch.

    ``on_epoch(metrics)`` runs after each evaluation (checkpointing, run store);
    ``on_step(epoch, step, loss)`` after each optimiser step (progress bars). With
    ``world_size > 1`` each rank trains on its own shard of every epoch's permutation
    (``model`` is already wrapped in DistributedDataParallel) and only rank 0 evaluates.
    """
    cfg.validate()
    seed_everything(cfg.seed)
    device = torch.device(device)
    images, labels = train_data
    c, h = _in_shape(model)
    model.to(device)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(labels), generator=gen)[rank::world_size]
        steps = len(perm) // cfg.batch_size if len(perm) >= cfg.batch_size else 1
        if cfg.max_batches:
            steps = min(steps, cfg.max_batches)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = fit_to(images[idx].to(device, non_blocking=True), c, h)
            y = labels[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(x)
                loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise TrainingFailed(f"The loss became {float(loss.detach())} at epoch {epoch}, step {step + 1}: training diverged. "
                                     f"Lower the learning rate (now {opt.param_groups[0]['lr']:g}).")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n = len(y)
            loss_sum += float(loss.detach()) * n
            correct += int((out.detach().argmax(1) == y).sum())
            seen += n
            if on_step:
                on_step(epoch, step + 1, float(loss.detach()))
        train_seconds = time.perf_counter() - t0
        lr = opt.param_groups[0]["lr"]
        if sched is not None:
            sched.step()
        if rank == 0:
            eval_model = getattr(model, "module", model)
            test_loss, test_acc, _ = evaluate(eval_model, *test_data, device=device)
            m = EpochMetrics(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), test_loss, test_acc, lr,
                             time.perf_counter() - t0, seen * world_size / max(train_seconds, 1e-9))
            result.epochs.append(m)
            if on_epoch:
                on_epoch(m)
    result.seconds = time.perf_counter() - start
    return result
