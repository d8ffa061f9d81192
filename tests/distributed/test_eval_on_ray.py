"""Held-out evaluation on the path users take: ``launch/train.py`` on Ray, and in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--data.task", "arithmetic", "--trainer.steps", "3", "--trainer.prompts-per-step", "2",
    "--rollout.samples-per-prompt", "2", "--rollout.max-new-tokens", "4", "--eval.every", "2", "--eval.size", "3",
    "--logging.no-progress", "--logging.no-tensorboard",
]


@pytest.mark.ray
# Both in make test-all (a launcher subprocess each); make test checks evaluation through the
# CLI in-process (tests/cli/test_observe_eval.py; the same evaluate() every worker calls).
@pytest.mark.slow
@pytest.mark.parametrize("where", [[], ["--ray.no-use-ray"]], ids=["ray", "in-process"])
def test_eval_rows_at_step_0_every_n_and_the_end(tmp_path, where):
    run_dir = tmp_path / "run"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), *TINY, *where, "--logging.run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [("eval_accuracy" in r) for r in rows] == [True, False, True, True]
    assert all(r["eval_size"] == 3 and 0 <= r["eval_response_length"] <= 4 for r in rows if "eval_size" in r)
    assert "eval accuracy 0.000 ->" in proc.stdout and "done: 3 steps" in proc.stdout
