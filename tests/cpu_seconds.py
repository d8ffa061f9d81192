"""CPU seconds of a command and of every process it starts, Ray's included:
``python tests/cpu_seconds.py [--top N] COMMAND...`` (docs/contributing.md, the fast suite's budget).

``getrusage(RUSAGE_CHILDREN)`` and ``/usr/bin/time`` miss Ray's processes: the GCS, the raylet and
the actor workers are reaped by processes that die without waiting for them. Instead the command
runs with a tag in its environment, which every descendant inherits (Ray's workers too), and
``/proc`` is sampled every 0.1 s: the sum of the last user + system time seen of each tagged
process. It undercounts by at most 0.1 s of CPU per process, and misses processes that live less
than 0.1 s. The machine may be busy: CPU seconds are far steadier than wall time under load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

INTERVAL_S = 0.1
STRAGGLERS_S = 20.0  # how long to follow tagged processes after the command exits (Ray's shutdown)


def _scan(tag: bytes, seen: dict, names: dict) -> None:
    """Update ``seen[(pid, start time)]`` with the CPU ticks of every tagged process (None: untagged)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b") ", 1)[1].split()
            key = (pid, fields[19])
            if key not in seen:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    seen[key] = 0 if tag in f.read() else None
                if seen[key] is not None:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        names[key] = f.read().replace(b"\0", b" ")[:120].decode(errors="replace")
            if seen[key] is not None:
                seen[key] = max(seen[key], int(fields[11]) + int(fields[12]))
        except (OSError, IndexError):  # the process ended between listdir and read
            pass


def main(argv: list[str]) -> int:
    top = 0
    if argv[:1] == ["--top"]:
        top, argv = int(argv[1]), argv[2:]
    if not argv:
        sys.exit("usage: python tests/cpu_seconds.py [--top N] COMMAND...")
    token = uuid.uuid4().hex
    tag = f"SKYRL_FN_CPU_TAG={token}".encode()
    seen: dict = {}
    names: dict = {}
    t0 = time.time()
    proc = subprocess.Popen(argv, env={**os.environ, "SKYRL_FN_CPU_TAG": token})
    while proc.poll() is None:
        _scan(tag, seen, names)
        time.sleep(INTERVAL_S)
    end = time.time() + STRAGGLERS_S
    while time.time() < end and any(v is not None and os.path.exists(f"/proc/{k[0]}") for k, v in seen.items()):
        _scan(tag, seen, names)
        time.sleep(INTERVAL_S)
    ticks = os.sysconf("SC_CLK_TCK")
    tagged = {k: v for k, v in seen.items() if v is not None}
    print(
        f"cpu_seconds: {sum(tagged.values()) / ticks:.1f} s CPU in {len(tagged)} processes, "
        f"{time.time() - t0:.1f} s wall, exit {proc.returncode}",
        file=sys.stderr,
    )
    for key, v in sorted(tagged.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v / ticks:7.1f} s  {names.get(key, '')}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
