"""Batch transforms through the launcher on Ray (the path users take): each loop-level transform
trains a few steps, logs its kept/dropped counts per step and in summary.json, and the Ray run
gives the in-process run's metrics."""

from __future__ import annotations

import json

import pytest

from skyrl_fn.cli import main

pytestmark = pytest.mark.ray

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress", "--logging.no-tensorboard",
    "--logging.no-plot", "--trainer.steps", "3", "--trainer.ckpt-interval", "0", "--trainer.max-consecutive-skips", "3",
]
# Time-dependent metrics differ between runs; everything else must match.
_TIMING = {"step_seconds", "rollout_seconds", "rollout_tokens_per_s", "tokens_per_s", "update_seconds", "update_cpu_seconds", "update_queue_seconds"}

CASES = {
    "dynamic_sampling+overlong_filter": [
        "--algorithm.batch-transforms", "overlong_filter", "dynamic_sampling",
        "--algorithm.transform.dynamic-sampling.max-sample-batches", "3",
    ],
    "overlong_penalty+zero_variance_filter": [
        "--algorithm.batch-transforms", "overlong_penalty", "zero_variance_filter",
        "--algorithm.transform.overlong-penalty.overlong-buffer-len", "2",
    ],
    "dynamic_sampling_replace+kl": [
        "--algorithm.batch-transforms", "dynamic_sampling", "--algorithm.transform.dynamic-sampling.type", "replace",
        "--algorithm.transform.dynamic-sampling.max-sample-batches", "2", "--algorithm.use-kl-loss",
    ],
}


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_transform_counts(summary, run_dir, steps: int, case: str) -> None:
    """The loop-level transforms of ``case`` logged their kept/dropped counts at every one of
    ``steps`` steps of a Ray run, and summary.json sums them."""
    assert summary.steps == steps and len(summary.history) == steps
    rows = [r for r in _rows(run_dir) if "batch_sampled_batches" in r]
    assert len(rows) == steps
    for r in rows:
        assert r["batch_sampled_groups"] == 2 * r["batch_sampled_batches"]
        assert r["batch_kept_groups"] + r["batch_dropped_groups"] + r["batch_surplus_groups"] >= r["batch_kept_groups"]
    with open(run_dir / "summary.json") as f:
        saved = json.load(f)
    assert saved["backend"] == "ray"
    assert saved["batch_transforms"]["sampled_batches"] == sum(r["batch_sampled_batches"] for r in rows)
    assert saved["batch_transforms"]["dropped_groups"] == sum(r["batch_dropped_groups"] for r in rows)
    if case.startswith("overlong_penalty"):
        assert any(r["batch_shaped"] > 0 for r in rows)


# Each Ray run starts actor processes that import torch and transformers (~5 s of CPU each): make
# test runs the dynamic_sampling+overlong_filter case inside the Ray run of
# tests/cli/test_losses_on_ray.py (same layout and task), make test-all every case here.
@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["dynamic_sampling+overlong_filter", "overlong_penalty+zero_variance_filter", "dynamic_sampling_replace+kl"]
)
def test_each_loop_level_transform_trains_on_ray_and_logs_its_counts(ray_session, tmp_path, case):
    run_dir = tmp_path / "ray"
    summary = main([*TINY, *CASES[case], "--logging.run-dir", str(run_dir)])
    check_transform_counts(summary, run_dir, 3, case)
    if case == "dynamic_sampling_replace+kl":
        local = main([*TINY, *CASES[case], "--logging.run-dir", str(tmp_path / "local"), "--ray.no-use-ray"])
        strip = lambda hs: [{k: v for k, v in h.items() if k not in _TIMING} for h in hs]  # noqa: E731
        ray_hist, local_hist = strip(summary.history), strip(local.history)
        assert [set(h) for h in ray_hist] == [set(h) for h in local_hist]
        for a, b in zip(ray_hist, local_hist):
            for k, v in b.items():
                assert a[k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), k
