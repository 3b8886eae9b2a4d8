"""Long analyses take turns, so one session's sweep cannot starve everyone else's page.

Streamlit runs every browser session's script in its own thread of one server process, and
the models are shared between them. A slider update is small (one image through a few
models) and runs at once; a long analysis (a sweep over a test set, a re-evaluation, an
embedding) holds one of ``WSVIZ_HEAVY_SLOTS`` (default 1) process-wide slots while it runs, so
however many sessions start one, at most that many compete with the live updates for the CPU.
A session that waits is told so, and can be stopped while it waits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HEAVY_SLOTS = max(1, int(os.environ.get("WSVIZ_HEAVY_SLOTS", "1")))
_slots = threading.BoundedSemaphore(HEAVY_SLOTS)


@contextmanager
def heavy_slot(wait: Callable[[float], None] | None = None, poll: float = 0.25) -> Iterator[None]:
    """Hold one of the process's slots for long work.

    While another analysis holds them, ``wait(seconds waited so far)`` is called every ``poll``
    seconds (a page shows a message there; Streamlit stops a script that was rerun at that call).
    """
    t0 = time.monotonic()
    while not _slots.acquire(timeout=poll):
        if wait is not None:
            wait(time.monotonic() - t0)
    try:
        yield
    finally:
        _slots.release()
