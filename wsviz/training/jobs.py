"""Background training jobs: each run is its own OS process, outliving pages and the app.

:func:`launch` records a queued run and starts ``python -m wsviz.train --run-id ...`` in a
new session (so a page reload or an app restart does not end it) and returns at once. The
process itself waits for a free slot in the run store, so there is no scheduler daemon to
keep alive: one slot per visible GPU (each job pinned to its GPU with
``CUDA_VISIBLE_DEVICES``), or ``max_running`` slots on a machine without one.

:func:`resume` continues a failed or cancelled run from its last finished epoch.

Backends (``backend=`` or ``WSVIZ_BACKEND``): ``process`` (default, a local process),
``slurm`` (a SLURM job through submitit; ``WSVIZ_SLURM`` holds submitit's parameters as JSON,
e.g. ``{"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 1440}``) and
``submitit-local`` (submitit's local executor: the same code path as SLURM, on this machine).

Who acts: :func:`launch`, :func:`cancel` and :func:`resume` take the acting user (``actor``, an
:class:`wsviz.auth.Actor`; the account running this process when None). A viewer is refused,
a trainer may cancel or resume only the runs it launched, per-user quotas
(:mod:`wsviz.training.quotas`) are checked, and the run store's audit trail records who did
what and when.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from wsviz.auth import Actor, require_trainer
from wsviz.errors import WsvizError
from wsviz.training.loop import TrainConfig
from wsviz.training.quotas import Quotas, check_active, check_launch
from wsviz.training.runstore import Run, RunStore

DEFAULT_MAX_RUNNING = int(os.environ.get("WSVIZ_MAX_RUNNING", "1"))
BACKENDS = ("process", "slurm", "submitit-local")
ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SLOTS = 1_000_000  # on a cluster the scheduler (SLURM) decides how many jobs run at once


def gpu_slots() -> list[str]:
    """The GPUs jobs can be pinned to, as CUDA_VISIBLE_DEVICES names them (empty: CPU only)."""
    import torch

    n = torch.cuda.device_count()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:n] if visible else [str(i) for i in range(n)]


def launch(store: RunStore, model: str, dataset: str, cfg: TrainConfig, *, overrides: dict[str, Any] | None = None,
           name: str | None = None, max_running: int = DEFAULT_MAX_RUNNING, data_root: str | None = None,
           device: str | None = None, data_seed: int = 0, backend: str | None = None, actor: Actor | None = None,
           quotas: Quotas | None = None, init_from: str | Path | None = None, tie=None) -> Run:
    """Validate, record and start a run as ``actor``; returns the queued run immediately.

    A viewer, a launch past one of the user's quotas (``quotas``, default from the environment)
    or a dataset outside the data roots is refused with a WsvizError. ``init_from`` (a checkpoint
    folder) and ``tie`` (a :class:`wsviz.training.tying.TieSpec`) make it a fine-tune of that
    checkpoint, tied first: the same run as any other (queue, live curves, card, TensorBoard).
    """
    from wsviz.data.datasets import dataset_info
    from wsviz.models import get_spec
    from wsviz.training.run import check_trainable

    actor = require_trainer(actor, "launch a training")
    quotas = Quotas.from_env() if quotas is None else quotas
    cfg.validate()
    get_spec(model)
    dataset_info(dataset, data_root)
    check_trainable(model, dataset, overrides, data_root)
    if tie is not None and init_from is None:
        raise WsvizError("Tying needs a trained model to start from: give the checkpoint to tie (init_from).")
    if init_from is not None:
        from wsviz.training.cards import check_weights, read_card

        card = read_card(init_from)
        check_weights(init_from)
        if card["model"] != model:
            raise WsvizError(f"The checkpoint {init_from} holds a {card['model']!r}, not a {model!r}.")
    if max_running < 1:
        raise WsvizError(f"max_running must be at least 1, got {max_running}.")
    backend = _backend(backend)
    if backend == "process":  # a cluster's nodes read their own data roots, not this server's
        _check_data_here(dataset, data_root)
    check_launch(store, actor.name, cfg.epochs, quotas)  # every limit, disk use included, before the lock
    overrides = dict(overrides or {})
    spec = {"model": model, "dataset": dataset, "train_config": cfg.to_dict(), "overrides": overrides,
            "data_root": data_root, "device": device, "data_seed": data_seed, "max_seconds": quotas.max_seconds}
    if init_from is not None:
        spec["init_from"] = str(Path(init_from).resolve())
    if tie is not None:
        spec["tie"] = tie.to_dict()
    # counted again inside the transaction that records the run: launches arriving together cannot all pass
    run = store.create(model, dataset, spec, name, user=actor.name, role=actor.role,
                       admit=lambda: check_active(store, actor.name, quotas))
    return _start(store, run, max_running, backend, resume=False)


def _check_data_here(dataset: str, data_root: str | None) -> None:
    """Refuse a run whose data is not on this machine now, in words for whoever launched it (the page has
    no --data-root or --download): a background job never downloads, so it would only fail later."""
    from wsviz.data.datasets import DEFAULT_DATA_ROOT, dataset_info, load_split

    if dataset.startswith("folder:") or dataset_info(dataset, data_root).offline:
        return  # folders are checked against the data roots; the embedded sets are always here
    root = Path(data_root) if data_root else DEFAULT_DATA_ROOT
    try:
        load_split(dataset, "train", data_root=root)
    except WsvizError as exc:
        if "not found" not in str(exc):
            raise  # damaged files: that message says what to do
        raise WsvizError(f"Dataset {dataset!r} is not on this machine under {root}: put torchvision's copy of it "
                         "there (the folder WSVIZ_DATA_ROOT names), then launch again; the embedded mnist5k sets "
                         "need nothing.") from None


def resume(store: RunStore, run_id: str, *, max_running: int = DEFAULT_MAX_RUNNING, backend: str | None = None,
           actor: Actor | None = None, quotas: Quotas | None = None) -> Run:
    """Continue a failed or cancelled run from the training state of its last finished epoch.

    The run keeps its id, folder and the metrics of its finished epochs; it queues again like a
    new run. A run that never finished an epoch has nothing to resume (launch it again).
    """
    from wsviz.training.run import check_allowance, state_seconds
    from wsviz.training.state import load_state, state_path

    actor = require_trainer(actor, "resume a run")
    run = store.get(run_id)
    _check_owner(run, actor, "resume")
    if run.status not in ("failed", "cancelled"):
        raise WsvizError(f"Run {run.name} is {run.status}: only a failed or cancelled run can be resumed.")
    path = state_path(Path(run.out_dir) / "checkpoint")
    if not path.is_file():
        raise WsvizError(f"Run {run.name} finished no epoch, so there is nothing to resume: launch it again.")
    state = load_state(path)
    epoch = int(state["epoch"])
    # as the worker would refuse it, before the run is queued again
    check_allowance(run.spec.get("max_seconds"), state_seconds(state), run.out_dir, f"Run {run.name}")
    quotas = Quotas.from_env() if quotas is None else quotas
    epochs = int(run.spec.get("train_config", {}).get("epochs", 0))
    check_launch(store, actor.name, epochs, quotas)
    store.requeue(run_id, keep_epochs=epoch, admit=lambda: check_active(store, actor.name, quotas))
    store.audit(run_id, "resumed", actor.name, actor.role)
    return _start(store, store.get(run_id), max_running, _backend(backend), resume=True)


def resumable(run: Run) -> bool:
    """Whether :func:`resume` can continue ``run`` (failed or cancelled, with a finished epoch)."""
    from wsviz.training.state import state_path

    return run.status in ("failed", "cancelled") and state_path(Path(run.out_dir) / "checkpoint").is_file()


def _check_owner(run: Run, actor: Actor, what: str) -> None:
    """A trainer acts on its own runs (and on runs recorded before launchers were, which have no user)."""
    if run.user is not None and run.user != actor.name:
        raise WsvizError(f"Run {run.name} was launched by {run.user!r}: only they can {what} it.")


def _backend(backend: str | None) -> str:
    backend = backend or os.environ.get("WSVIZ_BACKEND", "process")
    if backend not in BACKENDS:
        raise WsvizError(f"backend must be one of {BACKENDS}, got {backend!r} (WSVIZ_BACKEND).")
    return backend


def train_command(store: RunStore, run: Run, max_running: int, *, resume: bool, gpus: list[str]) -> list[str]:
    """The ``python -m wsviz.train`` command line of a recorded run."""
    from wsviz.training.run import finetune_flags

    spec = run.spec
    cfg = TrainConfig(**{**spec["train_config"], "milestones": tuple(spec["train_config"]["milestones"])})
    out = Path(run.out_dir)
    cmd = [sys.executable, "-m", "wsviz.train", "--model", spec["model"], "--dataset", spec["dataset"],
           "--epochs", str(cfg.epochs), "--out", str(out / "checkpoint"), "--batch-size", str(cfg.batch_size),
           "--optimizer", cfg.optimizer, "--lr", repr(cfg.lr), "--momentum", repr(cfg.momentum),
           "--weight-decay", repr(cfg.weight_decay), "--schedule", cfg.schedule, "--step-size", str(cfg.step_size),
           "--gamma", repr(cfg.gamma), "--seed", str(cfg.seed), "--data-seed", str(spec["data_seed"]),
           "--augment", cfg.augment, "--warmup-epochs", str(cfg.warmup_epochs),
           "--plateau-patience", str(cfg.plateau_patience), "--loader", cfg.loader, "--workers", str(cfg.workers),
           "--tensorboard", str(out / "tensorboard"), "--run-id", run.id, "--runs-dir", str(store.root),
           "--max-running", str(max_running), "--quiet"]
    cmd += finetune_flags(cfg)
    if cfg.milestones:
        cmd += ["--milestones", *map(str, cfg.milestones)]
    if cfg.max_batches:
        cmd += ["--max-batches", str(cfg.max_batches)]
    if not cfg.amp:
        cmd.append("--no-amp")
    if spec.get("data_root"):
        cmd += ["--data-root", spec["data_root"]]
    device = spec.get("device")
    if device:
        cmd += ["--device", device]
    if gpus and (device is None or device.startswith("cuda")):
        cmd += ["--gpu-slots", ",".join(gpus)]
    if resume:
        cmd.append("--resume")
    for k, v in spec["overrides"].items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    if spec.get("init_from"):
        cmd += ["--init-from", spec["init_from"]]
    if spec.get("tie"):
        for g in spec["tie"]["groups"]:
            cmd += ["--tie", ",".join(g)]
        cmd += ["--tie-init", spec["tie"]["init"], "--calibration", str(spec["tie"]["calibration"])]
    return cmd


def _start(store: RunStore, run: Run, max_running: int, backend: str, *, resume: bool) -> Run:
    out = Path(run.out_dir)
    env, cwd = child_environment()
    if backend != "process":  # the cluster's nodes have their own GPUs: SLURM gives each job its own
        from wsviz.training.cluster import record_job

        cmd = train_command(store, run, CLUSTER_SLOTS, resume=resume, gpus=[])
        try:
            job = _submit(backend, out, cmd, env, cwd)
        except WsvizError as exc:
            store.finish(run.id, "failed", reason=str(exc))
            raise
        except Exception as exc:  # sbatch refused it (a bad partition, a limit): nothing is queued anywhere
            reason = f"{backend} refused the job: {str(exc).strip() or type(exc).__name__}"
            store.finish(run.id, "failed", reason=reason)
            raise WsvizError(f"Run {run.name}: {reason}. Fix WSVIZ_SLURM (submitit's SLURM parameters) and "
                             "launch again.") from exc
        record_job(out, backend, job.job_id)
        store.set_pid(run.id, None, host=f"{backend}:{job.job_id}")
        return store.get(run.id)
    cmd = train_command(store, run, max_running, resume=resume, gpus=gpu_slots())
    with open(out / "log.txt", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
    store.set_pid(run.id, proc.pid)
    return store.get(run.id)


def _submit(backend: str, out: Path, cmd: list[str], env: dict[str, str], cwd: str | None):
    """Submit ``cmd`` as one submitit job (SLURM, or submitit's local executor)."""
    import submitit

    folder = out / "submitit"
    if backend == "slurm":
        try:
            params = json.loads(os.environ.get("WSVIZ_SLURM", "{}"))
        except json.JSONDecodeError as exc:
            raise WsvizError(f"WSVIZ_SLURM must be JSON with submitit's SLURM parameters ({exc}).") from exc
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        from wsviz.auth import SECRET_ENV

        # sbatch hands the job the submitting shell's whole environment (--export=ALL): the job script
        # drops the access tokens before it starts anything
        params = {**params, "slurm_setup": [f"unset {' '.join(SECRET_ENV)}", *params.get("slurm_setup", [])]}
    else:
        params = {}
        executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(**{"timeout_min": 60 * 24, **params})
    return executor.submit(submitit.helpers.CommandFunction(cmd, cwd=cwd, env=env, verbose=False))


def child_environment() -> tuple[dict[str, str], str | None]:
    """(environment, working folder) in which ``python -m wsviz.train`` imports this same wsviz.

    Installed (the package's folder is one of the interpreter's site folders, or already on
    ``PYTHONPATH``), the child needs nothing and inherits the working folder. Run from a source
    checkout that is not installed, it runs in the checkout's root (``python -m`` puts the
    working folder first on the import path) with the root also put on ``PYTHONPATH``.

    The access tokens are left out: the job never signs anyone in, and submitit keeps a job's
    environment in the run folder (``submitit/*_submitted.pkl``), which other accounts may read.
    """
    import site

    from wsviz.auth import SECRET_ENV

    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    root = Path(__file__).resolve().parents[2]  # the folder that holds the wsviz package
    on_path = [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages(),
                                 *env.get("PYTHONPATH", "").split(os.pathsep)) if p]
    if any(_same(root, p) for p in on_path):
        return env, None
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env, str(root)


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b.resolve()
    except OSError:
        return False


