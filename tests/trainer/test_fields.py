"""Per-sample fields in the training step: declared by the task's reward (``provides``) or
computed by the trainer (``sum_pi_squared``), checked at resolution, carried row by row through
concatenation, batch transforms, experience and micro-batches into the estimator and the loss."""

from __future__ import annotations

import dataclasses

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, requires
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput
from skyrl_fn.ops.sum_pi_squared import sum_pi_squared
from skyrl_fn.models.model import build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend, RolloutBatch, concat_rollouts
from skyrl_fn.tasks import provides
from skyrl_fn.tasks.base import DigitsTask
from skyrl_fn.trainer.batch_transforms import collect
from skyrl_fn.trainer.fields import TRAINER_FIELDS
from skyrl_fn.trainer.forward import log_probs_and_fields, old_policy_pass, response_logits
from skyrl_fn.trainer.learner import make_experience, make_train_state, policy_update
from skyrl_fn.trainer.loop import train
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.roles import Generated, generate_and_score
from skyrl_fn.transforms import BatchPipeline, zero_variance_filter


@provides("correct", "length")
def _digits_with_parts(data, *, seed=0):
    return _PartsTask(op=data.digits_op, min_digits=data.min_digits, max_digits=data.max_digits, seed=seed)


@attrs.frozen(kw_only=True)
class _PartsTask(DigitsTask):
    def reward(self, response, example):
        correct = float(response.strip() == example.answer)
        return {"score": super().reward(response, example), "correct": correct, "length": float(len(response)) / 8}


@provides("format")
def _format_reward(response, example):
    return {"score": 0.0, "format": float(response.isdigit())}


@provides("old_log_probs")
def _clashing_reward(response, example):
    return {"score": 0.0, "old_log_probs": 0.0}


def _table():
    return (
        DEFAULT_TABLE.register("parts", _digits_with_parts, kind="task")
        .register("format", _format_reward, kind="reward").register("clash", _clashing_reward, kind="reward")
    )


GDPO = {"advantage_estimator": "gdpo", "estimator": {"reward_keys": ("correct", "length")}}


# -- resolution ------------------------------------------------------------------------------------
def test_resolve_checks_every_field_a_piece_reads_against_the_trainer_and_the_task(make_config):
    table = _table()
    run = resolve(make_config(data={"task": "parts"}, algorithm=GDPO), table)
    assert run.task_fields == ("correct", "length") and run.computed_fields == frozenset()
    with pytest.raises(ValueError, match=(
        r"algorithm.advantage_estimator 'gdpo' reads extras.correct, extras.length; task 'digits' provides no per-sample "
        r"fields and the trainer provides \['old_log_probs', 'rollout_log_probs', 'sum_pi_squared'\]"
    )):
        resolve(make_config(algorithm=GDPO), table)
    # --data.reward replaces the task's reward, and with it the fields
    with pytest.raises(ValueError, match=r"reads extras.correct, extras.length; task 'parts' with reward 'format' provides \['format'\]"):
        resolve(make_config(data={"task": "parts", "reward": "format"}, algorithm=GDPO), table)
    gdpo_format = {"advantage_estimator": "gdpo", "estimator": {"reward_keys": ("format",)}}
    assert resolve(make_config(data={"reward": "format"}, algorithm=gdpo_format), table).task_fields == ("format",)
    with pytest.raises(ValueError, match=r"task 'digits' with reward 'clash': provides \['old_log_probs'\], which the trainer provides itself"):
        resolve(make_config(data={"reward": "clash"}), table)

    # the built-in arithmetic_components reward provides the arithmetic reward's parts
    parts = {"advantage_estimator": "gdpo", "estimator": {"reward_keys": ("correct", "format")}}
    run = resolve(make_config(data={"task": "arithmetic", "reward": "arithmetic_components"}, algorithm=parts), table)
    assert run.task_fields == ("correct", "format")


