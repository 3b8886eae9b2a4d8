"""The run store: status and metrics of training runs in an embedded SQLite database.

Writers are the training processes, readers the app and the CLI; SQLite's WAL mode lets the
app read while a run writes. A run whose process died without saying so (SIGKILL, out of
memory, power loss) is found by :meth:`RunStore.reconcile`, which marks it failed. Liveness
is asked of psutil (any OS) for runs on this host; a run that a cluster runs elsewhere (SLURM
through submitit) reports its own end, and its scheduler is asked whether its job has ended
without saying so (:mod:`wsviz.training.cluster`).

The database is an index, not the only record: every run folder holds ``run.json`` (its id,
name and launch spec) and, once an epoch has finished, its checkpoint's ``card.json`` (config,
per-epoch metrics, test accuracy). So a damaged database (not a database at all, cut short by
a full disk or a bad copy) is moved aside -- never deleted -- and the store is rebuilt from the
folders (:meth:`RunStore.rebuild`, ``python -m wsviz runs rebuild``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from wsviz.errors import WsvizError

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
# A run that trained all its epochs but diverged (its card's ``diverged``: the final train loss far above
# chance's) ends done, with this prefix to its reason: its checkpoint is kept, listed marked as diverged.
DIVERGED = "diverged: "
DIVERGED_MARK = " [diverged]"  # after the run's name wherever runs are listed as variants


def is_diverged(status: str, reason: str | None) -> bool:
    """Whether a run with this status and reason finished but diverged (see :data:`DIVERGED`)."""
    return status == "done" and (reason or "").startswith(DIVERGED)
# The live training loss (at most once a second): its step is the optimiser step counted from the
# run's start (continued across a resume, as TensorBoard's x axis). Runs recorded before it was kept
# under LIVE_LOSS_IN_EPOCH, whose step is the batch within its epoch (1, 2, ... again every epoch).
LIVE_LOSS = "live_loss"
LIVE_LOSS_IN_EPOCH = "step_loss"
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
CREATE TABLE IF NOT EXISTS audit (
    run_id TEXT NOT NULL, action TEXT NOT NULL, user TEXT NOT NULL, role TEXT, time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_run ON audit(run_id);
"""
# Columns added after the first release: added to an older database when it is opened.
_ADDED_COLUMNS = {"slot": "TEXT", "host": "TEXT", "user": "TEXT"}
_COLUMNS = ("id", "name", "model", "dataset", "spec", "status", "reason", "pid", "pid_start", "cancel_requested",
            "device", "out_dir", "created", "started", "finished", "test_accuracy", "slot", "host", "user")
_SELECT = ", ".join(_COLUMNS)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RUN_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")  # what RunStore.create makes
DB_NAME = "wsviz.db"
RUN_FILE = "run.json"
DAMAGED_INFIX = ".damaged-"  # wsviz.db.damaged-YYYYmmdd-HHMMSS: a damaged store moved aside
RESTORED = "restored from its folder when the run store was rebuilt"
_DAMAGE_CODES = (11, 26)  # SQLITE_CORRUPT ("disk image is malformed"), SQLITE_NOTADB ("file is not a database")
_UNWRITABLE_CODES = (3, 8, 14)  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN

log = logging.getLogger(__name__)


class RunStoreError(WsvizError):
    """The run store cannot be used as it is; the message says why and what to do.

    Not the command line's fault: the CLI exits with status 1 (a failure at run time).
    """

    exit_code = 1


class RunStoreDamaged(RunStoreError):
    """The database file is damaged (not a database, truncated, malformed)."""


class RunStoreUnavailable(RunStoreError):
    """The database cannot be opened or written (a read-only or missing folder, permissions)."""


def _sqlite_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # primary code (extended codes carry more bits)


