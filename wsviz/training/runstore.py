"""The run store: status and metrics of training runs in an embedded SQLite database.

Writers are the training processes, readers the app and the CLI; SQLite's WAL mode lets the
app read while a run writes. A run whose process died without saying so (SIGKILL, out of
memory, power loss) is found by :meth:`RunStore.reconcile`, which marks it failed. Liveness
is asked of psutil (any OS), and only of runs on this host: a run that a cluster runs
elsewhere (SLURM through submitit) reports its own end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from wsviz.errors import WsvizError

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, model TEXT NOT NULL, dataset TEXT NOT NULL,
    spec TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, pid INTEGER, pid_start TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0, device TEXT, out_dir TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, test_accuracy REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL, step INTEGER, key TEXT NOT NULL, value REAL NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, key);
"""
# Columns added after the first release: added to an older database when it is opened.
_ADDED_COLUMNS = {"slot": "TEXT", "host": "TEXT"}
_COLUMNS = ("id", "name", "model", "dataset", "spec", "status", "reason", "pid", "pid_start", "cancel_requested",
            "device", "out_dir", "created", "started", "finished", "test_accuracy", "slot", "host")
_SELECT = ", ".join(_COLUMNS)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Run:
    id: str
    name: str
    model: str
    dataset: str
    spec: dict[str, Any]
    status: str
    reason: str | None
    pid: int | None
    device: str | None
    out_dir: str
    created: float
    started: float | None
    finished: float | None
    test_accuracy: float | None
    cancel_requested: bool
    slot: str | None = None  # the GPU (CUDA_VISIBLE_DEVICES) a running job holds; None on CPU
    host: str | None = None  # the machine its process runs on

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (tells a live process from a reused pid), or None if it is gone."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            return None
        return repr(proc.create_time())
    except (psutil.Error, ValueError):
        return None


def pid_alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    now = process_start_time(pid)
    return now is not None and (start is None or now == start)


HOST = socket.gethostname()


