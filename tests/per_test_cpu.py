"""A pytest plugin: the CPU seconds of each test, its own and its child processes' (Ray's
included): ``PYTHONPATH=. pytest -p tests.per_test_cpu ...`` (docs/contributing.md, the fast
suite's budget).

``--durations`` reports wall time, which on a shared machine says little, and misses the CPU a
test spends in Ray actors and subprocesses. Each pytest process (each xdist worker too) samples
``/proc`` every 0.5 s for its descendants (the GCS, raylet and actor workers of the Ray session it
started, launcher subprocesses) and appends one JSON line per test to
``$SKYRL_FN_PER_TEST_CPU_DIR/cpu_<worker>_<pid>.jsonl`` (default ``/tmp``): ``id``, ``t0`` (start,
epoch seconds), ``wall``, ``self`` (this process's CPU) and ``kids`` (descendants' CPU). A
descendant that lives less than 0.5 s is missed; the sampling thread's own CPU (~1 %) counts in
``self``. Sum by module with ``python tests/per_test_cpu.py [DIR]``.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import threading
import time

import pytest

INTERVAL_S = 0.5
_TICK = os.sysconf("SC_CLK_TCK")
_ME = os.getpid()
_seen: dict = {}
_lock = threading.Lock()


def _scan() -> None:
    """Update ``_seen[(pid, start time)]`` with the CPU ticks of every descendant of this process."""
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b") ", 1)[1].split()
                procs[int(pid)] = (int(fields[1]), fields[19], int(fields[11]) + int(fields[12]))
            except (OSError, IndexError):  # the process ended between listdir and read
                pass
    children = collections.defaultdict(list)
    for pid, (ppid, _, _) in procs.items():
        children[ppid].append(pid)
    todo, found = list(children[_ME]), []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children[pid])
    with _lock:
        for pid in found:
            key = (pid, procs[pid][1])
            _seen[key] = max(_seen.get(key, 0), procs[pid][2])


def _sample() -> None:
    while True:
        _scan()
        time.sleep(INTERVAL_S)


def _totals() -> tuple[float, float]:
    _scan()
    with _lock:
        return time.process_time(), sum(_seen.values()) / _TICK


_out = None


def pytest_configure(config):
    global _out
    out_dir = os.environ.get("SKYRL_FN_PER_TEST_CPU_DIR", "/tmp")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    _out = open(os.path.join(out_dir, f"cpu_{worker}_{_ME}.jsonl"), "a")
    threading.Thread(target=_sample, daemon=True).start()


def pytest_unconfigure(config):
    if _out is not None:
        _out.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.time()
    self0, kids0 = _totals()
    yield
    self1, kids1 = _totals()
    row = {"id": item.nodeid, "t0": t0, "wall": time.time() - t0, "self": self1 - self0, "kids": kids1 - kids0}
    _out.write(json.dumps(row) + "\n")
    _out.flush()


def main(argv: list[str]) -> None:
    """Print the CPU per module (and per pytest process) of the JSON lines in ``argv[0]``."""
    rows = []
    for path in glob.glob(os.path.join(argv[0] if argv else "/tmp", "cpu_*.jsonl")):
        worker = os.path.basename(path).split("_")[1]
        rows += [dict(json.loads(line), worker=worker) for line in open(path)]
    by_module = collections.defaultdict(lambda: [0.0, 0.0, 0, ""])
    for r in rows:
        m = by_module[r["id"].split("::")[0]]
        m[0] += r["self"]
        m[1] += r["kids"]
        m[2] += 1
        m[3] = r["worker"]
    print(f"{'CPU':>7} {'self':>7} {'kids':>7} {'tests':>5}  process  module")
    for module, (own, kids, n, worker) in sorted(by_module.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        print(f"{own + kids:7.1f} {own:7.1f} {kids:7.1f} {n:5d}  {worker:7}  {module}")


if __name__ == "__main__":
    main(sys.argv[1:])
