"""One training run end to end: dataset + model + loop + checkpoint and card."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import logging
import os
import shlex
import socket
import threading
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
from wsviz.training.loop import EpochMetrics, TrainConfig, TrainResult, check_seed, train
from wsviz.training.tying import TieSpec

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


def finetune_flags(cfg: TrainConfig) -> list[str]:
    """The ``wsviz.train`` options of a fine-tune's schedule, distillation and weight averaging (the
    reproduce command and a background job's command both carry them)."""
    parts = ["--step-schedule"] if cfg.step_schedule else []
    if cfg.distill:
        parts += ["--distill", repr(cfg.distill), "--distill-weight", repr(cfg.distill_weight)]
    if cfg.feature_distill:
        parts += ["--feature-distill", repr(cfg.feature_distill)]
    if cfg.average_last:
        parts += ["--average-last", str(cfg.average_last)]
    return parts


def reproduce_command(model_name: str, dataset: str, cfg: TrainConfig, overrides: dict[str, Any],
                      out: str, data_seed: int, init_from: str | Path | None = None, tie: TieSpec | None = None,
                      world_size: int = 1) -> str:
    """The command line that trains this run again: under torchrun with ``world_size`` processes when
    there were several (``--batch-size`` is per process)."""
    launch = ["torchrun", "--nproc_per_node", str(world_size)] if world_size > 1 else ["python"]
    parts = [*launch, "-m", "wsviz.train", "--model", model_name, "--dataset", dataset,
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
    if cfg.augment != "none":
        parts += ["--augment", cfg.augment]
    if cfg.warmup_epochs:
        parts += ["--warmup-epochs", str(cfg.warmup_epochs)]
    if cfg.schedule == "plateau":
        parts += ["--gamma", repr(cfg.gamma), "--plateau-patience", str(cfg.plateau_patience)]
    if cfg.loader != "auto":
        parts += ["--loader", cfg.loader]
    if cfg.workers:
        parts += ["--workers", str(cfg.workers)]
    if not cfg.amp:
        parts.append("--no-amp")
    parts += finetune_flags(cfg)
    for k, v in overrides.items():
        parts += ["--set", f"{k}={v if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else v}"]
    if init_from is not None:
        parts += ["--init-from", str(init_from)]
    if tie is not None:
        for g in tie.groups:
            parts += ["--tie", ",".join(g)]
        parts += ["--tie-init", tie.init, "--calibration", str(tie.calibration)]
    return " ".join(shlex.quote(p) for p in parts)


def make_card(model: nn.Module, dataset: str, cfg: TrainConfig, result: TrainResult, device: torch.device,
              data_seed: int, command: str, complete: bool, accounting: dict[str, Any],
              init_from: str | Path | None = None, world_size: int = 1) -> dict[str, Any]:
    """The model card. ``world_size``: the processes that trained it (torchrun), each on its share of
    every epoch with its own ``--batch-size``; train loss and accuracy are over all of them."""
    spec = get_spec(model.wsviz_name)
    started = {"init_from": str(init_from)} if init_from is not None else {}
    tied = {"tied": dict(model.wsviz_tie)} if getattr(model, "wsviz_tie", None) else {}
    return {**started, **tied,
        "model": model.wsviz_name, "config": model.wsviz_config, "family": spec.family, "paper": spec.paper,
        "dataset": dataset, "train_split": "train", "test_split": "test", "data_seed": data_seed,
        "epochs": cfg.epochs, "epochs_done": len(result.epochs), "complete": complete,
        "train_config": cfg.to_dict(), "metrics": [asdict(m) for m in result.epochs],
        "test_accuracy": result.epochs[-1].test_acc if result.epochs else None,
        **accounting, "device": str(device), "world_size": world_size, "duration_s": round(result.seconds, 3),
        "wsviz_version": wsviz.__version__, "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "command": command,
    }


def starting_model(model_name: str, dataset: str, init_from: str | Path, tie: TieSpec | None,
                   overrides: dict[str, Any], data_root: str | None, data_seed: int) -> tuple[nn.Module, nn.Module | None]:
    """(the model to start a run from, the checkpoint as trained or None): ``init_from`` (its ties
    rebuilt), tied further by ``tie`` when given (BatchNorm re-estimated); a fine-tune is an ordinary
    run from here. With ``tie`` the second is the untouched checkpoint the tie was made from (loaded
    once for both: a distillation's teacher); without, None (the first is that checkpoint)."""
    from wsviz.training.cards import read_card
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.tying import tie_checkpoint

    card = read_card(init_from)
    if card["model"] != model_name:
        raise WsvizError(f"The checkpoint {init_from} holds a {card['model']!r}, not a {model_name!r}: leave the model "
                         "out (it is taken from the checkpoint) or name the same one.")
    differ = {k: v for k, v in overrides.items() if card.get("config", {}).get(k, v) != v}
    if differ:
        raise WsvizError(f"The checkpoint {init_from} holds {model_name} with "
                         f"{ {k: card['config'][k] for k in differ} }, not {differ}: a run that starts from its weights "
                         "keeps its options; leave them out.")
    source = load_checkpoint(init_from)
    if tie is not None:
        tied = tie_checkpoint(init_from, tie, dataset=dataset, data_root=data_root, data_seed=data_seed, loaded=source)[0]
        return tied.train(), source[0].eval()
    return source[0].train(), None


def _data(dataset: str, cfg: TrainConfig, model: nn.Module, data_root: str | None, data_seed: int,
          download: bool) -> tuple[Any, Any]:
    """(train, test) data: image folders as streamed datasets at the model's input size (never
    decoded whole), every other set as in-memory tensors."""
    if dataset.startswith("folder:"):
        from wsviz.data.loaders import folder_dataset, transforms_for

        root, size = dataset[len("folder:"):], model.wsviz_config["input_size"]
        return tuple(folder_dataset(root, split, data_seed,
                                    transforms_for(cfg.augment, size, train=split == "train", from_pil=True))
                     for split in ("train", "test"))
    tr = load_split(dataset, "train", data_root=data_root, seed=data_seed, download=download)
    te = load_split(dataset, "test", data_root=data_root, seed=data_seed, download=download)
    return (tr.images, tr.labels), (te.images, te.labels)


def _check_resumable(state: dict[str, Any], model_name: str, config: dict[str, Any], dataset: str,
                     cfg: TrainConfig, data_seed: int, path: Path, start: dict[str, Any] | None = None) -> None:
    """Refuse to continue a state saved by another run (other model, data or hyperparameters, or
    another starting checkpoint or ties: ``start``)."""
    run = dict(state.get("run", {}))
    if isinstance(run.get("train_config"), dict):  # a field added since the state was saved has its default there
        run["train_config"] = {**{k: v for k, v in TrainConfig().to_dict().items() if k not in _FREE_ON_RESUME},
                               **run["train_config"]}
    now = {"model": model_name, "config": config, "dataset": dataset, "data_seed": data_seed,
           "train_config": {k: v for k, v in cfg.to_dict().items() if k not in _FREE_ON_RESUME}, **(start or {})}
    diff = [k for k in now if _plain(run.get(k)) != _plain(now[k])]
    if diff:
        raise WsvizError(f"The training state {path} belongs to another run (its {', '.join(diff)} differ: "
                         f"{ {k: run.get(k) for k in diff} } vs { {k: now[k] for k in diff} }). Resume with the "
                         f"same options; or {START_AGAIN}.")
    if int(state["epoch"]) > cfg.epochs:
        raise WsvizError(f"The training state {path} is at epoch {state['epoch']}, beyond --epochs {cfg.epochs}.")


# What to do with a training state that cannot be resumed: without --resume a run there is refused, so
# the way to start again is --overwrite (which keeps the old checkpoint until the new run has an epoch).
START_AGAIN = ("start the run again from its first epoch with --overwrite instead of --resume (what is there is "
               "replaced only once the new run has finished an epoch), or choose another --out")


def _load_state_to_resume(spath: Path) -> dict[str, Any]:
    """The training state at ``spath``; one that cannot be read is refused saying how to start again."""
    import re

    from wsviz.training.state import load_state

    try:
        return load_state(spath)
    except WsvizError as exc:
        what = re.sub(r"[;.]?\s*start the run again without --resume\.?$", "", str(exc))
        raise WsvizError(f"{what}: the run cannot be resumed from it. To train it, {START_AGAIN}.") from exc


_FREE_ON_RESUME = ("epochs", "max_batches", "workers", "loader", "amp")  # may change when a run is continued


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples are lists), to compare a stored run with this one."""
    import json

    return json.loads(json.dumps(value, default=str))


def run_training(model_name: str, dataset: str, out: str | Path, cfg: TrainConfig, *,
                 overrides: dict[str, Any] | None = None, data_root: str | None = None, data_seed: int = 0,
                 download: bool = False, device: str | None = None,
                 on_epoch: Callable[[EpochMetrics], None] | None = None,
                 on_step: Callable[[int, int, float], None] | None = None,
                 rank: int = 0, world_size: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 resume: bool = False, tensorboard: str | Path | None = None,
                 save_state: bool = True, init_from: str | Path | None = None,
                 tie: TieSpec | None = None, overwrite: bool = True,
                 used_seconds: Callable[[], float] | None = None, lock_wait: float = 0.0,
                 on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train and write a checkpoint to ``out`` after every epoch (the card says how far it got).

    One training at a time writes to ``out``: rank 0 holds :func:`out_lock` for the run's life, and a
    second training into the same folder is refused (:class:`OutInUse`) rather than mixing its
    epochs, card and TensorBoard events with the first's; ``lock_wait`` seconds it waits for the
    folder first (a resumed job whose previous attempt is still exiting).

    After every epoch the full training state is also written beside the checkpoint
    (:func:`wsviz.training.state.state_path`); it is removed once the run is complete.
    ``resume=True`` continues from it (from scratch, with a log message, if there is none yet); when
    there is none because ``out`` already holds this run complete, nothing is trained and its card is
    returned (a requeued job that had finished), and a complete run of other options is refused.
    ``overwrite=False`` refuses a fresh start (no ``resume``) into a folder that holds a checkpoint or
    a killed run's training state (the command line's default; ``--overwrite`` starts again there).
    A fresh start with ``overwrite`` removes a stale training state, so no later resume picks it up.
    ``on_step(epoch, step, loss)`` after every optimiser step: ``step`` counts the run's optimiser
    steps from its start (continued by a resume), not the batches of the epoch.
    ``tensorboard``: a folder for TensorBoard event files (loss per step; losses, accuracies,
    learning rate and images/s per epoch). Returns the final card. Only rank 0 writes.
    ``init_from``: a checkpoint folder to start from instead of fresh weights (a fine-tune; its
    card names the same model); ``tie``: conv groups of it to tie first (see
    :mod:`wsviz.training.tying`); the card then records the ties and the accuracy right after tying.
    ``on_start(first)``: once, right before the first epoch it trains (1, or the epoch a resume continues with).
    ``used_seconds()``: the wall-clock seconds the run has used so far over all its attempts (a
    wall-time quota counts them), recorded in every training state as ``wall_seconds``; by default
    the resumed state's plus this call's. A save or TensorBoard write that fails because the run's
    folder was deleted meanwhile raises :class:`RunFolderDeleted`.
    """
    with out_lock(out, lock_wait) if rank == 0 else contextlib.nullcontext():
        return _run_training(model_name, dataset, out, cfg, overrides=overrides, data_root=data_root,
                             data_seed=data_seed, download=download, device=device, on_epoch=on_epoch,
                             on_step=on_step, rank=rank, world_size=world_size, wrap=wrap, resume=resume,
                             tensorboard=tensorboard, save_state=save_state, init_from=init_from, tie=tie,
                             overwrite=overwrite, used_seconds=used_seconds, on_start=on_start)


