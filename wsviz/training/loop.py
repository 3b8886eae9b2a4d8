"""The training loop: one readable function for every registered model.

Around it (not inside it): configuration and its validation, evaluation, checkpointing
through callbacks, devices. Data come two ways: in-memory tensors batched by index
permutation (the fast path: the loop costs no more than a plain PyTorch loop), or a
``torch.utils.data.Dataset`` streamed through a ``DataLoader`` with workers and a
``DistributedSampler`` (image folders, and sets a recipe augments image by image). Under
torchrun every rank runs the same number of steps in both.

The full training state is captured after every epoch (``on_state``) and can be handed back
(``resume``): a resumed run ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsviz.data.datasets import fit_to
from wsviz.data.loaders import AUGMENTS, eval_loader, train_loader
from wsviz.errors import WsvizError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "step", "multistep", "cosine", "plateau")
LOADERS = ("auto", "memory", "stream")
MAX_ADAM_LR = 1.0
MAX_SEED = 2**63 - 1  # torch's generators take at most 2**64 - 1; the data protocols draw with 2 * seed + 1


def check_seed(value: Any, what: str = "seed") -> None:
    """Refuse a seed torch's and NumPy's generators cannot take (a huge one overflowed deep inside torch)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise WsvizError(f"{what} must be a whole number from 0 to 2**63 - 1, got {value!r}.")


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
    milestones: tuple[int, ...] = ()  # "multistep": lr multiplied by gamma after each of these epochs
    gamma: float = 0.1
    seed: int = 0
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    max_batches: int | None = None  # cap per epoch, for smoke runs
    augment: str = "none"  # augmentation preset of the training images (wsviz.data.loaders)
    warmup_epochs: int = 0  # first epochs at lr / 10 (WSMS-Net's CIFAR ResNet-110)
    plateau_patience: int = 10  # "plateau": epochs without a better test accuracy before lr *= gamma
    loader: str = "auto"  # "memory", "stream" (DataLoader), or "auto": stream folders and augmented sets
    workers: int = 0  # DataLoader worker processes (streamed path)
    step_schedule: bool = False  # anneal the cosine schedule every optimiser step, not every epoch (short fine-tunes)
    distill: float = 0.0  # temperature of distillation from train()'s ``teacher`` (0: learn from the labels only)
    distill_weight: float = 1.0  # the distillation term's share of the loss (the labels' cross-entropy has the rest)
    average_last: int = 0  # average the weights and BatchNorm statistics of the last N optimiser steps (0: none)
    # feature distillation: this weight times the relative error of the output of every block holding a tied conv
    # to the teacher's output of the same block, added to the loss (wsviz.training.tying.feature_distillation)
    feature_distill: float = 0.0

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
        if self.optimizer == "adam" and self.lr > MAX_ADAM_LR:
            bad(f"Adam's learning rate must be at most {MAX_ADAM_LR:g}, got {self.lr!r}: Adam's steps are about lr in "
                "size whatever the gradient, so a larger rate only diverges. 1e-3 is usual.")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if not 0 <= self.weight_decay <= 1:
            bad(f"weight decay must be in [0, 1], got {self.weight_decay!r}.")
        if not 0 < self.gamma <= 1:
            bad(f"gamma must be in (0, 1], got {self.gamma!r}.")
        if isinstance(self.step_size, bool) or not isinstance(self.step_size, int) or self.step_size < 1:
            bad(f"step size must be a whole number of epochs >= 1 (the step schedule multiplies the rate by gamma "
                f"every step_size epochs), got {self.step_size!r}.")
        ms = tuple(self.milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms):
            bad(f"milestones must be whole numbers of finished epochs >= 1 (the rate drops after each), got {list(ms)}.")
        if any(b <= a for a, b in itertools.pairwise(ms)):
            bad(f"milestones must be strictly increasing, got {list(ms)}.")
        check_seed(self.seed)
        if self.max_batches is not None and self.max_batches < 1:
            bad(f"max_batches must be at least 1, got {self.max_batches!r}.")
        if self.augment not in AUGMENTS:
            bad(f"augmentation must be one of {AUGMENTS}, got {self.augment!r}.")
        if self.loader not in LOADERS:
            bad(f"loader must be one of {LOADERS}, got {self.loader!r}.")
        if not isinstance(self.workers, int) or not 0 <= self.workers <= 256:
            bad(f"workers must be a whole number from 0 to 256, got {self.workers!r}.")
        if not isinstance(self.warmup_epochs, int) or not 0 <= self.warmup_epochs < self.epochs:
            bad(f"warmup epochs must be a whole number from 0 to epochs - 1, got {self.warmup_epochs!r}.")
        if self.warmup_epochs and self.schedule not in ("none", "step", "multistep"):
            bad(f"warmup works with the none, step and multistep schedules, not {self.schedule!r}.")
        if not isinstance(self.plateau_patience, int) or self.plateau_patience < 0:
            bad(f"plateau patience must be a whole number of epochs >= 0, got {self.plateau_patience!r}.")
        if self.step_schedule and self.schedule != "cosine":
            bad(f"a per-step schedule is the cosine one; the {self.schedule!r} schedule is defined in epochs.")
        if not (isinstance(self.distill, (int, float)) and math.isfinite(self.distill) and 0 <= self.distill <= 100):
            bad(f"distillation temperature must be in [0, 100] (0: off; 4 is usual), got {self.distill!r}.")
        if not (isinstance(self.distill_weight, (int, float)) and 0 <= self.distill_weight <= 1):
            bad(f"distillation weight must be in [0, 1], got {self.distill_weight!r}.")
        if not (isinstance(self.feature_distill, (int, float)) and math.isfinite(self.feature_distill)
                and 0 <= self.feature_distill <= 1000):
            bad(f"feature distillation weight must be in [0, 1000] (0: off; wsviz's fine-tune uses 3), "
                f"got {self.feature_distill!r}.")
        if self.feature_distill and not self.distill:
            bad("feature distillation compares the blocks with the teacher's as it runs on the same batch: it needs "
                "distillation on (a temperature, e.g. 4), or set the feature weight to 0.")
        if not isinstance(self.average_last, int) or not 0 <= self.average_last <= 1_000_000:
            bad(f"average_last must be a whole number of steps from 0 to 1000000, got {self.average_last!r}.")

    def notes(self) -> list[str]:
        """Valid but probably unintended settings, worth a warning (a recipe shortened with --epochs)."""
        late = [m for m in self.milestones if m >= self.epochs] if self.schedule == "multistep" else []
        if late:
            return [f"milestone(s) {', '.join(map(str, late))} are at or after the last epoch ({self.epochs}): the "
                    "rate never drops there."]
        return []

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


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int = 1):
    """torch's scheduler for ``cfg.schedule`` (stepped once per epoch; with ``cfg.step_schedule`` the
    cosine is stepped after every optimiser step, over ``epochs * steps_per_epoch`` steps), chained
    after a constant lr / 10 for the warm-up epochs; None for a constant rate."""
    sched = torch.optim.lr_scheduler
    if cfg.step_schedule:
        return sched.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(opt, mode="max", factor=cfg.gamma, patience=cfg.plateau_patience)
    main = {"step": lambda: sched.StepLR(opt, cfg.step_size, cfg.gamma),
            "multistep": lambda: sched.MultiStepLR(opt, list(cfg.milestones), cfg.gamma),
            "cosine": lambda: sched.CosineAnnealingLR(opt, cfg.epochs)}.get(cfg.schedule, lambda: None)()
    if not cfg.warmup_epochs:
        return main
    warm = sched.ConstantLR(opt, factor=0.1, total_iters=cfg.warmup_epochs)
    return warm if main is None else sched.ChainedScheduler([warm, main], optimizer=opt)


