"""Ray sessions started by a test's subprocess (a driver that the test SIGKILLs)."""

from __future__ import annotations

import os
import signal


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
