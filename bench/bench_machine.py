"""What the machine did during a benchmark: the hypervisor's steal (``/proc/stat``).

Steal is time the hypervisor gave this VM's CPUs to another guest. A process loses it while it
runs, so it shows in neither its CPU time nor its run-queue wait, and every timing taken while it
lasts is inflated unevenly; at W=2 a rank that lost time makes the other wait for it too. The
benchmarks print it beside their ratios: with more than a few percent, a figure is not comparable
with one from a quiet host.
"""

from __future__ import annotations


def cpu_ticks() -> tuple[int, int]:
    """``(steal, total)`` CPU ticks of the machine so far (zeros where ``/proc/stat`` is absent)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Steal between two :func:`cpu_ticks` readings, in percent of the machine's CPU time."""
    return 100.0 * (after[0] - before[0]) / max(1, after[1] - before[1])
