"""Asynchronous training's bookkeeping (``skyrl_fn.trainer.async_loop``) over the in-process workers:
the staleness of every update, in-flight batches in checkpoints (resume equals an uninterrupted
run), stale batches regenerated or dropped, and the config errors of layouts where nothing can
overlap.

The command line refuses ``--trainer.max-staleness`` >= 1 in-process (one process samples and trains
in turn); these tests set it after ``resolve`` because ``LocalWorkers`` honours the one contract the
pipeline needs (calls take effect in call order), which makes the bookkeeping cheap to test. The
path users take, Ray with a rollout worker, is tested in tests/cli/test_async_on_ray.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import attrs
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.async_loop import generated_from_plain, generated_to_plain, staleness_metrics
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train


def _trainer(cfg, **fields):
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **fields))


def async_run(cfg, k: int, **trainer):
    run = resolve(_trainer(cfg, **trainer), DEFAULT_TABLE)
    return attrs.evolve(run, config=_trainer(run.config, max_staleness=k))


def _b(cfg) -> int:
    return cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt


@pytest.mark.parametrize("k", [1, 2])
def test_every_update_is_within_k_versions_and_the_histogram_counts_the_batch(make_config, k):
    cfg = make_config()
    hist = train(async_run(cfg, k, steps=5, ckpt_interval=0)).history
    assert [h["version_gap"] for h in hist] == [min(s, k) for s in range(5)]
    assert [h["policy_version"] - h["sample_version"] for h in hist] == [h["version_gap"] for h in hist]
    for h in hist:
        counts = [h[f"staleness_{g}"] for g in range(k + 1)]
        assert sum(counts) == _b(cfg) and counts[int(h["version_gap"])] == _b(cfg)
        assert h["stale_dropped"] == h["stale_regenerated"] == 0.0


def test_k0_is_the_synchronous_loop(make_config):
    cfg = make_config()
    hist = train(resolve(_trainer(cfg, steps=3, ckpt_interval=0), DEFAULT_TABLE)).history
    assert not any(k.startswith("staleness_") or k == "version_gap" for k in hist[0])


def _cut_at(full_cfg, cfg, step: int) -> None:
    """``cfg``'s checkpoint directory holds only ``full_cfg``'s checkpoint of ``step`` (a run stopped there)."""
    name = f"step_{step:08d}"
    shutil.copytree(os.path.join(full_cfg.ckpt_dir, name), os.path.join(cfg.ckpt_dir, name))


def test_resume_with_batches_in_flight_continues_like_an_uninterrupted_run(tmp_path, tiny_config):
    full_cfg = tiny_config(tmp_path / "full", trainer={"steps": 5, "ckpt_interval": 1, "keep_checkpoints": 5})
    full = train(async_run(full_cfg, 2))
    cfg = tiny_config(tmp_path / "cut", trainer={"steps": 5, "ckpt_interval": 1})
    _cut_at(full_cfg, cfg, 2)
    c = ckpt.load_latest(cfg.ckpt_dir)
    # Two batches in flight at step 2 (for steps 2 and 3), sampled with versions 0 and 1.
    assert [(b["step"], b["version"]) for b in c.in_flight["batches"]] == [(2, 0), (3, 1)]
    assert c.data_state["position"] == 2 * cfg.trainer.prompts_per_step  # consumed, not drawn
    resumed = train(async_run(_trainer(cfg, resume=True), 2))
    assert resumed.resumed_from == 2
    for a, b in zip(resumed.history, full.history[2:]):
        for key in ("reward", "loss", "grad_norm", "version_gap", "sample_version"):
            assert a[key] == b[key], key
    got, want = ckpt.load(resumed.last_checkpoint).weights["policy"], ckpt.load(full.last_checkpoint).weights["policy"]
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("policy", ["regenerate", "drop"])
def test_batches_older_than_k_after_a_resume_with_a_smaller_k_are_regenerated_or_dropped(tmp_path, tiny_config, policy):
    full_cfg = tiny_config(tmp_path / "full", trainer={"steps": 4, "ckpt_interval": 1, "keep_checkpoints": 4})
    train(async_run(full_cfg, 2))
    cfg = tiny_config(tmp_path / "cut", trainer={"steps": 4, "ckpt_interval": 1})
    _cut_at(full_cfg, cfg, 2)  # batches of versions 0 and 1 in flight for steps 2 and 3
    with pytest.warns(ckpt.CheckpointWarning, match="trainer.max_staleness: 2 -> 1"):
        resumed = train(async_run(_trainer(cfg, resume=True), 1, stale_samples=policy))
    b, p = _b(cfg), cfg.trainer.prompts_per_step
    hist = resumed.history
    assert all(h["version_gap"] <= 1 for h in hist)
    c = ckpt.load(resumed.last_checkpoint)
    # Both batches are 2 versions old when their step comes (version 0 at step 2, version 1 at step 3).
    if policy == "regenerate":  # the same prompts, sampled again with the current policy
        assert [h["version_gap"] for h in hist] == [0.0, 0.0]
        assert [h["stale_regenerated"] for h in hist] == [b, 2 * b] and hist[-1]["stale_dropped"] == 0
        assert c.data_state["position"] == 4 * p
    else:  # step 2's batch is dropped: step 2 trains on step 3's (1 version old at step 2), step 3 on fresh prompts
        assert [h["version_gap"] for h in hist] == [1.0, 0.0]
        assert [h["stale_dropped"] for h in hist] == [b, b] and hist[-1]["stale_regenerated"] == 0
        assert c.data_state["position"] == 5 * p  # the dropped prompts are skipped, never trained on


def test_a_synchronous_resume_of_an_async_checkpoint_keeps_the_data_position(tmp_path, tiny_config):
    full_cfg = tiny_config(tmp_path / "full", trainer={"steps": 3, "ckpt_interval": 1, "keep_checkpoints": 3})
    train(async_run(full_cfg, 1))
    cfg = tiny_config(tmp_path / "cut", trainer={"steps": 3, "ckpt_interval": 1})
    _cut_at(full_cfg, cfg, 2)
    assert ckpt.load_latest(cfg.ckpt_dir).in_flight["batches"]
    with pytest.warns(ckpt.CheckpointWarning):
        resumed = train(resolve(_trainer(cfg, resume=True), DEFAULT_TABLE))
    assert ckpt.load(resumed.last_checkpoint).data_state["position"] == 3 * cfg.trainer.prompts_per_step
    assert ckpt.load(resumed.last_checkpoint).in_flight is None


def test_staleness_metrics_refuse_a_gap_over_the_bound():
    assert staleness_metrics(5, 4, 8, 2)["staleness_1"] == 8.0
    with pytest.raises(ValueError, match="trainer.max_staleness = 2, got 3"):
        staleness_metrics(5, 2, 8, 2)
    with pytest.raises(ValueError, match="got -1"):
        staleness_metrics(1, 2, 8, 2)


def test_generated_round_trips_through_plain_values(make_config):
    from skyrl_fn.trainer.workers import LocalWorkers
    from skyrl_fn.tasks.base import DataState, next_prompts

    run = resolve(make_config(), DEFAULT_TABLE)
    examples, _ = next_prompts(run.make_task(), DataState(), 2)
    g = LocalWorkers(run).generate(examples, step=0, seed=1)
    back = generated_from_plain(generated_to_plain(g))
    assert back.rollout.responses == g.rollout.responses and torch.equal(back.scores, g.scores)
    assert torch.equal(back.rollout.rollout_log_probs, g.rollout.rollout_log_probs)


@pytest.mark.parametrize(
    "groups, match",
    [
        ({"ray": {"use_ray": False}}, r"trainer.max_staleness: expected 0 in-process .*--ray.rollout-workers 1"),
        ({}, r"trainer.max_staleness: expected 0 with the hybrid layout .*set --ray.rollout-workers 1 .*--trainer.max-staleness 0"),
        ({"ray": {"rollout_workers": 1}, "rollout": {"backend": "vllm"}}, r"trainer.max_staleness: expected 0 with colocated vLLM.*--gpu.no-colocate"),
        ({"ray": {"rollout_workers": 1}, "trainer": {"max_staleness": -1}}, r"trainer.max_staleness: expected >= 0, got -1"),
    ],
)
def test_layouts_where_nothing_overlaps_are_refused_naming_the_flag(tmp_path, tiny_config, groups, match):
    groups = {g: dict(v) for g, v in groups.items()}
    groups.setdefault("trainer", {}).setdefault("max_staleness", 1)
    with pytest.raises(ValueError, match=match):
        resolve(tiny_config(tmp_path, **groups), DEFAULT_TABLE)


def test_separate_rollout_workers_on_ray_accept_k(tmp_path, tiny_config):
    run = resolve(tiny_config(tmp_path, trainer={"max_staleness": 2}, ray={"rollout_workers": 1}), DEFAULT_TABLE)
    assert run.config.trainer.max_staleness == 2


def test_tis_and_a_sequence_mask_reach_the_loss_and_log_their_fractions(make_config):
    cfg = make_config(algorithm={"off_policy_correction": ("tis", "geo_mask"), "correction": {"geo_mask": {"low": 1e-9, "high": 1e9}}})
    (h,) = train(resolve(_trainer(cfg, steps=1, ckpt_interval=0), DEFAULT_TABLE)).history
    assert h["geo_mask_masked_frac"] == 0.0 and 0.0 <= h["tis_capped_frac"] <= 1.0


def test_ctrl_c_names_the_step_and_the_last_checkpoint(make_config):
    def interrupt(m):
        if m["step"] == 2:
            raise KeyboardInterrupt

    cfg = make_config()
    with pytest.raises(KeyboardInterrupt, match=r"during step 2; every worker was stopped; the last checkpoint is .*step_00000002 \(rerun with --trainer.resume"):
        train(resolve(_trainer(cfg, steps=4, ckpt_interval=1), DEFAULT_TABLE), on_step=interrupt)


def test_the_launcher_exits_130_with_one_line_on_ctrl_c(monkeypatch, capsys):
    from skyrl_fn.cli import app as cli

    def interrupted(run, checks=None):
        raise KeyboardInterrupt("interrupted (Ctrl-C) during step 3; every worker was stopped; no checkpoint was written")

    monkeypatch.setattr(cli, "launch", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--ray.no-use-ray", "--trainer.steps", "1", "--logging.no-progress"])
    assert exit_.value.code == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted (Ctrl-C) during step 3; every worker was stopped; no checkpoint was written"