def streams(cfg: TrainConfig, train_data) -> bool:
    """Whether the training data go through a DataLoader (see :data:`TrainConfig.loader`)."""
    return isinstance(train_data, Dataset) or cfg.loader == "stream" or (cfg.loader == "auto" and cfg.augment != "none")


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor | DataLoader, labels: torch.Tensor | None = None,
             batch_size: int = 512, device: torch.device | str = "cpu") -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) of ``model`` in eval mode, on tensors or a DataLoader's batches."""
    model.eval()
    c, h = _in_shape(model)
    if isinstance(images, DataLoader):
        batches: Iterator = iter(images)
    else:
        batches = ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size))
    total, correct, n, preds = 0.0, 0, 0, []
    for xb, yb in batches:
        x = fit_to(xb.to(device, non_blocking=True), c, h)
        y = yb.to(device, non_blocking=True)
        out = model(x)
        total += float(F.cross_entropy(out, y, reduction="sum"))
        p = out.argmax(1)
        correct += int((p == y).sum())
        n += len(y)
        preds.append(p.cpu())
    n = max(n, 1)
    return total / n, correct / n, torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def _in_shape(model: nn.Module) -> tuple[int, int]:
    m = getattr(model, "module", model)  # DDP wraps the model
    cfg = m.wsviz_config
    return cfg["in_channels"], cfg["input_size"]


