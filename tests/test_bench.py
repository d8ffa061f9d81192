"""The SkyRL call-path mode of ``bench/estimators.py`` runs and prints its ratios (tiny sizes)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "estimators.py"


def test_skyrl_path_mode_prints_ratios_against_the_same_run():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--path", "compat", "--path", "table", "--batch", "64", "--group", "4",
         "--tokens", "8", "--rounds", "2", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for line in ("grpo       compat", "rloo       table", "x raw", "goal <= 1.25", "record, string uids", "equal copies", "goals: "):
        assert line in out, out