def _run_training(model_name: str, dataset: str, out: str | Path, cfg: TrainConfig, *,
                  overrides: dict[str, Any] | None, data_root: str | None, data_seed: int, download: bool,
                  device: str | None, on_epoch: Callable[[EpochMetrics], None] | None,
                  on_step: Callable[[int, int, float], None] | None, rank: int, world_size: int,
                  wrap: Callable[[nn.Module], nn.Module] | None, resume: bool, tensorboard: str | Path | None,
                  save_state: bool, init_from: str | Path | None, tie: TieSpec | None, overwrite: bool,
                  used_seconds: Callable[[], float] | None,
                  on_start: Callable[[int], None] | None) -> dict[str, Any]:
    """:func:`run_training`, with ``out`` held."""
    from wsviz.training.cards import CARD
    from wsviz.training.state import save_state as write_state
    from wsviz.training.state import state_path

    cfg.validate()
    check_seed(data_seed, "data seed")
    entered = time.time()
    for note in cfg.notes():
        log.warning(note)
    overrides = dict(overrides or {})
    dev = pick_device(device)
    out = Path(out)
    spath = state_path(out)
    stale = False if resume else _check_fresh(out, spath, overwrite, rank)
    torch.manual_seed(cfg.seed)
    if tie is not None and init_from is None:
        raise WsvizError("Tying needs a trained model to start from: give the checkpoint to tie (--init-from).")
    if cfg.distill and init_from is None:
        raise WsvizError("Distillation learns from a trained model's predictions: give that checkpoint (--init-from), "
                         "or leave distillation off.")
    teacher = None
    if init_from is not None:
        model, start = starting_model(model_name, dataset, init_from, tie, overrides, data_root, data_seed)
        if cfg.distill:  # the teacher is the checkpoint as trained: for a tied model, the untied one it came from
            teacher = start if start is not None else copy.deepcopy(model).eval()
        del start
    else:
        model = build_for_dataset(model_name, dataset, overrides, data_root)
    identity = {"model": model_name, "config": model.wsviz_config, "dataset": dataset, "data_seed": data_seed,
                "train_config": {k: v for k, v in cfg.to_dict().items() if k not in _FREE_ON_RESUME}}
    if init_from is not None:
        identity["init_from"] = str(init_from)
    if tie is not None:
        identity["tie"] = tie.to_dict()
    if resume and not spath.is_file() and (out / CARD).is_file():
        finished = _finished_run(out, identity, cfg)
        if finished is not None:
            return finished
    s = summarize(model)
    accounting = {"unique_params": s.unique_params, "effective_params": s.effective_params,
                  "flops": s.flops, "sign_mask_params": s.mask_params,
                  "float_params": s.float_params, "mask_bits": s.mask_bits}
    train_data, test_data = _data(dataset, cfg, model, data_root, data_seed, download)
    # an overwritten run's state and curves go when this run has finished an epoch to replace them with,
    # not before: a start that fails (out of memory on the first batch) leaves the killed run resumable
    old_events = _event_files(tensorboard) if stale and rank == 0 else []
    dropped = [not stale]

    def drop_stale_once() -> None:
        if not dropped[0]:
            dropped[0] = True
            _drop_stale_state(spath, rank, old_events)
    accounting["effective_batch_size"] = _effective_batch(train_data, cfg, world_size, rank)
    command = reproduce_command(model_name, dataset, cfg, overrides, str(out), data_seed, init_from, tie, world_size)
    if tie is not None:  # what tying alone cost, before any fine-tuning
        from wsviz.training.loop import _eval_batches, evaluate

        model.wsviz_tie["accuracy_after_tying"] = evaluate(
            model, *_eval_batches(test_data, cfg, model.wsviz_config["input_size"], torch.device("cpu")))[1]
    state = None
    if resume and spath.is_file():
        state = _load_state_to_resume(spath)
        _check_resumable(state, model_name, model.wsviz_config, dataset, cfg, data_seed, spath,
                         {k: identity[k] for k in ("init_from", "tie") if k in identity})
        log.info("resuming %s from epoch %d (%s)", model_name, state["epoch"], spath)
    elif resume:
        log.warning("no training state at %s: training %s from the first epoch", spath, model_name)
    result = TrainResult()
    net = model.to(dev)
    if wrap is not None:
        net = wrap(net)
    before = state_seconds(state) if state is not None else 0.0
    if used_seconds is None:
        def used_seconds() -> float:
            return before + time.time() - entered
    watched = [p for p in (out.parent, out) if p.is_dir()]  # folders whose deletion ends the run
    # A save or TensorBoard write into a run folder deleted meanwhile: RunFolderDeleted, in one line.
    with _deleted_folder_said(watched):
        writer = _TensorBoardLog(tensorboard, state) if rank == 0 and tensorboard else None
        global_step = [int(state["global_step"]) if state is not None else 0]  # TensorBoard's x axis: optimiser steps

        def step_done(epoch: int, step: int, loss: float) -> None:
            global_step[0] += 1
            if writer is not None:
                writer.add_scalar("train/loss_step", loss, global_step[0])
            if on_step:
                on_step(epoch, global_step[0], loss)

        def epoch_done(m: EpochMetrics) -> None:
            drop_stale_once()
            result.epochs.append(m)
            result.seconds = time.perf_counter() - t0 + resumed_seconds
            if rank == 0:
                _check_folders(watched)  # a save would make a deleted run folder again
                save_checkpoint(out, model, make_card(model, dataset, cfg, result, dev, data_seed, command,
                                                      m.epoch == cfg.epochs, accounting, init_from, world_size))
                if out not in watched:
                    watched.append(out)
            if writer is not None:
                for tag, value in (("train/loss", m.train_loss), ("train/accuracy", m.train_acc),
                                   ("test/loss", m.test_loss), ("test/accuracy", m.test_acc), ("lr", m.lr),
                                   ("images_per_s", m.images_per_s)):
                    writer.add_scalar(tag, value, global_step[0])
                writer.flush()
            if on_epoch:
                on_epoch(m)

        def state_done(snapshot: dict[str, Any]) -> None:
            drop_stale_once()
            if save_state and snapshot["epoch"] < cfg.epochs:
                _check_folders(watched)
                write_state(spath, {**snapshot, "run": identity, "global_step": global_step[0],
                                    "wall_seconds": used_seconds()})

        resumed_seconds = float(state["seconds"]) if state is not None else 0.0
        if state is not None:
            result.epochs = [EpochMetrics(**m) for m in state["metrics"]]
        t0 = time.perf_counter()
        trained = False
        try:
            res = train(net, train_data, test_data, cfg, device=dev, on_epoch=epoch_done, on_step=step_done, rank=rank,
                        world_size=world_size, resume=state, on_state=state_done if rank == 0 else None, teacher=teacher,
                        on_start=on_start)
            trained = True
        finally:
            if writer is not None:
                _close_writer(writer, quiet=not trained)
        result.epochs, result.seconds = res.epochs, res.seconds
        card = make_card(model, dataset, cfg, result, dev, data_seed, command, True, accounting, init_from, world_size)
        diverged = _divergence(result, model.wsviz_config.get("num_classes"))
        if diverged:
            card.update(diverged=True, diverged_reason=diverged)
            if rank == 0:
                log.warning("training diverged: %s", diverged)
        if rank == 0:
            _check_folders(watched)
            save_checkpoint(out, model, card)
            spath.unlink(missing_ok=True)  # the run is complete: nothing is left to resume
            log.info("trained %s on %s: test accuracy %.4f", model_name, dataset, card["test_accuracy"])
        return card



