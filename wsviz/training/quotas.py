"""Per-user limits on a shared server: queued and running runs, epochs and wall time per run, disk.

Set by the environment (unset or empty: no limit)::

    WSVIZ_QUOTA_RUNS=2        # queued + running runs per user
    WSVIZ_QUOTA_EPOCHS=100    # epochs per run
    WSVIZ_QUOTA_HOURS=12      # wall time per run (a run past it is stopped, as a cancel, keeping its epochs)
    WSVIZ_QUOTA_DISK_GB=20    # disk taken by the user's run folders

:func:`check_launch` is called by :func:`wsviz.training.jobs.launch` and ``resume``: a launch that
would pass a limit is refused with a WsvizError that shows the current usage. A user is the
run store's ``user`` column (who launched the run); runs recorded before it existed count for
nobody.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wsviz.envsettings import positive_number
from wsviz.errors import WsvizError
from wsviz.training.runstore import RunStore

GB = 1024 ** 3


@dataclass(frozen=True)
class Quotas:
    max_active: int | None = None  # queued + running runs
    max_epochs: int | None = None  # per run
    max_hours: float | None = None  # wall time per run
    max_disk_gb: float | None = None  # the user's run folders

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Quotas:
        env = os.environ if env is None else env

        def read(var: str, kind):
            return positive_number(env, var, kind, unset_hint=" (leave it unset for no limit)")

        return cls(read("WSVIZ_QUOTA_RUNS", int), read("WSVIZ_QUOTA_EPOCHS", int), read("WSVIZ_QUOTA_HOURS", float),
                   read("WSVIZ_QUOTA_DISK_GB", float))

    @property
    def max_seconds(self) -> float | None:
        return None if self.max_hours is None else self.max_hours * 3600


@dataclass(frozen=True)
class Usage:
    user: str
    active: int  # queued + running runs
    disk_bytes: int  # bytes in the user's run folders


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (symlinks not followed; files that vanish meanwhile skipped)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            total += st.st_size
    return total


def usage(store: RunStore, user: str) -> Usage:
    runs = [r for r in store.list() if r.user == user]
    return Usage(user, sum(r.active for r in runs), sum(folder_bytes(Path(r.out_dir)) for r in runs))


def rows(quotas: Quotas, use: Usage) -> list[tuple[str, str, str]]:
    """(limit, used, allowed) for a table on the Train page."""
    def lim(v, unit=""):
        return "no limit" if v is None else f"{v:g}{unit}"

    return [("queued + running runs", str(use.active), lim(quotas.max_active)),
            ("disk (GB)", f"{use.disk_bytes / GB:.2f}", lim(quotas.max_disk_gb)),
            ("epochs per run", "-", lim(quotas.max_epochs)),
            ("wall time per run (h)", "-", lim(quotas.max_hours))]


def check_active(store: RunStore, user: str, quotas: Quotas) -> None:
    """The runs limit alone (queued + running), for the write transaction that records a run: it reads
    the store only, so the lock is held for no longer than that (disk use is measured before, by
    :func:`check_launch`)."""
    if quotas.max_active is None:
        return
    active = sum(r.active for r in store.list() if r.user == user)
    if active >= quotas.max_active:
        raise WsvizError(f"User {user!r} has {active} queued or running run(s), the limit is {quotas.max_active} "
                         "(WSVIZ_QUOTA_RUNS): wait for one to end or cancel one.")


def check_launch(store: RunStore, user: str, epochs: int, quotas: Quotas) -> Usage:
    """The user's usage, or a WsvizError naming the limit a launch (or a resume) would pass and the usage."""
    if quotas.max_epochs is not None and epochs > quotas.max_epochs:
        raise WsvizError(f"{epochs} epochs is over the limit of {quotas.max_epochs} epochs per run "
                         "(WSVIZ_QUOTA_EPOCHS): choose fewer.")
    check_active(store, user, quotas)
    use = usage(store, user)
    if quotas.max_disk_gb is not None and use.disk_bytes >= quotas.max_disk_gb * GB:
        raise WsvizError(f"User {user!r}'s runs take {use.disk_bytes / GB:.2f} GB of disk, the limit is "
                         f"{quotas.max_disk_gb:g} GB (WSVIZ_QUOTA_DISK_GB): delete old run folders first.")
    return use
