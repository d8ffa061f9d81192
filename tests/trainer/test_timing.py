"""An update's timings: wall, CPU and queue time, the CPU time counting this process's work only."""

from __future__ import annotations

import sys
import time

import pytest

from skyrl_fn.trainer.timing import UPDATE_TIMINGS, UpdateClock


def test_the_clock_tells_computing_from_sleeping():
    clock = UpdateClock()
    end = time.process_time() + 0.05
    while time.process_time() < end:  # compute
        pass
    time.sleep(0.1)  # blocked: wall time without CPU time
    got = clock.timings()
    assert set(got) <= set(UPDATE_TIMINGS) and {"update_seconds", "update_cpu_seconds"} <= set(got)
    assert got["update_cpu_seconds"] >= 0.05
    assert got["update_seconds"] >= got["update_cpu_seconds"] + 0.1
    if sys.platform == "linux":
        assert 0.0 <= got["update_queue_seconds"] <= got["update_seconds"]
    else:
        pytest.skip("the queue time is read from Linux's schedstat")