class OutInUse(WsvizError):
    """Another training (another process) is writing to the same checkpoint folder."""

    def __init__(self, out: str | Path, holder: str | None) -> None:
        who = f" ({holder})" if holder else ""
        super().__init__(f"another training is writing to {out}{who}; wait for it to end, or choose another --out")
        self.out, self.holder = out, holder


def lock_path(out: str | Path) -> Path:
    """The lock file of checkpoint folder ``out``: beside it (``OUT.lock``), like its training state."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}.lock"


def _lock_holder(fd: int) -> str | None:
    """Who holds the lock, as its holder wrote it ("pid N" or "pid N on HOST"), or None if unknown yet."""
    try:
        pid, _, host = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return None
    if not pid.isdigit():
        return None
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


@contextlib.contextmanager
def out_lock(out: str | Path, wait: float = 0.0):
    """Hold the exclusive lock of checkpoint folder ``out`` (``fcntl.flock`` on :func:`lock_path`) while the
    block runs; :class:`OutInUse` if another process holds it for longer than ``wait`` seconds. The OS
    releases it when the process ends, however it ends: a killed run's folder is free for --resume at once.
    The file records the holder's pid and host (for the refusal) and is removed when the lock is given up."""
    import fcntl

    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file stands where a folder of --out should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out)) from None
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise OutInUse(out, holder) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed that file as it let go: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        try:
            if _same_file(fd, path):
                path.unlink()  # while still held: a process that opened it meanwhile locks a file no longer there
        except OSError:
            pass
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

