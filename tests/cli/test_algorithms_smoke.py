"""The issue-15 algorithms as a user runs them: ``launch/train.py`` (in a subprocess for the Ray run)."""

from __future__ import annotations

import json
import math
import runpy
import sys

import pytest

from .test_smoke import SCRIPT, _launch


def test_a_field_no_step_produces_exits_2_before_anything_starts(monkeypatch, capsys, tmp_path):
    """``launch/train.py`` run as ``__main__`` in this process (a fresh interpreter would cost ~5 s of
    CPU importing torch); starting Ray or building a model fails the test."""
    import ray

    import skyrl_fn.models.model as model

    def started(*a, **k):
        raise AssertionError("the run started before the fields were checked")

    for where, name in ((ray, "init"), (model, "load_model"), (model, "build_tiny_model")):
        monkeypatch.setattr(where, name, started)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        SCRIPT, "--algorithm.advantage-estimator", "gdpo", "--algorithm.estimator.reward-keys", "correct", "format",
        "--logging.run-dir", str(run_dir),
    ])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        "algorithm.advantage_estimator 'gdpo' reads extras.correct, extras.format; task 'digits' provides no per-sample fields"
        in err
    ), err
    assert not run_dir.exists(), "the run started before the fields were checked"


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
