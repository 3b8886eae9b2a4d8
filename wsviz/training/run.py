"""One training run end to end: dataset + model + loop + checkpoint and card."""

from __future__ import annotations

import datetime as _dt
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import wsviz
from wsviz.data.datasets import dataset_info, load_split
from wsviz.device import pick_device
from wsviz.errors import WsvizError
from wsviz.models import create_model, get_spec, summarize
from wsviz.training.checkpoint import save_checkpoint
from wsviz.training.loop import EpochMetrics, TrainConfig, TrainResult, train

log = logging.getLogger(__name__)


def _config_for(spec, info, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The dataset's channels and classes where the model takes them, then the user's options as
    given (an unknown option is an error, not silently dropped)."""
    known = spec.config()
    base = {k: v for k, v in (("in_channels", info.channels), ("num_classes", info.num_classes)) if k in known}
    return {**base, **(overrides or {})}


def build_for_dataset(model_name: str, dataset: str, overrides: dict[str, Any] | None = None,
                      data_root: str | None = None) -> nn.Module:
    """The registered model, with channels and classes taken from the dataset unless overridden."""
    info = dataset_info(dataset, data_root)
    spec = get_spec(model_name)
    return create_model(model_name, **_config_for(spec, info, overrides))


MAX_TRAIN_PARAMS = 500_000_000  # the largest registered model (ImageNet ResNet-152 family) has ~60M


def check_trainable(model_name: str, dataset: str, overrides: dict[str, Any] | None = None,
                    data_root: str | None = None, max_params: int = MAX_TRAIN_PARAMS) -> int | None:
    """Refuse, before any memory is spent, options that are wrong or build an absurdly large model.

    The model is built on the meta device (shapes only); returns its parameter count, or None for
    e2cnn models, which cannot be built there (they are then built for real, once, to check).
    """
    from wsviz.training.checkpoint import build_on_meta

    info = dataset_info(dataset, data_root)
    spec = get_spec(model_name)
    meta = build_on_meta(model_name, _config_for(spec, info, overrides))  # checks the options too
    if meta is None:
        build_for_dataset(model_name, dataset, overrides, data_root)
        return None
    n = sum(p.numel() for p in meta.parameters())
    if n > max_params:
        raise WsvizError(f"{model_name} with {overrides or {}} would have {n:,} parameters (at most {max_params:,} "
                         "can be trained here): use smaller widths or depth.")
    return n


def reproduce_command(model_name: str, dataset: str, cfg: TrainConfig, overrides: dict[str, Any],
                      out: str, data_seed: int) -> str:
    parts = ["python", "-m", "wsviz.train", "--model", model_name, "--dataset", dataset,
             "--epochs", str(cfg.epochs), "--out", out, "--batch-size", str(cfg.batch_size),
             "--optimizer", cfg.optimizer, "--lr", repr(cfg.lr), "--momentum", repr(cfg.momentum),
             "--weight-decay", repr(cfg.weight_decay), "--schedule", cfg.schedule, "--seed", str(cfg.seed),
             "--data-seed", str(data_seed)]
    if cfg.schedule == "step":
        parts += ["--step-size", str(cfg.step_size), "--gamma", repr(cfg.gamma)]
    if cfg.schedule == "multistep":
        parts += ["--milestones", *map(str, cfg.milestones), "--gamma", repr(cfg.gamma)]
    if cfg.max_batches:
        parts += ["--max-batches", str(cfg.max_batches)]
    for k, v in overrides.items():
        parts += ["--set", f"{k}={v if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else v}"]
    return " ".join(shlex.quote(p) for p in parts)


def make_card(model: nn.Module, dataset: str, cfg: TrainConfig, result: TrainResult, device: torch.device,
              data_seed: int, command: str, complete: bool, accounting: dict[str, int]) -> dict[str, Any]:
    spec = get_spec(model.wsviz_name)
    return {
        "model": model.wsviz_name, "config": model.wsviz_config, "family": spec.family, "paper": spec.paper,
        "dataset": dataset, "train_split": "train", "test_split": "test", "data_seed": data_seed,
        "epochs": cfg.epochs, "epochs_done": len(result.epochs), "complete": complete,
        "train_config": cfg.to_dict(), "metrics": [asdict(m) for m in result.epochs],
        "test_accuracy": result.epochs[-1].test_acc if result.epochs else None,
        **accounting, "device": str(device), "duration_s": round(result.seconds, 3),
        "wsviz_version": wsviz.__version__, "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "command": command,
    }


def run_training(model_name: str, dataset: str, out: str | Path, cfg: TrainConfig, *,
                 overrides: dict[str, Any] | None = None, data_root: str | None = None, data_seed: int = 0,
                 download: bool = False, device: str | None = None,
                 on_epoch: Callable[[EpochMetrics], None] | None = None,
                 on_step: Callable[[int, int, float], None] | None = None,
                 rank: int = 0, world_size: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
    """Train and write a checkpoint to ``out`` after every epoch (the card says how far it got).

    Returns the final card. Only rank 0 writes.
    """
    cfg.validate()
    overrides = dict(overrides or {})
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    model = build_for_dataset(model_name, dataset, overrides, data_root)
    s = summarize(model)
    accounting = {"unique_params": s.unique_params, "effective_params": s.effective_params,
                  "flops": s.flops, "sign_mask_params": s.mask_params}
    tr = load_split(dataset, "train", data_root=data_root, seed=data_seed, download=download)
    te = load_split(dataset, "test", data_root=data_root, seed=data_seed, download=download)
    command = reproduce_command(model_name, dataset, cfg, overrides, str(out), data_seed)
    result = TrainResult()
    t0 = time.perf_counter()
    net = model.to(dev)
    if wrap is not None:
        net = wrap(net)

    def epoch_done(m: EpochMetrics) -> None:
        result.epochs.append(m)
        result.seconds = time.perf_counter() - t0
        if rank == 0:
            save_checkpoint(out, model, make_card(model, dataset, cfg, result, dev, data_seed, command,
                                                  m.epoch == cfg.epochs, accounting))
        if on_epoch:
            on_epoch(m)

    train(net, (tr.images, tr.labels), (te.images, te.labels), cfg, device=dev, on_epoch=epoch_done,
          on_step=on_step, rank=rank, world_size=world_size)
    result.seconds = time.perf_counter() - t0
    card = make_card(model, dataset, cfg, result, dev, data_seed, command, True, accounting)
    if rank == 0:
        save_checkpoint(out, model, card)
        log.info("trained %s on %s: test accuracy %.4f", model_name, dataset, card["test_accuracy"])
    return card