def _check_fresh(out: Path, spath: Path, overwrite: bool, rank: int) -> bool:
    """A fresh start into ``out``: refuse to wipe a checkpoint or a killed run's training state
    there unless ``overwrite``; returns whether a run is there (to be overwritten). The stale state
    and TensorBoard events are removed only once this run has finished its first epoch
    (:func:`_drop_stale_state`): an overwrite that fails before that loses nothing."""
    from wsviz.training.cards import CARD

    held = [str(p) for p in (out / CARD, spath) if p.is_file()]
    if not held:
        return False
    if not overwrite:
        raise WsvizError(f"{out} already holds a run ({', '.join(held)}): starting afresh would overwrite it. "
                         "Continue a killed run with --resume, start again there with --overwrite, or choose "
                         "another --out.")
    return True


def _event_files(tensorboard: str | Path | None) -> list[Path]:
    """The TensorBoard event files in ``tensorboard`` now (an overwritten run's, before this run writes its own)."""
    if tensorboard is None or not Path(tensorboard).is_dir():
        return []
    return [p for p in Path(tensorboard).glob("events.out.tfevents.*") if p.is_file()]


def _drop_stale_state(spath: Path, rank: int, events: list[Path]) -> None:
    """A fresh start with --overwrite that has finished its first epoch: the killed run's state goes (a
    later --resume must not take it for this run's), and so do the old run's TensorBoard ``events``
    (TensorBoard would show both runs' curves as one)."""
    if rank != 0:
        return
    spath.unlink(missing_ok=True)
    for f in events:
        f.unlink(missing_ok=True)


