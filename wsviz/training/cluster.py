"""The cluster side of a run: which submitit job runs it, and what its scheduler says of that job.

A run submitted through submitit (``slurm`` or ``submitit-local``) is first a job in a queue, then a
process on some node. The worker reports its own end to the run store; but a job the scheduler
cancels, times out or loses with its node (or one that never started and is cancelled while
pending) reports nothing. :func:`record_job` writes ``job.json`` into the run folder at submission,
:func:`job_end` asks the scheduler (submitit's own state watcher, so ``sacct`` is called at most every
few minutes however often the app asks) whether that job has ended, and :func:`cancel_job` cancels
it there (``scancel``). When no state can be read (no ``sacct``: accounting is off) nothing is
guessed: the run is left as it is.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
log = logging.getLogger(__name__)


def record_job(out_dir: str | Path, backend: str, job_id: str) -> None:
    """Write which job runs the run in ``out_dir`` (replacing the record of an earlier submission)."""
    from wsviz.training.runstore import _write_json, process_start_time

    out = Path(out_dir)
    rec: dict[str, Any] = {"backend": backend, "job_id": str(job_id), "folder": str(out / "submitit")}
    if backend == "submitit-local":  # the job id is the local process's pid
        rec["pid_start"] = process_start_time(int(job_id))
    _write_json(out / JOB_FILE, rec)


def read_job(out_dir: str | Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((Path(out_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("backend") and rec.get("job_id") else None


def describe(rec: dict[str, Any]) -> str:
    return f"{'SLURM' if rec['backend'] == 'slurm' else 'submitit local'} job {rec['job_id']}"


def job_end(out_dir: str | Path, *, force: bool = False) -> str | None:
    """Why the run in ``out_dir`` cannot still be running (a sentence), or None while its job may run
    (pending, running, or no state can be read). ``force`` asks the scheduler now rather than from
    submitit's cache."""
    rec = read_job(out_dir)
    if rec is None:
        return None
    if rec["backend"] == "submitit-local":
        from wsviz.training.runstore import pid_alive

        if pid_alive(int(rec["job_id"]), rec.get("pid_start")):
            return None
        return f"its {describe(rec)} exited without the run saying it ended; its log is in {rec['folder']}"
    state = _slurm_state(rec["job_id"], force)
    if state is None:
        return None
    return (f"its {describe(rec)} ended as {state} without the run saying it ended (cancelled, timed out or lost "
            f"by the scheduler); SLURM's log of it is in {rec['folder']}")


def _slurm_state(job_id: str, force: bool) -> str | None:
    """SLURM's final state of the job (e.g. 'FAILED', 'NODE_FAIL'), or None if it may still run or is unknown."""
    from submitit.slurm.slurm import SlurmJob

    watcher = SlurmJob.watcher  # one per process, shared with submitit: it rate-limits the sacct calls
    mode = "force" if force else "standard"
    if not watcher.is_done(job_id, mode=mode):  # PENDING, RUNNING, ... and UNKNOWN (no answer) all say "not done"
        return None
    return watcher.get_state(job_id, mode="cache")


def cancel_job(out_dir: str | Path) -> str | None:
    """Cancel the run's job on its cluster; returns why that could not be done (None when it was asked).

    A SLURM job is scancelled: a pending one leaves the queue, a running one gets SIGTERM (the worker
    then records itself cancelled). A submitit-local job needs nothing: it runs here, so the worker
    reads the cancel request from the run store like any local run.
    """
    rec = read_job(out_dir)
    if rec is None or rec["backend"] != "slurm":
        return None
    try:
        out = subprocess.run(["scancel", rec["job_id"]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"could not scancel {describe(rec)} ({exc})"
    else:
        if out.returncode == 0:
            return None
        msg = f"scancel {rec['job_id']} failed: {(out.stderr or out.stdout).strip()}"
    log.warning(msg)
    return msg
