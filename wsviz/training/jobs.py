"""Background training jobs: each run is its own OS process, outliving pages and the app.

:func:`launch` records a queued run and starts ``python -m wsviz.train --run-id ...`` in a
new session (so a page reload or an app restart does not end it) and returns at once. The
process itself waits for a free slot in the run store (at most ``max_running`` at once), so
there is no scheduler daemon to keep alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from wsviz.errors import WsvizError
from wsviz.training.loop import TrainConfig
from wsviz.training.runstore import Run, RunStore

DEFAULT_MAX_RUNNING = int(os.environ.get("WSVIZ_MAX_RUNNING", "1"))


def launch(store: RunStore, model: str, dataset: str, cfg: TrainConfig, *, overrides: dict[str, Any] | None = None,
           name: str | None = None, max_running: int = DEFAULT_MAX_RUNNING, data_root: str | None = None,
           device: str | None = None, data_seed: int = 0) -> Run:
    """Validate, record and start a run; returns the queued run immediately."""
    from wsviz.data.datasets import dataset_info
    from wsviz.models import get_spec
    from wsviz.training.run import check_trainable

    cfg.validate()
    get_spec(model)
    dataset_info(dataset, data_root)
    check_trainable(model, dataset, overrides, data_root)
    if max_running < 1:
        raise WsvizError(f"max_running must be at least 1, got {max_running}.")
    overrides = dict(overrides or {})
    spec = {"model": model, "dataset": dataset, "train_config": cfg.to_dict(), "overrides": overrides,
            "data_root": data_root, "device": device, "data_seed": data_seed}
    run = store.create(model, dataset, spec, name)
    out = Path(run.out_dir)
    cmd = [sys.executable, "-m", "wsviz.train", "--model", model, "--dataset", dataset, "--epochs", str(cfg.epochs),
           "--out", str(out / "checkpoint"), "--batch-size", str(cfg.batch_size), "--optimizer", cfg.optimizer,
           "--lr", repr(cfg.lr), "--momentum", repr(cfg.momentum), "--weight-decay", repr(cfg.weight_decay),
           "--schedule", cfg.schedule, "--step-size", str(cfg.step_size), "--gamma", repr(cfg.gamma),
           "--seed", str(cfg.seed), "--data-seed", str(data_seed), "--run-id", run.id,
           "--runs-dir", str(store.root), "--max-running", str(max_running), "--quiet"]
    if cfg.milestones:
        cmd += ["--milestones", *map(str, cfg.milestones)]
    if cfg.max_batches:
        cmd += ["--max-batches", str(cfg.max_batches)]
    if not cfg.amp:
        cmd.append("--no-amp")
    if data_root:
        cmd += ["--data-root", data_root]
    if device:
        cmd += ["--device", device]
    import json

    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    env, cwd = child_environment()
    with open(out / "log.txt", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
    store.set_pid(run.id, proc.pid)
    return store.get(run.id)


def child_environment() -> tuple[dict[str, str], str | None]:
    """(environment, working folder) in which ``python -m wsviz.train`` imports this same wsviz.

    Installed (the package's folder is one of the interpreter's site folders, or already on
    ``PYTHONPATH``), the child needs nothing and inherits the working folder. Run from a source
    checkout that is not installed, it runs in the checkout's root (``python -m`` puts the
    working folder first on the import path) with the root also put on ``PYTHONPATH``.
    """
    import site

    env = dict(os.environ)
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


def cancel(store: RunStore, run_id: str) -> Run:
    """Ask a run to stop: a queued run ends before it starts, a running one gets SIGTERM."""
    run = store.request_cancel(run_id)
    if run.active and run.pid:
        try:
            os.kill(run.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return store.get(run_id)


def list_runs(store: RunStore) -> list[Run]:
    """All runs, newest first, after marking those whose process died as failed."""
    store.reconcile()
    return store.list()