def _finished_run(out: Path, identity: dict[str, Any], cfg: TrainConfig) -> dict[str, Any] | None:
    """--resume with no training state, into a folder with a card: the card when it is this very run,
    complete (nothing to do: a job requeued after it finished); a refusal when a complete run of
    other options (or another length) is there; None for an unfinished checkpoint, which is trained
    again from the first epoch (there is no state to continue it from)."""
    from wsviz.training.cards import read_card

    card = read_card(out)
    if not card.get("complete"):
        return None
    saved = {"model": card.get("model"), "config": card.get("config"), "dataset": card.get("dataset"),
             "data_seed": card.get("data_seed"),
             "train_config": {k: v for k, v in {**TrainConfig().to_dict(), **(card.get("train_config") or {})}.items()
                              if k not in _FREE_ON_RESUME}}
    if "init_from" in identity or card.get("init_from") is not None:
        saved["init_from"] = card.get("init_from")
    now = {k: v for k, v in identity.items() if k != "tie"}
    if _plain(saved) == _plain(now) and card.get("epochs_done") == cfg.epochs:
        log.warning("%s already holds this run, complete (%s epochs, test accuracy %s): nothing to resume, nothing "
                    "trained", out, card.get("epochs_done"), card.get("test_accuracy"))
        return card
    raise WsvizError(f"The run in {out} is complete ({card.get('epochs_done')} epochs, test accuracy "
                     f"{card.get('test_accuracy')}) and has no training state left to resume with these options. To "
                     f"train it further, fine-tune from it (--init-from {out} --out NEW); or choose another --out "
                     "(or --overwrite without --resume to start again there).")