class _Batches:
    """One rank's training batches, epoch by epoch, from tensors or through a DataLoader."""

    def __init__(self, data, cfg: TrainConfig, rank: int, world: int, gen: torch.Generator, device: torch.device,
                 size: int) -> None:
        self.cfg, self.rank, self.world, self.gen = cfg, rank, world, gen
        self.loader: DataLoader | None = None
        if streams(cfg, data):
            if not isinstance(data, Dataset):
                from wsviz.data.loaders import TensorImages, transforms_for

                images, labels = data
                tf = transforms_for(cfg.augment, size, train=True, from_pil=False, side=images.shape[-1])
                data = TensorImages(images, labels, tf)
            self.loader = train_loader(data, cfg.batch_size, rank=rank, world_size=world, seed=cfg.seed,
                                       workers=cfg.workers, pin_memory=device.type == "cuda", generator=gen)
            steps = len(self.loader)
        else:
            self.images, self.labels = data
            share = len(self.labels) if world == 1 else math.ceil(len(self.labels) / world)
            steps = share // cfg.batch_size if share >= cfg.batch_size else 1
        self.steps = min(steps, cfg.max_batches) if cfg.max_batches else steps

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.world > 1:
            # Every process of a torchrun job starts from the same seed, so its augmentation (drawn by the
            # workers from ``gen``, or in this process from the global generators) would repeat rank 0's crops
            # and flips on every rank. Reseeded from (seed, rank, epoch): each rank draws its own, and a
            # resumed run (which restores rank 0's generator states) draws what the uninterrupted one did.
            # The sampler's order is DistributedSampler's, seeded apart; the model's weights are broadcast.
            s = (self.cfg.seed * 1_000_003 + self.rank * 10_007 + epoch) % 2**63
            self.gen.manual_seed(s)
            torch.manual_seed(s)
            np.random.seed(s % 2**32)
            random.seed(s)
        if self.loader is not None:
            self.loader.sampler.set_epoch(epoch)
            yield from itertools.islice(self.loader, self.steps)
            return
        n = len(self.labels)
        if self.world == 1:
            perm = torch.randperm(n, generator=self.gen)
        else:  # DistributedSampler's order and padding: every rank gets ceil(n / world) indices
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(range(n), self.world, self.rank, shuffle=True, seed=self.cfg.seed)
            sampler.set_epoch(epoch)
            perm = torch.tensor(list(sampler))
        bs = self.cfg.batch_size
        for step in range(self.steps):
            idx = perm[step * bs:(step + 1) * bs]
            yield self.images[idx], self.labels[idx]


def _eval_batches(data, cfg: TrainConfig, size: int, device: torch.device):
    """Test data as evaluate() takes them: tensors as they are, or a DataLoader when they are a
    Dataset or the augmentation preset has an evaluation transform (resize and centre crop)."""
    if not isinstance(data, Dataset):
        from wsviz.data.loaders import TensorImages, transforms_for

        images, labels = data
        tf = transforms_for(cfg.augment, size, train=False, from_pil=False, side=images.shape[-1])
        if tf is None:
            return data
        data = TensorImages(images, labels, tf)
    return (eval_loader(data, max(cfg.batch_size, 256), workers=cfg.workers, pin_memory=device.type == "cuda"),
            None)


def _snapshot(model, opt, sched, scaler, gen, epoch: int, result: TrainResult, seconds: float) -> dict[str, Any]:
    from wsviz.models.modes import set_mode
    from wsviz.training.state import rng_states

    net = getattr(model, "module", model)
    with set_mode(net, True):  # the state of a training model (e2cnn keeps caches in eval mode)
        weights = net.state_dict()
    return {"epoch": epoch, "model": weights, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
            "rng": rng_states(), "data_generator": gen.get_state(),
            "metrics": [asdict(m) for m in result.epochs], "seconds": seconds}


