"""Observability: JSONL / TensorBoard rows, the atomic PNG and summary, resume trimming."""

from __future__ import annotations

import io
import json
import math
import os

import pytest

from skyrl_fn.cli.observe import RunObserver, atomic_write, first_last_mean, metric, summary_line


def _rows(n):
    return [{"reward": 0.1 + 0.8 * i / max(n - 1, 1), "loss": 1.0 / (i + 1), "kl": 0.01 * i, "tokens_per_s": 500.0} for i in range(n)]


def test_observer_writes_every_output(tmp_path):
    out = io.StringIO()
    with RunObserver(str(tmp_path), total_steps=10, progress=True, out=out, config={"a": 1}) as obs:
        for i, m in enumerate(_rows(10), start=1):
            obs.on_step(m, step=i)
        line = obs.finish({"extra_key": 3})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 11))
    assert json.loads(lines[-1])["reward"] == pytest.approx(0.9)
    png = (tmp_path / "reward_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["extra_key"] == 3 and summary["config"] == {"a": 1}
    assert summary["reward_last_10pct"] > summary["reward_first_10pct"]
    assert os.listdir(tmp_path / "tb"), "no TensorBoard events"
    assert line in out.getvalue() and "reward 0.100 -> 0.900" in line and "\n" not in line
    # No temp files left behind by the atomic writes.
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    with RunObserver(str(tmp_path), total_steps=6, progress=False, tensorboard=False, plot=False) as obs:
        for i, m in enumerate(_rows(6), start=1):
            obs.on_step(m, step=i)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "rew')  # torn line of a killed run
    with RunObserver(str(tmp_path), total_steps=6, start_step=4, progress=False, tensorboard=False, plot=False) as obs:
        obs.on_step({"reward": 1.0, "step": 5})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(str(target), boom)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_metric_helpers():
    assert metric({"reward": 2}, "reward") == 2.0
    assert math.isnan(metric({}, "kl"))
    assert first_last_mean([0, 0, 1, 1] * 5) == (0.0, 1.0)
    assert all(math.isnan(x) for x in first_last_mean([]))
    assert summary_line([], seconds=1.0, run_dir="r").startswith("done: 0 steps")