def _effective_batch(train_data: Any, cfg: TrainConfig, world_size: int, rank: int) -> int:
    """The batch size training really uses: --batch-size, or one process's share of the training
    set when that is smaller (every epoch is then one batch), which is said on stderr."""
    import math

    n = len(train_data[1]) if isinstance(train_data, tuple) else len(train_data)
    share = math.ceil(n / world_size)
    if cfg.batch_size <= share:
        return cfg.batch_size
    if rank == 0:
        log.warning("--batch-size %d is larger than the training set (%d images%s): every epoch is one batch of %d",
                    cfg.batch_size, n, f", {share} per process" if world_size > 1 else "", share)
    return share


DIVERGED_FACTOR = 3.0  # a final train loss above this many times chance's (ln of the classes) is a diverged run


def _divergence(result: TrainResult, num_classes: int | None) -> str | None:
    """Why the run diverged (its final train loss far above chance's ln(classes)), or None."""
    import math

    if not result.epochs or not num_classes or num_classes < 2:
        return None
    loss, chance = result.epochs[-1].train_loss, math.log(num_classes)
    if loss <= DIVERGED_FACTOR * chance:
        return None
    return (f"the final train loss {loss:.4g} is over {DIVERGED_FACTOR:g}x chance's ln({num_classes}) = {chance:.3g}: "
            f"the learning rate ({result.epochs[-1].lr:g} in the last epoch) is probably far too high; "
            "train again with a lower --lr")