def _is_damage(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = _sqlite_code(exc)
    if code is not None:
        return code in _DAMAGE_CODES
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _is_unwritable(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and _sqlite_code(exc) in _UNWRITABLE_CODES


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
    user: str | None = None  # who launched it (None: a run recorded before the audit trail existed)
    pid_start: str | None = None  # its process's start time (a pid the OS gave to another process differs)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def diverged(self) -> bool:
        """Done, but its training diverged (the reason says why)."""
        return is_diverged(self.status, self.reason)


@dataclass
class FolderRun:
    """A run as its folder on disk describes it (``run.json`` and the checkpoint's card)."""

    id: str
    name: str
    model: str
    dataset: str
    spec: dict[str, Any]
    status: str  # done (a complete card) or failed (unfinished, or no checkpoint)
    reason: str | None
    out_dir: str
    created: float
    finished: float | None
    test_accuracy: float | None
    device: str | None
    metrics: list[tuple[int, str, float]] = field(default_factory=list)  # (epoch, key, value)
    user: str | None = None  # who launched it, as run.json says

    @property
    def diverged(self) -> bool:
        return is_diverged(self.status, self.reason)


@dataclass
class RebuildReport:
    """What :meth:`RunStore.rebuild` did: run ids added, run ids updated, and folders skipped with the reason."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{len(self.added)} run(s) restored from their folders, {len(self.updated)} updated"
        if self.skipped:
            text += f", {len(self.skipped)} folder(s) skipped (" + "; ".join(
                f"{k}: {v}" for k, v in list(self.skipped.items())[:3]) + (" ..." if len(self.skipped) > 3 else "") + ")"
        return text


@dataclass
class Recovery:
    """A damaged database that opening the store moved aside, and the rebuild that followed."""

    db_path: Path
    moved_to: Path
    reason: str
    rebuilt: RebuildReport

    def message(self) -> str:
        return (f"The run store {self.db_path} was damaged ({self.reason}). It was moved aside to {self.moved_to} "
                f"(nothing was deleted) and rebuilt from the run folders: {self.rebuilt.summary()}. "
                "Delete the damaged copy once you no longer need it.")


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

    def __init__(self, root: str | Path = "runs", *, recover: bool = True) -> None:
        """Open (or create) the store in ``root``.

        A damaged database is moved aside to ``wsviz.db.damaged-<time>`` and the store rebuilt from
        the run folders (``self.recovery`` says so), unless ``recover=False``: then it raises
        :class:`RunStoreDamaged`. A folder that cannot be written raises :class:`RunStoreUnavailable`.
        A new database in a folder that already holds runs is filled from them.
        """
        self.root = Path(root).resolve()
        self.db_path = self.root / DB_NAME
        self.recovery: Recovery | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreUnavailable(
                f"The runs folder {self.root} cannot be created ({exc.strerror or exc}): set WSVIZ_RUNS to a folder "
                "you can write, or fix the permissions of its parent.") from exc
        fresh = not self.db_path.exists()
        try:
            self._init_db()
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                damaged = self._probe_damage() if not fresh else None
                if damaged is not None:  # damaged, in a folder where it cannot be moved aside
                    raise RunStoreDamaged(self._damaged_message(
                        damaged, f", and it cannot be moved aside because {self.root} cannot be written ({exc}): make "
                                 "that folder writable or set WSVIZ_RUNS to another folder")) from exc
                raise self._unavailable(exc) from exc
            if not recover:
                raise RunStoreDamaged(self._damaged_message(exc)) from exc
            self.recovery = self._recover(exc)
            return
        if fresh and any(True for _ in _run_folders(self.root)):
            self.rebuild()

    def _init_db(self) -> None:
        """Open the database, check it page by page (cheap at run-store sizes) and create the tables.

        Serialised between processes by a lock file: sessions and jobs that open a new store at the same
        moment otherwise race, one switching it to WAL while another reads ("database is locked", which
        SQLite's busy timeout does not cover there) or both adding the same new column ("duplicate column
        name"), and the loser reported the store unusable (4 processes at once, 15 trials: 7 failures)."""
        try:
            lock = open(self.root / f".{DB_NAME}.init.lock", "a")  # noqa: SIM115 - closed by the with below
        except OSError:  # a folder that cannot be written: nothing to race with, and connect says why
            return self._create_tables()
        with lock:  # closing the file releases the lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._create_tables()

    def _create_tables(self) -> None:
        con = sqlite3.connect(self.db_path, timeout=30)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            problem = con.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":  # raised as SQLite does for a damaged page
                raise sqlite3.DatabaseError(f"database disk image is malformed ({problem})")
            con.executescript(_SCHEMA)  # commits by itself
            have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    con.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            con.commit()
        finally:
            con.close()

    def _probe_damage(self) -> BaseException | None:
        """Whether the database is damaged, read without writing anything (for a folder that cannot be written)."""
        try:
            con = sqlite3.connect(f"{self.db_path.as_uri()}?immutable=1", uri=True)
            try:
                problem = con.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            return exc if _is_damage(exc) else None
        return None if problem == "ok" else sqlite3.DatabaseError(f"database disk image is malformed ({problem})")

    def _damaged_message(self, exc: BaseException, extra: str = "") -> str:
        return (f"The run store {self.db_path} is damaged ({exc}){extra}. Run `python -m wsviz runs rebuild` (or "
                "reload the app) to move it aside and rebuild it from the run folders; shipped checkpoints work "
                "meanwhile.")

    def _unavailable(self, exc: BaseException) -> RunStoreUnavailable:
        return RunStoreUnavailable(
            f"The run store {self.db_path} cannot be opened for writing ({exc}): make {self.root} writable, or set "
            "WSVIZ_RUNS to a folder you can write. Training needs it; shipped checkpoints and finished runs work "
            "without it.")

    def _recover(self, exc: BaseException) -> Recovery | None:
        """Move the damaged database (and its -wal/-shm files) aside, start a new one, rebuild it from the folders.

        Serialised between processes by a lock file; a process that finds the work done by another
        (the database opens cleanly once it holds the lock) moves nothing.
        """
        try:
            lock = open(self.root / f".{DB_NAME}.lock", "a")
        except OSError as err:
            raise RunStoreDamaged(self._damaged_message(
                exc, f", and it cannot be moved aside because {self.root} cannot be written "
                     f"({err.strerror or err}): make that folder writable or set WSVIZ_RUNS to another folder")) from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._init_db()
                return None  # another process recovered it meanwhile
            except sqlite3.DatabaseError as again:
                if not _is_damage(again):
                    raise self._unavailable(again) from again
                exc = again
            base, n = f"{DB_NAME}{DAMAGED_INFIX}{time.strftime('%Y%m%d-%H%M%S')}", 1
            target = self.root / base
            while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
                n += 1
                target = self.root / f"{base}-{n}"
            try:
                os.rename(self.db_path, target)
                for suffix in ("-wal", "-shm"):  # a stale log must not be replayed into the new database
                    side = Path(f"{self.db_path}{suffix}")
                    if side.exists():
                        os.rename(side, f"{target}{suffix}")
            except OSError as err:
                raise RunStoreDamaged(self._damaged_message(
                    exc, f", and it cannot be moved aside ({err.strerror or err}): make {self.root} writable")) from exc
            log.warning("run store %s is damaged (%s): moved to %s", self.db_path, exc, target)
            self._init_db()
            report = self.rebuild()
        return Recovery(self.db_path, target, str(exc), report)

    @contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise self._unavailable(exc) from exc
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield con
            con.execute("COMMIT")
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if _is_damage(exc):
                raise RunStoreDamaged(self._damaged_message(exc)) from exc
            if _is_unwritable(exc):
                raise self._unavailable(exc) from exc
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
    def create(self, model: str, dataset: str, spec: dict[str, Any], name: str | None = None,
               user: str | None = None, role: str | None = None, admit: Callable[[], Any] | None = None) -> Run:
        """Record a queued run (and, with ``user``, who launched it in the audit trail). ``admit`` (a
        quota check raising WsvizError) runs inside the write transaction that records the run, so
        no other launch is recorded between its count and this run's row."""
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = safe_run_name(name) if name else f"{model}-{dataset}"[:64]
        out = self.run_dir(run_id)
        out.mkdir(parents=True)
        created = time.time()
        try:
            with self._connect(immediate=admit is not None) as con:
                if admit is not None:
                    admit()
                self._insert(con, run_id, name, model, dataset, spec, out, created, user, role)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        # Written after the row, so a rebuild never restores a run that is being created.
        _write_json(out / RUN_FILE, {"id": run_id, "name": name, "model": model, "dataset": dataset, "spec": spec,
                                     "created": created, "user": user})
        return self.get(run_id)

    @staticmethod
    def _insert(con, run_id, name, model, dataset, spec, out, created, user, role) -> None:
        con.execute("INSERT INTO runs (id, name, model, dataset, spec, status, out_dir, created, user) "
                    "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (run_id, name, model, dataset, json.dumps(spec), str(out), created, user))
        if user is not None:
            con.execute("INSERT INTO audit (run_id, action, user, role, time) VALUES (?, 'launched', ?, ?, ?)",
                        (run_id, user, role, created))

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

    def requeue(self, run_id: str, keep_epochs: int, admit: Callable[[], Any] | None = None) -> Run:
        """Make a failed or cancelled run queued again, to be resumed after epoch ``keep_epochs``: its
        metrics of later epochs (the epoch it was killed in) are dropped, the earlier ones kept.
        ``admit``: a quota check run inside the same write transaction (see :meth:`create`)."""
        with self._connect(immediate=True) as con:
            row = con.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise WsvizError(f"No run {run_id!r} in {self.db_path}.")
            if row[0] not in ("failed", "cancelled"):
                raise WsvizError(f"Run {run_id} is {row[0]}: only a failed or cancelled run can be resumed.")
            if admit is not None:
                admit()
            con.execute("UPDATE runs SET status='queued', reason=NULL, pid=NULL, pid_start=NULL, cancel_requested=0, "
                        "finished=NULL, slot=NULL, host=NULL, created=? WHERE id=?", (time.time(), run_id))
            con.execute("DELETE FROM metrics WHERE run_id=? AND epoch>?", (run_id, keep_epochs))
        return self.get(run_id)

    def audit(self, run_id: str, action: str, user: str, role: str | None = None) -> None:
        """Record that ``user`` did ``action`` (launched, cancelled, resumed) to a run, now."""
        with self._connect() as con:
            con.execute("INSERT INTO audit (run_id, action, user, role, time) VALUES (?, ?, ?, ?, ?)",
                        (run_id, action, user, role, time.time()))

    def audit_trail(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Who did what to which run and when, oldest first (of one run, or of all)."""
        with self._connect() as con:
            rows = con.execute("SELECT run_id, action, user, role, time FROM audit" +
                               (" WHERE run_id=?" if run_id else "") + " ORDER BY time, rowid",
                               (run_id,) if run_id else ()).fetchall()
        return [dict(zip(("run_id", "action", "user", "role", "time"), r)) for r in rows]

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

    def reconcile(self, *, force: bool = False) -> list[str]:
        """Mark runs whose process is gone as failed (cancelled if that was asked); returns their ids.

        A run on this host is asked of psutil. A run elsewhere (a cluster's job, queued or on a node)
        is asked of its scheduler (:func:`wsviz.training.cluster.job_end`, from submitit's cache unless
        ``force``), outside the write lock: sacct may take seconds.
        """
        from wsviz.training.cluster import job_end

        with self._connect() as con:
            away = con.execute("SELECT id, out_dir FROM runs WHERE status IN ('queued', 'running') "
                               "AND host IS NOT NULL AND host != ?", (HOST,)).fetchall()
        ended = {run_id: why for run_id, out in away if (why := job_end(out, force=force))}
        dead = []
        with self._connect(immediate=True) as con:
            rows = con.execute("SELECT id, status, pid, pid_start, cancel_requested, created, host, out_dir FROM runs "
                               "WHERE status IN ('queued', 'running')").fetchall()
            for run_id, status, pid, start, cancel, created, host, out_dir in rows:
                elsewhere = host is not None and host != HOST
                if (elsewhere and run_id not in ended) or (not elsewhere and pid_alive(pid, start)):
                    continue
                if not elsewhere and status == "queued" and pid is None and time.time() - created < 60:
                    continue  # its worker is still starting
                if cancel:
                    con.execute("UPDATE runs SET status='cancelled', reason='cancelled', finished=? WHERE id=?",
                                (time.time(), run_id))
                else:
                    why = ended.get(run_id) or ("the training process died without finishing (killed, out of "
                                                "memory, or crashed)" + _log_said(out_dir))
                    con.execute("UPDATE runs SET status='failed', reason=?, finished=? WHERE id=?",
                                (f"{why}; the last epoch's checkpoint, if any, is kept", time.time(), run_id))
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

    def rebuild(self) -> RebuildReport:
        """Bring back every run whose folder is on disk and missing from the database.

        A folder with a complete checkpoint card comes back ``done`` with its test accuracy and
        per-epoch metrics; one with an unfinished card or none comes back ``failed`` saying so.
        Runs already in the database are left as they are, except one restored unfinished whose
        card has since become complete (its process was still running), which becomes ``done``.
        Safe to run again, and while the app is open.
        """
        found, skipped = scan_run_folders(self.root)
        report = RebuildReport(skipped=skipped)
        with self._connect(immediate=True) as con:
            known = {rid: (status, reason) for rid, status, reason in
                     con.execute("SELECT id, status, reason FROM runs").fetchall()}
            for fr in found:
                if fr.id in known:
                    status, reason = known[fr.id]
                    if status == "failed" and (reason or "").startswith(RESTORED) and fr.status == "done":
                        con.execute("UPDATE runs SET status='done', reason=?, finished=?, test_accuracy=?, device=? "
                                    "WHERE id=?", (fr.reason, fr.finished, fr.test_accuracy, fr.device, fr.id))
                        con.execute("DELETE FROM metrics WHERE run_id=?", (fr.id,))
                        self._insert_metrics(con, fr)
                        report.updated.append(fr.id)
                    continue
                con.execute("INSERT INTO runs (id, name, model, dataset, spec, status, reason, device, out_dir, created, "
                            "started, finished, test_accuracy, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (fr.id, fr.name, fr.model, fr.dataset, json.dumps(fr.spec), fr.status, fr.reason, fr.device,
                             fr.out_dir, fr.created, None, fr.finished, fr.test_accuracy, fr.user))
                self._insert_metrics(con, fr)
                report.added.append(fr.id)
        if report.added or report.updated:
            log.info("run store %s rebuilt: %s", self.db_path, report.summary())
        return report

    @staticmethod
    def _insert_metrics(con: sqlite3.Connection, fr: FolderRun) -> None:
        t = fr.finished or fr.created
        con.executemany("INSERT INTO metrics (run_id, epoch, step, key, value, time) VALUES (?, ?, NULL, ?, ?, ?)",
                        [(fr.id, epoch, key, value, t) for epoch, key, value in fr.metrics])

    # ------------------------------------------------------------------ reads
    def _row(self, row: tuple) -> Run:
        (rid, name, model, dataset, spec, status, reason, pid, pid_start, cancel, device, out, created, started,
         finished, acc, slot, host, user) = row
        return Run(rid, name, model, dataset, json.loads(spec), status, reason, pid, device, out, created, started,
                   finished, acc, bool(cancel), slot, host, user, pid_start)

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

    def metric_times(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """[(epoch, when it was recorded), ...] of one metric, in insertion order: an epoch metric's
        times say when each epoch finished (the Train page's time left after a resume)."""
        with self._connect() as con:
            rows = con.execute("SELECT epoch, time FROM metrics WHERE run_id=? AND key=? ORDER BY rowid",
                               (run_id, key)).fetchall()
        return [(epoch, t) for epoch, t in rows]

    def metrics(self, run_id: str) -> dict[str, list[tuple[int, int | None, float]]]:
        """{key: [(epoch, step, value), ...]} in insertion order."""
        with self._connect() as con:
            rows = con.execute("SELECT key, epoch, step, value FROM metrics WHERE run_id=? ORDER BY rowid",
                               (run_id,)).fetchall()
        out: dict[str, list] = {}
        for key, epoch, step, value in rows:
            out.setdefault(key, []).append((epoch, step, value))
        return out


def _log_said(out_dir: str | None) -> str:
    """Where a local job's output went (its traceback, if it crashed), for the reason of a run that died."""
    log_file = Path(out_dir) / "log.txt" if out_dir else None
    return f": its log is {log_file}" if log_file is not None and log_file.is_file() else ""


def default_root() -> Path:
    return Path(os.environ.get("WSVIZ_RUNS", "runs"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _run_folders(root: Path) -> Iterator[Path]:
    """Folders of ``root`` named like a run id that hold a run's record or a checkpoint (no symlinks)."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for d in entries:
        if (_RUN_ID_RE.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
                and ((d / RUN_FILE).is_file() or (d / "checkpoint" / "card.json").is_file())):
            yield d


def _id_time(run_id: str) -> float:
    try:
        return time.mktime(time.strptime(run_id[:15], "%Y%m%d-%H%M%S"))
    except ValueError:
        return 0.0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_run_folder(folder: str | Path) -> FolderRun:
    """What one run folder says about its run, from ``run.json`` and the checkpoint card (JSON only);
    a WsvizError if it says too little to be listed."""
    from wsviz.training.cards import read_card

    d = Path(folder)
    meta: dict[str, Any] = {}
    if (d / RUN_FILE).is_file():
        try:
            meta = json.loads((d / RUN_FILE).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # meta stays {}
            if not (d / "checkpoint" / "card.json").is_file():
                raise WsvizError(f"{d / RUN_FILE} cannot be read ({exc}) and there is no checkpoint") from exc
        if not isinstance(meta, dict):
            meta = {}
    card, card_problem = None, None
    if (d / "checkpoint" / "card.json").is_file():
        try:
            card = read_card(d / "checkpoint")
        except WsvizError as exc:
            card_problem = str(exc)
    model = (card or {}).get("model") or meta.get("model")
    dataset = (card or {}).get("dataset") or meta.get("dataset")
    if not isinstance(model, str) or not isinstance(dataset, str):
        raise WsvizError(card_problem or f"{d} names no model and dataset (its {RUN_FILE} and card are missing or empty)")
    try:
        name = safe_run_name(meta.get("name"))
    except WsvizError:
        name = f"{model}-{dataset}"[:64]
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {
        "model": model, "dataset": dataset, "train_config": (card or {}).get("train_config", {}),
        "config": (card or {}).get("config", {}), "data_seed": (card or {}).get("data_seed", 0),
        "restored_from_card": True}
    created = _number(meta.get("created")) or _id_time(d.name)
    finished, status, reason, acc, metrics = None, "failed", None, None, []
    if card is not None:
        finished = (d / "checkpoint" / "card.json").stat().st_mtime
        acc = _number(card.get("test_accuracy"))
        for row in card.get("metrics") or []:
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                metrics += [(row["epoch"], k, float(v)) for k, v in row.items()
                            if k not in ("epoch", "seconds") and _number(v) is not None]
        if card.get("complete") is True:
            status = "done"
            if card.get("diverged"):
                reason = DIVERGED + str(card.get("diverged_reason") or "its final train loss is far above chance's")
        else:
            reason = (f"{RESTORED}; its checkpoint holds {card.get('epochs_done')} of {card.get('epochs')} epochs "
                      "(it was stopped, or its training was still running and is no longer tracked)")
    elif card_problem is not None:
        reason = f"{RESTORED}; its checkpoint cannot be used: {card_problem}"
    else:
        reason = f"{RESTORED}; it has no checkpoint (it ended before its first epoch finished)"
        log_file = d / "log.txt"
        finished = log_file.stat().st_mtime if log_file.is_file() else None
    return FolderRun(d.name, name, model, dataset, spec, status, reason, str(d.resolve()), created, finished, acc,
                     (card or {}).get("device") if isinstance((card or {}).get("device"), str) else None, metrics,
                     meta.get("user") if isinstance(meta.get("user"), str) else None)


def scan_run_folders(root: str | Path) -> tuple[list[FolderRun], dict[str, str]]:
    """Every run folder under ``root`` as its files describe it (no database needed), oldest first,
    and {folder name: why it was skipped}."""
    found, skipped = [], {}
    for d in _run_folders(Path(root)):
        try:
            found.append(read_run_folder(d))
        except (WsvizError, OSError) as exc:
            skipped[d.name] = str(exc)
    found.sort(key=lambda r: (r.created, r.id))
    return found, skipped


def damaged_copies(root: str | Path) -> list[Path]:
    """Damaged databases moved aside in ``root``, oldest first (kept until the user deletes them)."""
    try:
        return sorted(p for p in Path(root).glob(f"{DB_NAME}{DAMAGED_INFIX}*")
                      if p.is_file() and not p.name.endswith(("-wal", "-shm")))
    except OSError:
        return []


@dataclass
class StoreView:
    """Finished runs for the app's variant list, and what is wrong with the store (None when nothing is)."""

    done: list[tuple[str, str, Path]]  # (name, run id, checkpoint folder), newest first
    problem: str | None
    usable: bool  # whether the store itself could be opened (training needs it)
    cancelled: frozenset[str] = frozenset()  # ids among ``done`` of cancelled runs with a finished epoch
    diverged: frozenset[str] = frozenset()  # ids among ``done`` of runs that diverged (named with DIVERGED_MARK)


def _usable(run) -> bool:
    """Done, or cancelled after at least one finished epoch (its checkpoint holds that epoch)."""
    return run.status == "done" or (run.status == "cancelled"
                                    and (Path(run.out_dir) / "checkpoint" / "card.json").is_file())


def finished_runs(root: str | Path) -> StoreView:
    """The finished runs under ``root``, whatever state the database is in.

    A damaged database is moved aside and rebuilt (the message says so); one that cannot be opened
    leaves the finished runs listed from their folders, with the reason. A missing ``root`` is no
    problem: there are no runs yet.
    """
    root = Path(root)
    if not root.is_dir():
        return StoreView([], None, True)
    try:
        store = RunStore(root)
        runs = [r for r in store.list() if _usable(r)]
    except RunStoreError as exc:
        done = [r for r in scan_run_folders(root)[0] if _usable(r)]  # a folder says done or failed, never cancelled
        return StoreView([(_variant_name(r), r.id, Path(r.out_dir) / "checkpoint") for r in reversed(done)], str(exc),
                         False, diverged=frozenset(r.id for r in done if r.diverged))
    problem = store.recovery.message() if store.recovery else None
    copies = damaged_copies(root)
    if problem is None and copies:
        problem = (f"A damaged run store was moved aside to {copies[-1]} and the run list rebuilt from the run folders"
                   f" ({len(copies)} damaged cop{'y' if len(copies) == 1 else 'ies'} in {store.root}). Nothing is "
                   "missing that a folder holds; delete the damaged copies once you no longer need them.")
    return StoreView([(_variant_name(r), r.id, Path(r.out_dir) / "checkpoint") for r in runs], problem, True,
                     frozenset(r.id for r in runs if r.status == "cancelled"),
                     frozenset(r.id for r in runs if r.diverged))


def _variant_name(run) -> str:
    """The run's name as the variant list shows it: marked when its training diverged, so nobody compares
    it as a trained model unawares."""
    return run.name + (DIVERGED_MARK if run.diverged else "")
