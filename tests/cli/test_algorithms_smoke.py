"""The issue-15 algorithms as a user runs them: ``launch/train.py`` in a subprocess."""

from __future__ import annotations

import json
import math

import pytest

from .test_smoke import _launch


def test_a_field_no_step_produces_exits_2_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(
        "--algorithm.advantage-estimator", "gdpo", "--algorithm.estimator.reward-keys", "correct", "format",
        "--logging.run-dir", str(run_dir), timeout=120,
    )
    assert proc.returncode == 2
    assert (
        "algorithm.advantage_estimator 'gdpo' reads extras.correct, extras.format; task 'digits' provides no per-sample fields"
        in proc.stderr
    ), proc.stderr
    assert not run_dir.exists(), "the run started before the fields were checked"
    assert "Started a local Ray" not in proc.stderr + proc.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_gdpo_with_prompt_mean_and_a_verl_kl_name_trains_on_ray(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(
        "--trainer.steps", "4", "--trainer.ckpt-interval", "4", "--trainer.micro-batch-size", "3",
        "--algorithm.advantage-estimator", "gdpo", "--algorithm.loss-reduction", "prompt_mean",
        "--algorithm.use-kl-loss", "--algorithm.kl-estimator", "low_var_kl+",
        "--logging.run-dir", str(run_dir),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["backend"] == "ray"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl_loss"]) for r in rows), rows