def test_sum_pi_squared_is_computed_only_when_a_piece_reads_it_and_not_in_bypass_mode(make_config, table):
    otb = {"advantage_estimator": "optimal_token_baseline"}
    assert resolve(make_config(algorithm=otb), table).computed_fields == {"sum_pi_squared"}
    assert resolve(make_config(algorithm={"advantage_estimator": "tir_optimal_token_baseline"}), table).computed_fields == {"sum_pi_squared"}
    assert resolve(make_config(), table).computed_fields == frozenset()
    with pytest.raises(ValueError, match=r"algorithm.bypass_mode: expected False when a piece reads \['sum_pi_squared'\]"):
        resolve(make_config(algorithm={**otb, "bypass_mode": True}), table)


# -- rows: concatenation, selection, batch transforms, experience, micro-batches -----------------
def _rollout(b: int, t: int, g: int, seed: int, *, keys=("a", "tok")) -> RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    extras = {k: (torch.randn(b, generator=gen) if k == "a" else torch.where(mask, torch.randn(b, t, generator=gen), 0.0)) for k in keys}
    return RolloutBatch(
        prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.bool),
        response_ids=torch.where(mask, 5, 0), response_mask=mask, rollout_log_probs=torch.where(mask, -1.0, 0.0),
        group_ids=torch.arange(b // g).repeat_interleave(g), prompts=[f"p{i}" for i in range(b // g)],
        responses=[f"r{i}" for i in range(b)], extras=extras,
    )


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 5)), min_size=1, max_size=4), st.integers(0, 2**16))
def test_fields_follow_their_rows_through_concatenation_and_selection(parts, seed):
    g = 2
    batches = [_rollout(p * g, t, g, seed + i) for i, (p, t) in enumerate(parts)]
    joined = concat_rollouts(batches, pad_id=0)
    t = joined.response_ids.shape[1]
    assert torch.equal(joined.extras["a"], torch.cat([r.extras["a"] for r in batches]))
    for i, r in enumerate(batches):
        start = sum(x.batch_size for x in batches[:i])
        width = r.response_ids.shape[1]
        assert torch.equal(joined.extras["tok"][start : start + r.batch_size, :width], r.extras["tok"])
        assert not joined.extras["tok"][start : start + r.batch_size, width:t].any()
    rows = torch.randint(0, joined.batch_size, (joined.batch_size,), generator=torch.Generator().manual_seed(seed))
    picked = joined.select(rows)
    assert torch.equal(picked.extras["a"], joined.extras["a"][rows]) and torch.equal(picked.extras["tok"], joined.extras["tok"][rows])


def test_parts_with_different_fields_or_shapes_are_refused():
    with pytest.raises(ValueError, match=r"extras: expected the same per-sample fields in every part, got \[\['a', 'tok'\], \['a'\]\]"):
        concat_rollouts([_rollout(2, 3, 2, 0), _rollout(2, 3, 2, 1, keys=("a",))], pad_id=0)
    r = _rollout(2, 3, 2, 0)
    with pytest.raises(ValueError, match=r"extras\['x'\]: expected shape \[B\] or \[B, T\] = \(2\), got \(3,\)"):
        attrs.evolve(r, extras={"x": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"extras\['x'\]"):
        attrs.evolve(r, extras={"x": torch.zeros(2, dtype=torch.long)})


def test_a_batch_transform_keeps_each_rows_fields():
    r = _rollout(6, 3, 2, 0)
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.0])  # group 0 has no spread: dropped
    gen = Generated(rollout=r, scores=scores, seconds=0.0)
    out, _ = collect([gen, gen], pipeline=BatchPipeline(["zero_variance_filter"], [zero_variance_filter]), target_groups=3,
                     group_size=2, max_new_tokens=3, seeds=(0, 1), pad_id=0)
    keep = torch.tensor([2, 3, 4, 5, 2, 3])  # groups 1, 2 of the first batch, group 1 of the refill
    assert torch.equal(out.rollout.extras["a"], r.extras["a"][keep]) and torch.equal(out.rollout.extras["tok"], r.extras["tok"][keep])


def _loss_recording(calls):
    @requires("extras.correct", "extras.length", "extras.old_log_probs")
    def recording(batch: PolicyLossInput) -> PolicyLossOutput:
        calls.append({k: v.detach().clone() for k, v in batch.extras.items()})
        ratio = torch.exp(batch.log_probs - batch.old_log_probs)
        return PolicyLossOutput(token_loss=torch.where(batch.loss_mask, -batch.advantages * ratio, 0.0), metrics={})

    return recording


