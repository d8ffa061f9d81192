"""Where an update's wall time goes: computing, waiting for a core, or waiting for something else.

A worker's update reports three timings (``PolicyWorker.update``, the data-parallel ranks'
``PolicyRank.update_share``)::

    update_seconds        wall time of the update
    update_cpu_seconds    CPU time of the worker's process meanwhile (all its threads: the
                          compute, and any thread of gloo, Ray or torch's pools that runs)
    update_queue_seconds  time the worker's computing thread was runnable but not running,
                          because other processes held the cores (Linux; absent elsewhere)

The rest of the wall time, ``update_seconds - update_cpu_seconds - update_queue_seconds``, the
thread spent blocked: at ``W > 1`` mostly in a collective, waiting for a slower rank. On a
machine with a core per rank and nothing else running, the queue time is ~0 and the wall time of
``W`` ranks is their CPU time plus that wait; ``bench/scale.py`` prints all three so that a ratio
measured on a busy machine can be told apart from one measured on an idle one.
"""

from __future__ import annotations

import threading
import time

__all__ = ["UPDATE_TIMINGS", "UpdateClock"]

#: The timings an update reports (a data-parallel step reports those of its slowest rank).
UPDATE_TIMINGS = ("update_seconds", "update_cpu_seconds", "update_queue_seconds")


def _queue_seconds() -> float | None:
    """This thread's total time runnable but waiting for a CPU (``/proc/.../schedstat``), None
    where the kernel does not report it."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class UpdateClock:
    """Start on creation; :meth:`timings` reads the three timings of the module docstring
    since then (call it from the thread that created the clock)."""

    def __init__(self) -> None:
        self._wall, self._cpu, self._queue = time.perf_counter(), time.process_time(), _queue_seconds()

    def timings(self) -> dict[str, float]:
        """``update_seconds``, ``update_cpu_seconds`` and, where the kernel reports it,
        ``update_queue_seconds``."""
        out = {"update_seconds": time.perf_counter() - self._wall, "update_cpu_seconds": time.process_time() - self._cpu}
        queue = _queue_seconds()
        if queue is not None and self._queue is not None:
            out["update_queue_seconds"] = queue - self._queue
        return out
