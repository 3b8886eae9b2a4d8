"""Long analyses take turns across sessions (wsviz.concurrency)."""

from __future__ import annotations

import threading
import time

from wsviz.concurrency import HEAVY_SLOTS, heavy_slot


def test_at_most_the_slots_run_at_once_and_the_others_are_told_they_wait():
    running, peak, waits, lock = [0], [0], [], threading.Lock()

    def analysis(i: int) -> None:
        with heavy_slot(lambda s: waits.append((i, s)), poll=0.01):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=analysis, args=(i,)) for i in range(HEAVY_SLOTS + 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == HEAVY_SLOTS
    assert len({i for i, _ in waits}) >= 3  # every analysis beyond the slots waited, and was told so


def test_a_slot_is_given_back_when_the_analysis_fails():
    try:
        with heavy_slot():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    done = threading.Event()

    def other():
        with heavy_slot():
            done.set()

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=10)
    assert done.is_set()
