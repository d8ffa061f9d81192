"""Ray sessions started by a test's subprocess (a driver that the test SIGKILLs)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Callable


def kill_ray_session(tmp: str) -> None:
    """SIGKILL what is left of the Ray session a killed driver started under ``tmp`` (its raylet,
    GCS and actors: a SIGKILLed driver cannot shut them down)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().decode(errors="replace")
        except OSError:
            continue
        if tmp in cmd or f"TMPDIR={tmp}" in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def sigkill_driver_when(script: str, argv: list[str], stop: Callable[[str], bool]) -> str | None:
    """Run ``python script *argv`` with its own Ray session, read its stdout until ``stop(line)``
    (which may wait a little before returning True), then SIGKILL it and what is left of its Ray
    session. Returns the line ``stop`` accepted (None if the driver ended first)."""
    tmp = tempfile.mkdtemp(prefix="skr", dir="/tmp")  # the child's Ray session (short: its socket paths have a limit)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, text=True, env=env)
    found = None
    try:
        for line in proc.stdout:
            if stop(line):
                found = line
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_ray_session(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return found
