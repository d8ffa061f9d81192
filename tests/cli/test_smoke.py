"""Smoke tests: ``launch/train.py`` as a user runs it: the training run in a subprocess (with its
own local Ray), the checks that stop before any run (a typo, ``--help``) as the same script in this
process (``runpy``; a subprocess would only add ~4.5 s of imports each, and
``tests/cli/test_user_errors.py::test_the_real_script_prints_one_line`` runs a user error through a
fresh interpreter)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time

import pytest
import ray

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "train.py")

#: A tiny budget of the embedded default that still learns visibly (~0.5 s/step on 2 cores).
FAST = ["--trainer.steps", "30", "--trainer.ckpt-interval", "15"]


def _launch(*argv, timeout=300, cwd=REPO):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", COLUMNS="200")
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _run_script(monkeypatch, *argv) -> int:
    """Run ``launch/train.py`` as ``__main__`` in this process with ``argv``; its exit code."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SKYRL_FN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(SCRIPT, run_name="__main__")
    return exc.value.code


@pytest.mark.ray
def test_tiny_budget_run_exits_0_reward_rises_and_writes_every_file(tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = _launch(*FAST, "--logging.run-dir", str(run_dir))
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the README's promise: the reward visibly rises within a minute on 2 cores (process start,
    # Ray and the actors included; slack for a shared CI machine)
    assert seconds < 120, f"{seconds:.0f} s"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["backend"] == "ray"
    rise = summary["reward_last_10pct"] - summary["reward_first_10pct"]
    assert rise >= 0.1, f"reward did not rise: {summary['summary']}"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert (run_dir / "reward_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(run_dir / "tb")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000015", "step_00000030"]
    assert "done: 30 steps" in proc.stdout
    print(f"smoke run: {seconds:.1f} s wall; {summary['summary']}")


def test_typo_exits_2_with_suggestion_and_builds_nothing(tmp_path, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    code = _run_script(monkeypatch, "--algorithm.advantage-estimator", "gpro", "--logging.run-dir", str(run_dir))
    out, err = capfd.readouterr()
    assert code == 2
    assert "unknown advantage estimator 'gpro'; did you mean 'grpo'?" in err
    assert not run_dir.exists(), "the run started before the name was checked"
    assert "Started a local Ray" not in err + out and not ray.is_initialized()


def test_help_lists_registered_names_including_a_plugins(tmp_path, monkeypatch, capfd):
    plugin = tmp_path / "help_plugin.py"
    plugin.write_text(
        "from skyrl_fn import DEFAULT_TABLE\n\n"
        "def register(table):\n"
        "    return table.register('from_help_plugin', DEFAULT_TABLE.estimator('grpo'), kind='advantage_estimator')\n"
    )
    code = _run_script(monkeypatch, "--plugin", str(plugin), "--help")
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr[-2000:]
    out = " ".join(stdout.split())
    for name in ("grpo", "dr_grpo", "rloo", "gae", "from_help_plugin", "regular", "token_mean", "--algorithm.advantage-estimator"):
        assert name in out, name