def test_fields_reach_the_estimator_and_each_micro_batch_of_the_loss(make_config):
    calls: list[dict] = []
    table = _table().register("recording", _loss_recording(calls), kind="policy_loss")
    cfg = make_config(data={"task": "parts"}, algorithm={**GDPO, "policy_loss": "recording"}, trainer={"micro_batch_size": 5})
    run = resolve(cfg, table)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    task = run.make_task()
    examples = [task.example(i) for i in range(3)]
    gen = generate_and_score(HFBackend(model.eval(), tok, cfg.rollout), task, examples, seed=0, fields=run.task_fields)
    rollout = gen.rollout
    assert sorted(rollout.extras) == ["correct", "length"]
    exp, _ = make_experience(run, rollout, gen.scores)
    direct = run.algorithm.estimator(AdvantageInput(  # the bound gdpo, on the components
        token_level_rewards=torch.zeros(rollout.response_mask.shape), response_mask=rollout.response_mask,
        group_ids=rollout.group_ids, extras=dict(rollout.extras),
    ))
    torch.testing.assert_close(exp.advantages, direct.advantages)
    policy_update(run, make_train_state(model, lr=1e-3), exp)
    assert len(calls) == 3  # B = 12 in micro-batches of 5, in row order (the loss promises no micro-batch invariance)
    for key in ("correct", "length"):
        torch.testing.assert_close(torch.cat([c[key] for c in calls]), rollout.extras[key])
    assert set(calls[0]) == {"correct", "length", "old_log_probs", "rollout_log_probs"}


# -- sum_pi_squared --------------------------------------------------------------------------------
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 40), st.floats(0.3, 3.0), st.integers(0, 2**16))
def test_sum_pi_squared_equals_the_squared_softmax_summed(b, t, v, tau, seed):
    logits = 4 * torch.randn(b, t, v, generator=torch.Generator().manual_seed(seed))
    want = torch.softmax(logits.double() / tau, dim=-1).square().sum(-1).float()
    for chunk in (None, 1, 3):
        torch.testing.assert_close(sum_pi_squared(logits, temperature=tau, chunk_size=chunk), want, atol=1e-6, rtol=1e-5)


def test_the_trainer_computes_sum_pi_squared_in_the_old_log_prob_pass(make_config, table):
    cfg = make_config(algorithm={"advantage_estimator": "optimal_token_baseline"}, rollout={"temperature": 0.7})
    run = resolve(cfg, table)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0).eval()
    rollout = HFBackend(model, tok, cfg.rollout).generate(["n:74>", "n:35>"], seed=0)
    old, computed = old_policy_pass(run, model, rollout)
    ids, am = rollout.sequences()
    with torch.no_grad():
        probs = torch.softmax(response_logits(model, ids, am, rollout.response_ids.shape[1]).double() / 0.7, dim=-1)
    want = torch.where(rollout.response_mask, probs.square().sum(-1), 0.0).float()
    assert computed["sum_pi_squared"].dtype == torch.float32
    torch.testing.assert_close(computed["sum_pi_squared"], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(old, log_probs_and_fields(model, rollout, micro_batch_size=3, temperature=0.7)[0])
    assert old_policy_pass(resolve(make_config(), table), model, rollout) == (None, {})  # grpo: no pass, no field
    with pytest.raises(ValueError, match=r"fields: expected names from \['sum_pi_squared'\], got \['entropy'\]"):
        log_probs_and_fields(model, rollout, micro_batch_size=3, fields=frozenset({"entropy"}))
    assert "sum_pi_squared" in TRAINER_FIELDS


def test_optimal_token_baseline_trains_in_process(make_config, table):
    cfg = make_config(algorithm={"advantage_estimator": "optimal_token_baseline"}, trainer={"steps": 2})
    summary = train(resolve(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, use_ray=False)), table))
    assert summary.steps == 2 and all(row["skipped"] == 0.0 for row in summary.history)