def cancel(store: RunStore, run_id: str, *, actor: Actor | None = None) -> Run:
    """Ask a run to stop: a queued run ends before it starts, a running one gets SIGTERM."""
    from wsviz.training.runstore import HOST, pid_alive

    actor = require_trainer(actor, "cancel a run")
    run = store.get(run_id)
    _check_owner(run, actor, "cancel")
    if not run.active:
        raise WsvizError(f"Run {run.name} is {run.status}: only a queued or running run can be cancelled.")
    run = store.request_cancel(run_id)
    store.audit(run_id, "cancelled", actor.name, actor.role)  # a job on another machine sees the request within a second
    if run.active and run.host not in (None, HOST):  # a cluster's job: a pending one never reads the request
        from wsviz.training.cluster import cancel_job

        cancel_job(run.out_dir)
        store.reconcile(force=True)  # scancelled while pending: settle it now (cancelled, as requested)
    elif run.active and run.pid:
        if pid_alive(run.pid, run.pid_start):  # never a process that was given a dead run's pid
            try:
                os.kill(run.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        else:
            store.reconcile()  # its process is gone: settle it now (cancelled, as requested)
    return store.get(run_id)


def list_runs(store: RunStore) -> list[Run]:
    """All runs, newest first, after marking those whose process died as failed."""
    store.reconcile()
    return store.list()
