"""``python -m wsviz.train``: train a registered model on a dataset and save a checkpoint.

Examples::

    python -m wsviz.train --model msws_resnet_digits --dataset mnist5k-scale --epochs 5 --out checkpoints/x
    python -m wsviz.train --recipe wsms-cifar --data-root ~/data --out runs/wsms110   # a paper's protocol
    python -m wsviz.train --recipe wsms-cifar --data-root ~/data --out runs/wsms110 --resume
    WSVIZ_DATA_ROOTS=/data torchrun --nproc_per_node=4 -m wsviz.train --recipe aich-imagenet \
        --dataset folder:/data/imagenet --workers 8 --out runs/msws50   # folder: data only under WSVIZ_DATA_ROOTS
    python -m wsviz.train --list-recipes
    python -m wsviz.train --init-from checkpoints/scale-sharesnet-unshared --tie stages.2.1.conv2,stages.2.2.conv2 \
        --epochs 1 --lr 0.01 --out runs/tied   # tie two convolutions of a trained model, then fine-tune

Explicit options override the recipe's. The training state is saved beside --out after every
epoch (OUT.state.safetensors) so --resume continues a killed run (and does nothing, successfully,
when the run there is already complete); a fresh start into a folder holding a run is refused
unless --overwrite. TensorBoard event files go beside it too (OUT.tensorboard, or --tensorboard DIR).
One training at a time writes to an --out: while one runs (it holds OUT.lock), a second is refused.

With ``--run-id`` the process is a background job of the run store in ``--runs-dir``: it waits
for a free slot (at most ``--max-running`` jobs run at once), reports status and metrics, and
ends as done, failed (with the reason) or cancelled (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from wsviz.cli_errors import CliParser, debug_requested, run_cli
from wsviz.errors import WsvizError


class Cancelled(Exception):
    """Raised in the training process when it receives SIGTERM."""


class OverWallTime(Exception):
    """Raised in a recorded run that has run longer than its wall-time quota (WSVIZ_QUOTA_HOURS), over
    all its attempts: ``OverWallTime(limit, used)`` in seconds."""


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` model overrides; values are JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise WsvizError(f"--set takes key=value, got {item!r}.")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# Options a recipe sets; given explicitly, they override it. Without either, these defaults hold.
DEFAULTS: dict[str, Any] = {
    "epochs": None, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
    "schedule": "cosine", "step_size": 30, "milestones": [], "gamma": 0.1, "augment": "none", "warmup_epochs": 0,
    "plateau_patience": 10,
}


def build_parser() -> argparse.ArgumentParser:
    from wsviz.training.loop import LOADERS, OPTIMIZERS, SCHEDULES

    p = CliParser(prog="python -m wsviz.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="a paper's training protocol (--list-recipes); explicit options "
                   "override it")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--model", default=None, help="registered model (default: the recipe's)")
    p.add_argument("--dataset", default=None, help="dataset name or folder:PATH (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None, help="checkpoint folder (weights.safetensors + card.json)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default 128)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=None, help="default 0.1")
    p.add_argument("--momentum", type=float, default=None, help="default 0.9")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-4")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="default cosine")
    p.add_argument("--step-size", type=int, default=None)
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="multistep: lr *= gamma after these epochs")
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--warmup-epochs", type=int, default=None, help="first epochs at lr / 10")
    p.add_argument("--plateau-patience", type=int, default=None)
    p.add_argument("--augment", default=None, choices=["none", "cifar", "imagenet"],
                   help="training augmentation preset (default: the recipe's, else none)")
    p.add_argument("--loader", default="auto", choices=LOADERS,
                   help="data path: in-memory tensors or a streamed DataLoader (auto: stream folders and augmented sets)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (streamed data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0, help="protocol realisation (rot/scale datasets)")
    p.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option override")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true", help="download torchvision datasets if missing")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--resume", action="store_true", help="continue from the training state beside --out (a run "
                   "already complete there with the same options: nothing to do, exit 0)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint or a "
                   "killed run's training state (otherwise refused: --resume continues it)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (a fine-tune); the model, its options and the dataset "
                        "default to its card's")
    p.add_argument("--tie", action="append", default=[], metavar="LAYER,LAYER[,...]",
                   help="with --init-from: make these same-shape convolutions share one weight first (repeatable; "
                        "`python -m wsviz opportunities` ranks the candidates)")
    p.add_argument("--tie-init", default="lstsq", choices=["mean", "medoid", "lstsq", "lstsq-bn"],
                   help="the shared weight's start: the members' mean, medoid, the least-squares kernel that best "
                        "reproduces their outputs on calibration images (lstsq, default), or lstsq-bn: that kernel with "
                        "each member's input channels rescaled by its own preceding BatchNorm (better right after tying)")
    p.add_argument("--step-schedule", action="store_true",
                   help="anneal the cosine schedule after every optimiser step instead of every epoch (a fine-tune "
                        "of one epoch otherwise runs at a constant rate)")
    p.add_argument("--distill", type=float, default=0.0, metavar="T",
                   help="with --init-from: learn from that checkpoint's predictions softened by temperature T "
                        "(knowledge distillation; 4 is usual) as well as from the labels")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="the distillation term's share of the loss, 0..1 (default 1: predictions only)")
    p.add_argument("--feature-distill", type=float, default=0.0, metavar="W",
                   help="with --distill and a tied model: add W times the relative error of every tied block's output "
                        "to the untied model's (feature distillation; wsviz's fine-tune uses 3)")
    p.add_argument("--average-last", type=int, default=0, metavar="N",
                   help="end with the average of the last N steps' weights (torch's AveragedModel; N at most one epoch)")
    p.add_argument("--calibration", type=int, default=512,
                   help="training images for the least-squares kernel and the BatchNorm statistics (default 512)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="TensorBoard event folder (default: OUT.tensorboard beside OUT; 'none' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    p.add_argument("--max-running", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--gpu-slots", default=None, help=argparse.SUPPRESS)  # "0,1,2": one job per GPU
    return p


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left out from ``--recipe`` (if any), then from :data:`DEFAULTS`; refuse a run
    without a model, dataset, epochs or output folder."""
    recipe = None
    if getattr(args, "init_from", None):
        from wsviz.training.cards import read_card

        card = read_card(args.init_from)
        args.model = args.model or card["model"]
        args.dataset = args.dataset or card.get("dataset")
    if getattr(args, "tie", None) and not getattr(args, "init_from", None):
        raise WsvizError("--tie ties the convolutions of a trained model: give the checkpoint with --init-from.")
    if args.recipe:
        from wsviz.training.recipes import get_recipe

        recipe = get_recipe(args.recipe)
        if args.model is None:
            args.model = recipe.model
            args.set = [f"{k}={json.dumps(v)}" for k, v in recipe.overrides.items()] + list(args.set)
        if args.dataset is None:
            args.dataset = recipe.dataset
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            value = recipe.train.get(key, default) if recipe is not None else default
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "dataset", "epochs", "out") if getattr(args, k) is None]
    if missing:
        raise WsvizError(f"Give {', '.join(missing)} (or a --recipe that sets the model, dataset and epochs).")
    return args