class _TensorBoardLog:
    """The run's TensorBoard writer. Its folder deleted while the run trains (someone tidying their
    curves) costs the curves logged so far, not the run: the warning says so, and later events go to
    a new event file in that folder, made again. A folder gone with its parent (the run folder
    deleted) is :class:`RunFolderDeleted`: nothing is made again there."""

    def __init__(self, folder: str | Path, state: dict[str, Any] | None) -> None:
        self.folder = Path(folder)
        self._writer = _tensorboard(folder, state)
        self.log_dir = self._writer.log_dir

    def _live(self):
        gone = _deleted(self.folder)
        if gone is None:
            return self._writer
        if gone != self.folder:
            raise RunFolderDeleted(gone)
        log.warning("the TensorBoard folder %s was deleted while training: the curves logged before are gone; "
                    "the training goes on and logs its later steps there afresh", self.folder)
        try:
            self._writer.close()  # its file is gone: the error it raises says nothing new
        except OSError:
            pass
        finally:
            self._writer.wsviz_unhush()
        self._writer = _tensorboard(self.folder, None)
        return self._writer

    def _call(self, name: str, *args: Any) -> None:
        try:
            getattr(self._live(), name)(*args)
        except OSError as exc:  # the writer's thread found the file gone first: its error comes up here
            if exc.errno != errno.ENOENT or _deleted(self.folder) is None:
                raise
            getattr(self._live(), name)(*args)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as exc:
            if exc.errno != errno.ENOENT or _deleted(self.folder) is None:
                raise
            log.warning("the TensorBoard folder %s was deleted while training: its curves are gone", self.folder)

    def wsviz_unhush(self) -> None:
        self._writer.wsviz_unhush()


def _tensorboard(folder: str | Path, state: dict[str, Any] | None):
    from torch.utils.tensorboard import SummaryWriter

    # Events after the saved epoch were written by the run that was killed: TensorBoard drops them.
    purge = int(state["global_step"]) + 1 if state is not None else None
    writer = SummaryWriter(log_dir=str(folder), purge_step=purge)
    writer.wsviz_unhush = _hush_writer_thread()
    return writer


def _hush_writer_thread() -> Callable[[], None]:
    """Until the returned function is called, a TensorBoard writer thread that dies of a missing file
    prints no traceback of its own: the writer raises that error again in the training thread at
    its next write or flush, where :func:`_deleted_folder_said` says what happened in one line."""
    previous = threading.excepthook

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, FileNotFoundError):
            return
        previous(args)

    threading.excepthook = hook

    def unhush() -> None:
        if threading.excepthook is hook:
            threading.excepthook = previous

    return unhush


