"""Batch transforms in the loop: a sampled batch to the batch trained on (rows, scores, loss
mask), the refill up to the budget, what happens when it runs out, resume, and the config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, UnknownNameError
from skyrl_fn.trainer.batch_transforms import batch_totals, collect
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.experience import make_experience
from skyrl_fn.trainer.loop import train
from skyrl_fn.rollout.base import RolloutBatch
from skyrl_fn.trainer.roles import Generated
from skyrl_fn.transforms import BatchPipeline, overlong_filter, overlong_penalty, zero_variance_filter

_TIMING = {"step_seconds", "rollout_seconds", "rollout_tokens_per_s", "tokens_per_s", "update_seconds", "update_cpu_seconds", "update_queue_seconds"}


def _generated(scores, lengths, *, t=4, truncated=None, g=2) -> Generated:
    b = len(scores)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    p = b // g
    return Generated(
        rollout=RolloutBatch(
            prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.bool),
            response_ids=torch.where(mask, 5, 0), response_mask=mask, rollout_log_probs=torch.where(mask, -1.0, 0.0),
            group_ids=torch.arange(p).repeat_interleave(g), prompts=[f"p{i}" for i in range(p)], responses=[f"r{i}" for i in range(b)],
            truncated=None if truncated is None else torch.tensor(truncated),
        ),
        scores=torch.tensor(scores, dtype=torch.float32), seconds=0.5,
    )


def _collect(parts, pipeline, *, target=2, g=2):
    return collect(parts, pipeline=pipeline, target_groups=target, group_size=g, max_new_tokens=4, seeds=range(len(parts)), pad_id=0)


def test_overlong_filter_reaches_the_loss_mask_and_the_scores_stay_in_the_baseline(make_config):
    gen = _generated([1.0, 0.0, 1.0, 1.0], [4, 2, 4, 3], truncated=[True, False, False, False])
    out, metrics = _collect([gen], BatchPipeline(["overlong_filter"], [overlong_filter]))
    assert out.rollout.loss_mask.sum(-1).tolist() == [0, 2, 4, 3]
    assert metrics["batch_loss_masked"] == 1 and metrics["batch_dropped_groups"] == 0
    run = resolve(make_config(algorithm={"batch_transforms": ("overlong_filter",)}), DEFAULT_TABLE)
    exp, _ = make_experience(run, out.rollout, out.scores)
    assert exp.response_mask.sum(-1).tolist() == [0, 2, 4, 3]  # what the loss counts
    # the truncated row still counts in its group's GRPO baseline: its partner is below the mean
    assert float(exp.advantages[1, 0]) < 0


def test_truncation_defaults_to_the_full_budget_when_a_backend_does_not_say():
    out, _ = _collect([_generated([1.0, 0.0], [4, 3])], BatchPipeline(["overlong_filter"], [overlong_filter]), target=1)
    assert out.rollout.loss_mask.sum(-1).tolist() == [0, 3]


def test_collect_joins_refills_and_keeps_the_first_p_groups():
    flat = _generated([1.0, 1.0, 0.0, 1.0], [2, 2, 2, 2])  # group 0 all equal, group 1 informative
    good = _generated([0.0, 1.0, 1.0, 0.0], [3, 3, 1, 1])  # both informative
    out, m = _collect([flat, good], BatchPipeline(["zero_variance_filter"], [zero_variance_filter]))
    assert out.rollout.batch_size == 4 and out.rollout.num_prompts == 2
    assert out.scores.tolist() == [0.0, 1.0, 0.0, 1.0]  # flat's group 1, then good's group 0
    assert out.rollout.prompts == ("p1", "p0")
    assert (m["batch_sampled_groups"], m["batch_kept_groups"], m["batch_dropped_groups"], m["batch_surplus_groups"]) == (4, 2, 1, 1)
    assert out.seconds == 1.0  # both samplings


def test_penalty_shapes_scores_before_advantages():
    gen = _generated([1.0, 1.0], [4, 1])
    out, m = _collect([gen], BatchPipeline(["overlong_penalty"], [lambda b: overlong_penalty(b, overlong_buffer_len=2)]), target=1)
    assert out.scores.tolist() == [0.0, 1.0]  # L = L_max costs the full factor 1
    assert m["batch_shaped"] == 1 and m["batch_score_shift"] == -1.0


def test_dynamic_sampling_refills_until_p_groups_and_resumes_exactly(make_config, tmp_path):
    algorithm = {"batch_transforms": ("overlong_filter", "dynamic_sampling"), "transform": {"dynamic_sampling": {"max_sample_batches": 4}}}
    cfg = make_config(algorithm=algorithm, trainer={"steps": 4, "ckpt_interval": 2, "prompts_per_step": 3})
    full = train(resolve(cfg, DEFAULT_TABLE))
    hist = full.history
    assert any(h["batch_sampled_batches"] > 1 for h in hist), "the tiny task gives all-equal groups: a refill must happen"
    for h in hist:
        assert h["batch_kept_groups"] == 3 or h["batch_exhausted"] == 1 or h.get("skipped") == 1
        assert h["batch_sampled_batches"] <= 4 and h["batch_budget"] == 4
    totals = batch_totals(hist)
    assert totals["sampled_batches"] == sum(h["batch_sampled_batches"] for h in hist) and totals["dropped_groups"] > 0
    # the refills advance the data stream, and a resumed run continues it exactly
    other = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=str(tmp_path / "o")), trainer=dataclasses.replace(cfg.trainer, steps=2))
    first = train(resolve(other, DEFAULT_TABLE))
    resumed = train(resolve(dataclasses.replace(other, trainer=dataclasses.replace(other.trainer, steps=4, resume=True)), DEFAULT_TABLE))
    strip = lambda hs: [{k: v for k, v in h.items() if k not in _TIMING} for h in hs]  # noqa: E731
    assert strip(first.history + resumed.history) == strip(hist)


def test_exhausted_budget_trains_on_what_is_kept_and_skips_an_empty_step(make_config):
    # rewards of the tiny untrained policy are mostly all-equal: a budget of 1 leaves steps short
    cfg = make_config(algorithm={"batch_transforms": ("zero_variance_filter",)}, trainer={"steps": 4, "max_consecutive_skips": 4, "ckpt_interval": 0})
    hist = train(resolve(cfg, DEFAULT_TABLE)).history
    assert all(h["batch_sampled_batches"] == 1 for h in hist)
    short = [h for h in hist if h["batch_exhausted"] == 1]
    assert short, "expected at least one step with fewer than P informative groups"
    for h in short:
        if h["batch_kept_groups"] == 0:
            assert h["skipped"] == 1 and "kept no prompt group" in h["skip_reason"]
        else:
            assert h["skipped"] == 0 and h["batch_sequences"] == 4 * h["batch_kept_groups"]


@pytest.mark.parametrize(
    "algorithm, error, message",
    [
        ({"batch_transforms": ("dynamic_sampler",)}, UnknownNameError, "did you mean 'dynamic_sampling'"),
        ({"batch_transforms": ("overlong_filter", "overlong_filter")}, ValueError, "expected each name once"),
        ({"batch_transforms": ("overlong_filter",), "transform": {"dynamic_sampling": {"type": "replace"}}}, ValueError, "does not choose"),
        ({"batch_transforms": ("dynamic_sampling",), "transform": {"dynamic_sampling": {"max_batches": 2}}}, ValueError, "did you mean 'max_sample_batches'"),
        ({"batch_transforms": ("overlong_penalty",)}, ValueError, r"overlong_buffer_len: expected <= rollout.max_new_tokens \(3\), got 4"),
    ],
)
def test_bad_transform_settings_fail_at_resolve(make_config, algorithm, error, message):
    with pytest.raises(error, match=message):
        resolve(make_config(algorithm=algorithm, rollout={"max_new_tokens": 3}), DEFAULT_TABLE)


def test_the_hf_backend_marks_responses_cut_at_max_new_tokens(make_config):
    from skyrl_fn.models.model import eos_token_ids
    from skyrl_fn.tasks.base import DataState, next_prompts
    from skyrl_fn.trainer.roles import PolicyWorker

    run = resolve(make_config(rollout={"max_new_tokens": 2, "samples_per_prompt": 8}), DEFAULT_TABLE)
    worker = PolicyWorker(run, samples=True)
    examples, _ = next_prompts(run.make_task(), DataState(seed=0), 4, shuffle=True)
    rollout = worker.generate(examples, seed=3).rollout
    eos = torch.tensor(eos_token_ids(worker.tokenizer, worker.train_state.model))
    lengths = rollout.response_lengths()
    last = rollout.response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    expected = (lengths == 2) & ~torch.isin(last, eos)
    assert torch.equal(rollout.truncated, expected)
    assert expected.any() and (~expected).any(), "the tiny untrained policy ends some responses early and runs out on others"