def safe_run_name(name: str) -> str:
    """A run name that is a plain file name (no separators, no '..'), or a WsvizError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise WsvizError(f"Run name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit.")
    return name


class RunStore:
    """Runs live in ``root`` (default ``./runs``): ``wsviz.db`` plus one folder per run."""

    def __init__(self, root: str | Path = "runs") -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "wsviz.db"
        con = sqlite3.connect(self.db_path, timeout=30)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)  # commits by itself
            have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    con.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            con.commit()
        finally:
            con.close()

    @contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield con
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        finally:
            con.close()

    # ------------------------------------------------------------------ paths
    def run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not run_id or "\x00" in run_id:
            raise WsvizError(f"Run id {run_id!r} would leave the runs folder (it is not a run id).")
        path = (self.root / run_id).resolve()
        if path.parent != self.root:
            raise WsvizError(f"Run id {run_id!r} would leave the runs folder.")
        return path

    # ------------------------------------------------------------------ writes
    def create(self, model: str, dataset: str, spec: dict[str, Any], name: str | None = None) -> Run:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = safe_run_name(name) if name else f"{model}-{dataset}"[:64]
        out = self.run_dir(run_id)
        out.mkdir(parents=True)
        with self._connect() as con:
            con.execute("INSERT INTO runs (id, name, model, dataset, spec, status, out_dir, created) "
                        "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                        (run_id, name, model, dataset, json.dumps(spec), str(out), time.time()))
        return self.get(run_id)

    def claim_slot(self, run_id: str, max_running: int, pid: int, device: str,
                   slots: list[str] | None = None) -> str:
        """Atomically move a queued run to running if a slot is free.

        Without ``slots`` at most ``max_running`` runs run at once (CPU). With ``slots`` (GPU ids,
        as CUDA_VISIBLE_DEVICES names them) each running run holds one GPU: the run takes the
        first one no running run holds, recorded in :attr:`Run.slot`. Returns the run's status
        afterwards: 'running' (go), 'queued' (wait and retry) or a final status (cancelled while
        waiting).
        """
        self.reconcile()
        with self._connect(immediate=True) as con:
            row = con.execute("SELECT status, cancel_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise WsvizError(f"No run {run_id!r} in {self.db_path}.")
            status, cancel = row
            if status != "queued":
                return status
            if cancel:
                con.execute("UPDATE runs SET status='cancelled', reason='cancelled while queued', finished=? "
                            "WHERE id=?", (time.time(), run_id))
                return "cancelled"
            held = [r[0] for r in con.execute("SELECT slot FROM runs WHERE status='running'")]
            # First come, first served: runs queued earlier (and not being cancelled) go first.
            ahead = con.execute("SELECT COUNT(*) FROM runs WHERE status='queued' AND cancel_requested=0 AND "
                                "(created < (SELECT created FROM runs WHERE id=?) OR "
                                "(created = (SELECT created FROM runs WHERE id=?) AND id < ?))",
                                (run_id, run_id, run_id)).fetchone()[0]
            if slots:
                free = [s for s in slots if s not in held]
                if ahead >= len(free):
                    return "queued"
                slot, device = free[ahead], f"{device} (GPU {free[ahead]})"
            else:
                if len(held) + ahead >= max_running:
                    return "queued"
                slot = None
            con.execute("UPDATE runs SET status='running', pid=?, pid_start=?, device=?, started=?, slot=?, host=? "
                        "WHERE id=?", (pid, process_start_time(pid), device, time.time(), slot, HOST, run_id))
            return "running"

    def set_pid(self, run_id: str, pid: int | None, host: str | None = HOST) -> None:
        """Record the process that runs ``run_id`` (None while a cluster queues it, on ``host``)."""
        with self._connect() as con:
            con.execute("UPDATE runs SET pid=?, pid_start=?, host=? WHERE id=?",
                        (pid, process_start_time(pid) if pid else None, host, run_id))

    def requeue(self, run_id: str, keep_epochs: int) -> Run:
        """Make a failed or cancelled run queued again, to be resumed after epoch ``keep_epochs``: its
        metrics of later epochs (the epoch it was killed in) are dropped, the earlier ones kept."""
        with self._connect(immediate=True) as con:
            row = con.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise WsvizError(f"No run {run_id!r} in {self.db_path}.")
            if row[0] not in ("failed", "cancelled"):
                raise WsvizError(f"Run {run_id} is {row[0]}: only a failed or cancelled run can be resumed.")
            con.execute("UPDATE runs SET status='queued', reason=NULL, pid=NULL, pid_start=NULL, cancel_requested=0, "
                        "finished=NULL, slot=NULL, host=NULL, created=? WHERE id=?", (time.time(), run_id))
            con.execute("DELETE FROM metrics WHERE run_id=? AND epoch>?", (run_id, keep_epochs))
        return self.get(run_id)

    def log_metrics(self, run_id: str, epoch: int, values: dict[str, float], step: int | None = None) -> None:
        now = time.time()
        with self._connect() as con:
            con.executemany("INSERT INTO metrics (run_id, epoch, step, key, value, time) VALUES (?, ?, ?, ?, ?, ?)",
                            [(run_id, epoch, step, k, float(v), now) for k, v in values.items()])

    def finish(self, run_id: str, status: str, reason: str | None = None, test_accuracy: float | None = None) -> None:
        if status not in STATUSES or status in ACTIVE:
            raise ValueError(f"not a final status: {status}")
        with self._connect() as con:
            con.execute("UPDATE runs SET status=?, reason=?, finished=?, test_accuracy=COALESCE(?, test_accuracy) "
                        "WHERE id=? AND status IN ('queued', 'running')",
                        (status, reason, time.time(), test_accuracy, run_id))

    def request_cancel(self, run_id: str) -> Run:
        with self._connect() as con:
            con.execute("UPDATE runs SET cancel_requested=1 WHERE id=?", (run_id,))
        return self.get(run_id)

    def reconcile(self) -> list[str]:
        """Mark runs whose process is gone as failed; returns their ids."""
        dead = []
        with self._connect(immediate=True) as con:
            rows = con.execute("SELECT id, status, pid, pid_start, cancel_requested, created, host FROM runs "
                               "WHERE status IN ('queued', 'running')").fetchall()
            for run_id, status, pid, start, cancel, created, host in rows:
                if (host is not None and host != HOST) or pid_alive(pid, start):
                    continue  # elsewhere (a cluster node): that process reports its own end
                if status == "queued" and pid is None and time.time() - created < 60:
                    continue  # its worker is still starting
                if cancel:
                    con.execute("UPDATE runs SET status='cancelled', reason='cancelled', finished=? WHERE id=?",
                                (time.time(), run_id))
                else:
                    con.execute("UPDATE runs SET status='failed', reason=?, finished=? WHERE id=?",
                                ("the training process died without finishing (killed, out of memory, or "
                                 "crashed); the last epoch's checkpoint, if any, is kept", time.time(), run_id))
                dead.append(run_id)
        for run_id in dead:
            self._remove_partial_files(run_id)
        return dead

    def _remove_partial_files(self, run_id: str) -> None:
        """A process killed while saving leaves its temporary file (``.NAME.XXXX.tmp``, never a
        file under its final name): remove those of a run that is known to be dead."""
        try:
            folder = self.run_dir(run_id)
        except WsvizError:
            return
        for tmp in folder.rglob(".*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                try:
                    tmp.unlink()
                except OSError:
                    pass

    # ------------------------------------------------------------------ reads
    def _row(self, row: tuple) -> Run:
        (rid, name, model, dataset, spec, status, reason, pid, _start, cancel, device, out, created, started,
         finished, acc, slot, host) = row
        return Run(rid, name, model, dataset, json.loads(spec), status, reason, pid, device, out, created, started,
                   finished, acc, bool(cancel), slot, host)

    def get(self, run_id: str) -> Run:
        with self._connect() as con:
            row = con.execute(f"SELECT {_SELECT} FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise WsvizError(f"No run {run_id!r} in {self.db_path}.")
        return self._row(row)

    def list(self, status: str | None = None) -> list[Run]:
        with self._connect() as con:
            q = f"SELECT {_SELECT} FROM runs" + (" WHERE status=?" if status else "") + " ORDER BY created DESC"
            rows = con.execute(q, (status,) if status else ()).fetchall()
        return [self._row(r) for r in rows]

    def metrics(self, run_id: str) -> dict[str, list[tuple[int, int | None, float]]]:
        """{key: [(epoch, step, value), ...]} in insertion order."""
        with self._connect() as con:
            rows = con.execute("SELECT key, epoch, step, value FROM metrics WHERE run_id=? ORDER BY rowid",
                               (run_id,)).fetchall()
        out: dict[str, list] = {}
        for key, epoch, step, value in rows:
            out.setdefault(key, []).append((epoch, step, value))
        return out


def default_root() -> Path:
    return Path(os.environ.get("WSVIZ_RUNS", "runs"))