def _close_writer(writer, quiet: bool) -> None:
    """Close the TensorBoard writer; with ``quiet`` (the run is already failing) an error closing it
    is logged, not raised over the run's own."""
    try:
        writer.close()
    except OSError as exc:
        if not quiet:
            raise
        log.warning("could not close the TensorBoard log in %s: %s", writer.log_dir, exc)
    finally:
        writer.wsviz_unhush()


class RunFolderDeleted(WsvizError):
    """The run's folder vanished while it trained (someone deleted it): nothing is left to continue."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"the run folder {folder} was deleted while training; launch the run again")
        self.folder = folder


def _deleted(path: Path) -> Path | None:
    """The topmost folder of ``path`` (itself or an ancestor) that no longer exists, or None."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _check_folders(watched: list[Path]) -> None:
    """Raise :class:`RunFolderDeleted` when a folder the run writes into has been deleted (a save
    would otherwise make it again, half filled, or fail with a bare FileNotFoundError)."""
    for folder in watched:
        gone = _deleted(folder)
        if gone is not None:
            raise RunFolderDeleted(gone)


@contextlib.contextmanager
def _deleted_folder_said(watched: list[Path]):
    """A write that fails with ENOENT because a watched folder vanished becomes :class:`RunFolderDeleted`."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            gone = next((g for g in map(_deleted, watched) if g is not None), None)
            if gone is not None:
                raise RunFolderDeleted(gone) from exc
        raise


def state_seconds(state: dict[str, Any]) -> float:
    """The wall-clock seconds a run had used when ``state`` was saved, over all its attempts (a state
    saved before they were recorded: its training seconds)."""
    return float(state.get("wall_seconds", state.get("seconds", 0.0)))


def check_allowance(limit: float | None, used: float, out: str | Path, who: str = "this run") -> None:
    """Refuse to continue a run that has used its whole wall-time allowance (``limit`` seconds, None: no
    limit) over its attempts (``used`` seconds); its finished epochs in ``out`` are kept."""
    if limit and used >= limit:
        raise WsvizError(f"{who} has used its {limit / 3600:g} h allowance (WSVIZ_QUOTA_HOURS per run, counted over "
                         f"all its attempts: {used / 3600:.3g} h); its finished epochs are kept in {out}: use that "
                         "checkpoint as it is, or train it further as a new run (a fine-tune from it)")


def _state_numbers(spath: str | Path) -> dict[str, float] | None:
    """The top-level numbers of the training state at ``spath`` (epoch, seconds...), read from its header
    alone (no tensors are loaded), or None when there is no readable state there."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(spath), framework="pt") as fh:
            meta = fh.metadata() or {}
        pairs = json.loads(meta["state"])["__dict__"]
        return {k: v for k, v in pairs if isinstance(k, str) and isinstance(v, (int, float))
                and not isinstance(v, bool)}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None


def recorded_seconds(spath: str | Path) -> float | None:
    """:func:`state_seconds` of the training state at ``spath``, read from its header alone (no
    tensors are loaded), or None when there is no readable state there."""
    top = _state_numbers(spath)
    return None if top is None else state_seconds(top)


def recorded_epoch(spath: str | Path) -> int | None:
    """The last finished epoch the training state at ``spath`` holds (a resume continues after it), read
    from its header alone, or None when there is no readable state there."""
    epoch = (_state_numbers(spath) or {}).get("epoch")
    return int(epoch) if epoch is not None else None


def record_seconds(spath: str | Path, seconds: float) -> None:
    """Write into the training state at ``spath`` that the run has used ``seconds`` so far (a run
    stopped mid-epoch at its wall-time limit: the epoch it lost counts too)."""
    from wsviz.training.state import load_state, save_state

    state = load_state(spath)
    if seconds > state_seconds(state):
        save_state(spath, {**state, "wall_seconds": float(seconds)})