def _refit_cosine(sched, opt, cfg: TrainConfig, steps_per_epoch: int, done_epochs: int) -> None:
    """After a resume with another length (--epochs, or --max-batches with a per-step schedule): the
    cosine schedule of the new length, at the run's position in it. The saved scheduler would go on
    with its old length (and climb back up past its end); each group's rate becomes the new curve's
    value at the current step, from which torch's recursive update follows the new curve. A resume
    of the same length is left exactly as saved (bit-for-bit continuation)."""
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
        return
    total = cfg.epochs * steps_per_epoch if cfg.step_schedule else cfg.epochs
    now = done_epochs * steps_per_epoch if cfg.step_schedule else done_epochs
    if sched.T_max == total and sched.last_epoch == now:
        return
    sched.T_max, sched.last_epoch = total, now
    lrs = [sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * now / total)) / 2
           for base in sched.base_lrs]
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs


def _restore(state: dict[str, Any], model, opt, sched, scaler, gen, result: TrainResult,
             cfg: TrainConfig | None = None, steps_per_epoch: int = 1) -> int:
    """Put a snapshot back; returns the first epoch still to train. With ``cfg``, a cosine schedule
    is refitted to its length (:func:`_refit_cosine`)."""
    from wsviz.training.state import set_rng_states

    net = getattr(model, "module", model)
    try:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state["scheduler"] is not None:
            sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise WsvizError(f"The training state does not fit this run's model or optimiser ({exc}); resume with the "
                         "options the run started with; or start the run again from its first epoch with --overwrite "
                         "instead of --resume (what is there is replaced only once the new run has finished an "
                         "epoch), or choose another --out.") from exc
    set_rng_states(state["rng"])
    gen.set_state(state["data_generator"])
    result.epochs = [EpochMetrics(**m) for m in state["metrics"]]
    result.seconds = float(state["seconds"])
    if cfg is not None:
        _refit_cosine(sched, opt, cfg, steps_per_epoch, int(state["epoch"]))
    return int(state["epoch"]) + 1