def list_recipes_text() -> str:
    from wsviz.training.recipes import list_recipes

    return "\n".join(f"{r.name}\n    {r.source}\n    {r.describe()}" + (f"\n    note: {r.notes}" if r.notes else "")
                     for r in list_recipes())


def _config(args: argparse.Namespace):
    from wsviz.training.loop import TrainConfig, check_seed

    check_seed(args.data_seed, "data seed")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                      step_size=args.step_size, milestones=tuple(args.milestones), gamma=args.gamma,
                      seed=args.seed, amp=not args.no_amp, max_batches=args.max_batches, augment=args.augment,
                      warmup_epochs=args.warmup_epochs, plateau_patience=args.plateau_patience, loader=args.loader,
                      workers=args.workers, step_schedule=args.step_schedule, distill=args.distill,
                      distill_weight=args.distill_weight, feature_distill=args.feature_distill,
                      average_last=args.average_last)
    cfg.validate()
    return cfg


def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, wrap) under torchrun; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(local)

    def wrap(model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[local] if backend == "nccl" else None)

    return dist.get_rank(), world, wrap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_recipes:
        print(list_recipes_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    store = None
    if args.run_id:
        from wsviz.training.runstore import RunStore

        store = RunStore(args.runs_dir)

    def on_term(signum, frame):
        raise Cancelled(128 + signum)  # 143: terminated, as the convention says

    def finish(status: str, reason: str | None = None, **kw) -> None:
        if store is not None:
            try:
                store.finish(args.run_id, status, reason, **kw)
            except Exception:  # noqa: BLE001 - e.g. the disk holding the run store is full too:
                traceback.print_exc()  # the store marks the run failed once this process is gone

    signal.signal(signal.SIGTERM, on_term)
    rank = 0
    try:
        cfg = _config(apply_recipe(args))
        if args.resume and args.overwrite:
            raise WsvizError("--resume continues the run in --out, --overwrite starts it again: give one of them.")
        overrides = parse_set(args.set)
        if store is not None:
            _check_allowance_left(store, args)
            _wait_for_slot(store, args, sys.argv[1:] if argv is None else list(argv))
        rank, world, wrap = _distributed()
        device = args.device
        if world > 1 and device is None:
            import torch

            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        card = _train(args, cfg, overrides, store, rank, world, wrap, device)
        if world > 1:
            import torch.distributed as dist

            # Every rank reaches teardown before any closes its connections: a rank that is still
            # talking to a peer that has gone can abort in gloo's C++ threads (SIGABRT at exit).
            dist.barrier()
            dist.destroy_process_group()
        from wsviz.training.runstore import DIVERGED

        # a diverged run trained all its epochs (done), and says it diverged wherever it is listed
        finish("done", DIVERGED + card["diverged_reason"] if card.get("diverged") else None,
               test_accuracy=card["test_accuracy"])
        if rank == 0:
            if card.get("diverged"):
                print(f"warning: training diverged: {card['diverged_reason']}", file=sys.stderr)
            print(f"test accuracy {card['test_accuracy']:.4f}; checkpoint in {args.out}")
        return 0
    except OverWallTime as exc:
        limit, used = exc.args
        if rank == 0:
            _record_used(args.out, used)
        finish("cancelled", f"stopped at the wall-time limit of {limit / 3600:g} h per run (WSVIZ_QUOTA_HOURS, counted "
                            "over all its attempts); its finished epochs are kept")
        print("stopped: wall-time limit", file=sys.stderr)
        return 1
    except Cancelled as exc:
        finish("cancelled", "cancelled by the user")
        if rank == 0:
            print(cancelled_text(getattr(args, "out", None), bool(args.resume or getattr(args, "epochs_finished", 0))),
                  file=sys.stderr)
        return exc.args[0] if exc.args else 130
    except WsvizError as exc:
        finish("failed", str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        finish("failed", "out of memory: use a smaller batch size or model")
        print("error: out of memory", file=sys.stderr)
        return 3
    except Exception as exc:  # anything else: record why, keep the traceback in a job's log
        if store is not None or debug_requested(argv):
            traceback.print_exc()
        reason = failure_reason(exc, getattr(args, "out", None))
        print(f"error: {reason}", file=sys.stderr)
        finish("failed", reason)
        return 3 if reason.startswith(("out of memory", "the disk is full")) else 1


def cancelled_text(out: str | None, started_here: bool) -> str:
    """What a cancelled training leaves in ``out`` and how to go on from it, in a line. ``started_here``:
    whether the run in ``out`` is this one (it finished an epoch, or it was resumed), not one it was to replace."""
    from pathlib import Path

    from wsviz.training.cards import CARD, read_card
    from wsviz.training.run import recorded_epoch
    from wsviz.training.state import state_path

    if out is None:
        return "cancelled"
    if not started_here:
        return (f"cancelled before its first epoch finished: nothing of it was saved ({out} is as it was); run the "
                "command again to start over")
    try:
        card = read_card(out) if (Path(out) / CARD).is_file() else None
    except WsvizError:
        card = None
    if card is None:
        return f"cancelled: {out} holds no checkpoint of it; run the command again to start over"
    if card.get("complete"):
        return f"cancelled after the run had completed: {out} holds it whole"
    kept = f"cancelled: {out} keeps the checkpoint of epoch {card.get('epochs_done')} of {card.get('epochs')}"
    resumable = recorded_epoch(state_path(out))
    if resumable is None:
        return f"{kept}, with no training state to resume from"
    same = resumable == card.get("epochs_done")
    return (f"{kept} and the training state of {'it' if same else f'epoch {resumable}'}; run the same command with "
            f"--resume to continue after epoch {resumable}")


def failure_reason(exc: BaseException, out: str | None = None) -> str:
    """What the run store says about a failed run: plain words and what to do first. ``out``: the
    run's checkpoint folder (a full disk's advice depends on the training state kept beside it)."""
    from wsviz.training.checkpoint import disk_full_errno

    text = str(exc)
    low = text.lower()
    if disk_full_errno(exc) is not None:  # safetensors' own error too
        name = os.fsdecode(exc.filename) if isinstance(getattr(exc, "filename", None), (str, bytes)) else None
        where = f" writing {name}" if name else ""
        what = (exc.strerror if isinstance(exc, OSError) else None) or text.splitlines()[0][:200]
        if "</torch_" in text or "/dev/shm" in text:  # a DataLoader worker's tensors, not a file of the run's
            return (f"shared memory (/dev/shm) is full ({what}): train with fewer DataLoader workers (--workers 0 "
                    "reads in the training process) or give the machine a larger /dev/shm")
        from pathlib import Path

        run_folder = Path(out).resolve().parent if out is not None else None
        if name is not None and run_folder is not None and run_folder not in Path(name).resolve().parents:
            return (f"the disk holding {name} is full ({what}), outside the run's folder: free some space there, "
                    "then start the run again (or resume it, if it finished an epoch)")
        saving = ("the training state" if name and name.endswith(".state.safetensors") else
                  "the TensorBoard log" if name and "tfevents" in os.path.basename(name) else "the checkpoint")
        # Every file is written under a temporary name and renamed once whole: a failed write leaves the
        # last complete checkpoint and training state as they were, and the state resumes the run.
        from wsviz.training.state import state_path

        if out is not None and state_path(out).is_file():
            return (f"the disk is full ({what}{where}) while saving {saving}; free some space, then resume the run "
                    "(--resume on the command line, Resume on the Train page): its last complete checkpoint and "
                    "training state are kept")
        return (f"the disk is full ({what}{where}) while saving {saving}; free some space and start the run again "
                "(it had no finished epoch to resume from)")
    if "out of memory" in low or "can't allocate memory" in low or "cannot allocate memory" in low:
        return f"out of memory ({text.splitlines()[0][:300]}); use a smaller batch size or model"
    return f"{type(exc).__name__}: {text}"


def _wait_for_slot(store, args: argparse.Namespace, argv: list[str]) -> None:
    """Wait in the queue until the run store gives this run a slot.

    With ``--gpu-slots`` a slot is one GPU: once it is claimed, the process starts itself again
    (same pid, so the run store still knows it) with ``CUDA_VISIBLE_DEVICES`` set to that GPU
    alone, before CUDA is ever initialised.
    """
    slots = [s for s in args.gpu_slots.split(",") if s] if args.gpu_slots else None
    if slots is None:
        from wsviz.device import pick_device

        device = str(pick_device(args.device))
    while True:
        status = store.claim_slot(args.run_id, args.max_running, os.getpid(), "cuda" if slots else device, slots=slots)
        if status == "running":
            break
        if status != "queued":
            raise Cancelled()
        time.sleep(0.5)
    slot = store.get(args.run_id).slot
    if slots and slot is not None and os.environ.get("CUDA_VISIBLE_DEVICES") != slot:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "wsviz.train", *argv],
                  {**os.environ, "CUDA_VISIBLE_DEVICES": slot})
    if slots:
        print(f"pinned to GPU slot {slot}: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)


def _check_allowance_left(store, args: argparse.Namespace) -> None:
    """Refuse to resume a recorded run that has used its whole wall-time allowance in earlier attempts
    (the training state records the seconds used so far)."""
    from wsviz.training.run import check_allowance

    if args.resume:
        check_allowance(store.get(args.run_id).spec.get("max_seconds"), _used_before(args), args.out)


def _used_before(args: argparse.Namespace) -> float:
    """The wall-clock seconds the run used in its earlier attempts (0 for a fresh start)."""
    if not args.resume:
        return 0.0
    from wsviz.training.run import recorded_seconds
    from wsviz.training.state import state_path

    return recorded_seconds(state_path(args.out)) or 0.0


def _record_used(out: str, used: float) -> None:
    """A run stopped at its wall-time limit: the state records all the time used (the epoch cut short
    too), so a resume is refused rather than given the time that epoch had already spent."""
    from wsviz.training.run import record_seconds
    from wsviz.training.state import state_path

    spath = state_path(out)
    if not spath.is_file():
        return
    try:
        record_seconds(spath, used)
    except Exception:  # noqa: BLE001 - the stop itself is what matters; the log keeps why
        traceback.print_exc()


# A job resumed at once may find its previous attempt still exiting (closing its TensorBoard log): it waits
# this long for the checkpoint folder's lock; on the command line a second training is refused at once.
LOCK_WAIT_S = 30.0
LIVE_LOSS_EVERY_S = 1.0  # a background job records its live loss (and checks for a cancel) at most this often


def tensorboard_dir(out: str) -> str:
    """The default TensorBoard folder of checkpoint folder ``out``: beside it (``OUT.tensorboard``),
    like its training state, so the checkpoint folder holds exactly its weights and card."""
    return os.path.normpath(out) + ".tensorboard"


def _train(args, cfg, overrides, store, rank, world, wrap, device):
    from wsviz.training.run import run_training

    bar = None
    show = rank == 0 and not args.quiet and store is None

    def on_start(first: int) -> None:
        nonlocal bar
        if show:  # made as the first epoch starts (an error before that stays one line on stderr), so its
            from tqdm import tqdm  # rate and elapsed time count that epoch; a resumed run's bar starts where it is

            bar = tqdm(total=cfg.epochs, initial=first - 1, unit="epoch", desc=args.model)

    def on_epoch(m):
        args.epochs_finished = m.epoch  # a cancel then says which epoch is kept
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m.train_loss:.3f}", test_acc=f"{m.test_acc:.4f}")
        if store is not None:
            store.log_metrics(args.run_id, m.epoch, {"train_loss": m.train_loss, "train_acc": m.train_acc,
                                                      "test_loss": m.test_loss, "test_acc": m.test_acc,
                                                      "lr": m.lr, "images_per_s": m.images_per_s})

    last = [0.0]
    before = _used_before(args) if store is not None else 0.0
    started = store.get(args.run_id).started if store is not None else None
    started = time.time() if started is None else started

    def used_seconds() -> float:  # the run's wall-clock seconds over all its attempts
        return before + time.time() - started

    def on_step(epoch, step, loss):  # step: the optimiser step since the run's start (a resume continues it)
        if store is not None and time.monotonic() - last[0] > LIVE_LOSS_EVERY_S:  # live loss, at most once a second
            from wsviz.training.runstore import LIVE_LOSS

            last[0] = time.monotonic()
            store.log_metrics(args.run_id, epoch, {LIVE_LOSS: loss}, step=step)
            run = store.get(args.run_id)
            if run.cancel_requested:
                raise Cancelled()
            limit = run.spec.get("max_seconds")
            used = used_seconds()
            if limit and used > limit:
                raise OverWallTime(limit, used)

    tensorboard = args.tensorboard or tensorboard_dir(args.out)
    tie = None
    if args.tie:
        from wsviz.training.tying import TieSpec, parse_groups

        tie = TieSpec(parse_groups(args.tie), args.tie_init, args.calibration)
    try:
        return run_training(args.model, args.dataset, args.out, cfg, overrides=overrides, data_root=args.data_root,
                            data_seed=args.data_seed, download=args.download, device=device, on_epoch=on_epoch,
                            on_step=on_step, rank=rank, world_size=world, wrap=wrap, resume=args.resume,
                            tensorboard=None if tensorboard.lower() == "none" else tensorboard,
                            init_from=args.init_from, tie=tie, overwrite=args.overwrite,
                            used_seconds=used_seconds if store is not None else None,
                            lock_wait=LOCK_WAIT_S if store is not None else 0.0, on_start=on_start)
    finally:
        if bar is not None:
            bar.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
