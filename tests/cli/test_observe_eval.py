"""The observer with held-out evaluation rows: the step-0 baseline, before -> after, the curve."""

from __future__ import annotations

import io
import json

from skyrl_fn.cli.observe import RunObserver, summary_line


def _rows():
    yield {"step": 0, "eval_accuracy": 0.125, "eval_reward": 0.2}
    for s in range(1, 5):
        row = {"step": s, "reward": 0.1 * s, "loss": 0.5, "tokens_per_s": 100.0}
        if s % 2 == 0:
            row["eval_accuracy"] = 0.125 + 0.1 * s
        yield row


def test_summary_prints_eval_before_and_after_and_counts_training_steps():
    line = summary_line(list(_rows()), seconds=3.0, run_dir="r")
    assert line.startswith("done: 4 steps in 3.0 s")
    assert "eval accuracy 0.125 -> 0.525 (+0.400)" in line
    assert "eval" not in summary_line([r for r in _rows() if "reward" in r and "eval_accuracy" not in r], seconds=1, run_dir="r")


def test_observer_writes_the_eval_rows_and_the_curve(tmp_path):
    out = io.StringIO()
    with RunObserver(str(tmp_path), total_steps=4, progress=False, tensorboard=False, out=out) as obs:
        for row in _rows():
            obs.on_step(row)
        line = obs.finish()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[0]["eval_accuracy"] == 0.125
    assert (tmp_path / "reward_kl.png").stat().st_size > 1000 and "eval accuracy" in line
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4