def _sum_over_ranks(values: list[float], world_size: int) -> list[float]:
    """``values`` summed over every rank (the epoch's training loss, hits and images of all processes)."""
    if world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _broadcast(value: float, world_size: int) -> float:
    """Rank 0's ``value`` on every rank (the plateau schedule needs rank 0's test accuracy everywhere)."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return float(t.item())


def _distilled(loss: torch.Tensor, out: torch.Tensor, teacher: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The labels' ``loss`` mixed with T^2 KL(teacher || student) of the predictions softened by T."""
    t = cfg.distill
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / t, 1)
    kd = F.kl_div(F.log_softmax(out.float() / t, 1), target, log_target=True, reduction="batchmean") * t * t
    return (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd


def train(
    model: nn.Module,
    train_data: tuple[torch.Tensor, torch.Tensor] | Dataset,
    test_data: tuple[torch.Tensor, torch.Tensor] | Dataset,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    resume: dict[str, Any] | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
    teacher: nn.Module | None = None,
    aux_loss: Callable[[], torch.Tensor] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data`` and evaluate on ``test_data`` after every epoch.

    ``on_start(first)`` runs once, right before the first epoch to train (``first``: 1, or the epoch
    a resumed run continues with): a progress bar made there counts every epoch's time;
    ``on_epoch(metrics)`` runs after each evaluation (checkpointing, run store);
    ``on_step(epoch, step, loss)`` after each optimiser step (progress bars, live loss);
    ``on_state(state)`` after ``on_epoch`` with the full training state (model, optimiser,
    scheduler, scaler, random generators, epoch, metrics), which ``resume=state`` continues
    from. With ``world_size > 1`` each rank trains on its own equal share of every epoch
    (``model`` is already wrapped in DistributedDataParallel) and only rank 0 evaluates.

    ``teacher``: with ``cfg.distill`` (a temperature T) the loss is ``distill_weight`` times
    T^2 KL(teacher || model) of the softened predictions plus the rest times the labels'
    cross-entropy (Hinton et al. 2015); a tied model's teacher is the untied model it came from.
    With ``cfg.average_last`` = N the model ends with the average of its last N steps' weights and
    BatchNorm statistics (torch.optim.swa_utils.AveragedModel), which the last evaluation sees.
    ``aux_loss()``: a term added to every training step's loss, called after the model's (and the
    teacher's) forward pass, e.g. a feature-matching term that forward hooks have gathered;
    ``cfg.feature_distill`` adds one for a tied model (:func:`wsviz.training.tying.feature_distillation`).
    """
    cfg.validate()
    if cfg.distill and teacher is None:
        raise WsvizError("Distillation learns from a teacher's predictions: give the teacher model (on the command "
                         "line, the untied checkpoint is the --init-from one), or set distill to 0.")
    seed_everything(cfg.seed)
    device = torch.device(device)
    c, h = _in_shape(model)
    model.to(device)
    opt = make_optimizer(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _Batches(train_data, cfg, rank, world_size, gen, device, h)
    sched = make_schedule(opt, cfg, batches.steps)
    if cfg.average_last > batches.steps:
        raise WsvizError(f"average_last ({cfg.average_last}) must be at most the steps of one epoch ({batches.steps}): "
                         "the average lives within the last epoch, so that a resumed run rebuilds it.")
    if teacher is not None and cfg.distill:
        teacher = teacher.to(device).eval()  # its predictions are taken under no_grad (_distilled)
    unhook = None
    if cfg.feature_distill:
        from wsviz.training.tying import feature_distillation

        base = getattr(model, "module", model)
        groups = (getattr(base, "wsviz_tie", None) or {}).get("groups")
        if not groups:
            raise WsvizError("Feature distillation matches the blocks of a tied model's groups with the untied model's; "
                             "this model has no tied groups. Tie it first, or set the feature weight to 0.")
        features, unhook = feature_distillation(base, teacher, groups, cfg.feature_distill)
        aux_loss = features if aux_loss is None else (lambda a=aux_loss: a() + features())
    try:
        averaged = None
        test = _eval_batches(test_data, cfg, h, device) if rank == 0 else None
        result = TrainResult()
        first = _restore(resume, model, opt, sched, scaler, gen, result, cfg, batches.steps) if resume is not None else 1
        start = time.perf_counter() - result.seconds
        if on_start is not None:
            on_start(first)
        for epoch in range(first, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]  # the epoch's rate (its first step's, with a per-step schedule)
            loss_sum, correct, seen = 0.0, 0, 0
            for step, (xb, yb) in enumerate(batches.epoch(epoch)):
                x = fit_to(xb.to(device, non_blocking=True), c, h)
                y = yb.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=use_amp):
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    if cfg.distill:
                        loss = _distilled(loss, out, teacher, x, cfg)
                    if aux_loss is not None:
                        loss = loss + aux_loss()
                if not torch.isfinite(loss):
                    raise TrainingFailed(f"The loss became {float(loss.detach())} at epoch {epoch}, step {step + 1}: training diverged. "
                                         f"Lower the learning rate (now {opt.param_groups[0]['lr']:g}).")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if cfg.step_schedule:
                    sched.step()
                if epoch == cfg.epochs and step >= batches.steps - cfg.average_last:
                    base = getattr(model, "module", model)
                    if averaged is None:
                        averaged = torch.optim.swa_utils.AveragedModel(base, use_buffers=True)
                    averaged.update_parameters(base)
                n = len(y)
                loss_sum += float(loss.detach()) * n
                correct += int((out.detach().argmax(1) == y).sum())
                seen += n
                if on_step:
                    on_step(epoch, step + 1, float(loss.detach()))
            train_seconds = time.perf_counter() - t0
            if averaged is not None:  # the last N steps' average becomes the model
                getattr(model, "module", model).load_state_dict(averaged.module.state_dict())
                averaged = None
            # the training loss and accuracy of every process's share, as images/s counts them all
            loss_sum, correct, seen = _sum_over_ranks([loss_sum, correct, seen], world_size)
            test_acc = float("nan")
            if rank == 0:
                eval_model = getattr(model, "module", model)
                test_loss, test_acc, _ = evaluate(eval_model, *test, device=device)
                m = EpochMetrics(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), test_loss, test_acc, lr,
                                 time.perf_counter() - t0, seen / max(train_seconds, 1e-9))
                result.epochs.append(m)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(_broadcast(test_acc, world_size))
            elif sched is not None and not cfg.step_schedule:
                sched.step()
            result.seconds = time.perf_counter() - start
            if rank == 0:
                if on_epoch:
                    on_epoch(m)
                if on_state:
                    on_state(_snapshot(model, opt, sched, scaler, gen, epoch, result, result.seconds))
        result.seconds = time.perf_counter() - start
        return result
    finally:
        if unhook is not None:  # the model leaves as it came, without the hooks
            unhook()
