"""The learner: gradient accumulation equals the full-batch gradient, losses by name, KL, critic."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from skyrl_fn import AdvantageInput, AdvantageOutput, requires
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.critic import critic_update
from skyrl_fn.trainer.learner import (
    KLController,
    batched_log_probs,
    batched_values,
    make_experience,
    make_optimizer,
    make_train_state,
    policy_update,
    token_rewards,
)
from skyrl_fn.models.model import build_critic, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend

PROMPTS = ["n:74>", "n:35>", "n:0>"]


def _native_pg(batch: PolicyLossInput, *, scale: float = 1.0) -> PolicyLossOutput:
    """A plain policy gradient ``-A * exp(lp - old)``, per token; test-only."""
    ratio = torch.exp(batch.log_probs - batch.old_log_probs)
    loss = torch.where(batch.loss_mask, -scale * batch.advantages * ratio, 0.0)
    m = batch.loss_mask
    return PolicyLossOutput(token_loss=loss, metrics={"ratio_mean": ratio.detach()[m].mean()})


def _setup(cfg, table, *, seed=0):
    run = resolve(cfg, table)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=seed)
    backend = HFBackend(model.eval(), tok, cfg.rollout)
    rollout = backend.generate(PROMPTS, seed=seed)
    scores = torch.linspace(0, 1, rollout.batch_size)
    old = batched_log_probs(model, rollout, micro_batch_size=64)
    ref = old - 0.1 * rollout.response_mask.float() if run.uses_reference else None
    exp, metrics = make_experience(run, rollout, scores, old_log_probs=old, ref_log_probs=ref)
    return run, tok, model, rollout, exp, metrics


def _grads_after_update(run, model, exp):
    m = copy.deepcopy(model)
    # lr tiny so the step is ~0; read the gradients that were accumulated.
    state = make_train_state(m, lr=1e-12)
    out = policy_update(run, state, exp)
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, out


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "token_sum", "seq_mean_token_sum_norm", "prompt_mean"])
def test_micro_batches_give_the_full_batch_gradient(make_config, table, reduction):
    cfg = make_config(algorithm={"loss_reduction": reduction}, rollout={"samples_per_prompt": 4}, trainer={"micro_batch_size": 12, "grad_clip": 0.0})
    run, _, model, _, exp, _ = _setup(cfg, table)
    full, m_full = _grads_after_update(run, model, exp)
    small = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, micro_batch_size=5))
    parts, m_parts = _grads_after_update(resolve(small, table), model, exp)
    assert full.keys() == parts.keys()
    for k in full:
        torch.testing.assert_close(parts[k], full[k], atol=1e-6, rtol=1e-5)
    # token_sum is not normalised (a loss of ~5): float32 rounding is relative.
    assert m_full["loss"] == pytest.approx(m_parts["loss"], rel=1e-6, abs=1e-6)


def test_a_native_loss_runs_through_the_table_by_name(make_config, table):
    table = table.register("test_pg", _native_pg)
    cfg = make_config(algorithm={"policy_loss": "test_pg", "loss": {"scale": 2.0}})
    run, _, model, _, exp, _ = _setup(cfg, table)
    assert run.algorithm.policy_loss.func is _native_pg and run.algorithm.policy_loss.keywords == {"scale": 2.0}
    state = make_train_state(model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    out = policy_update(run, state, exp)
    assert out["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for key in ("loss", "pg_loss", "grad_norm", "lr"):
        assert key in out


def test_gradient_ascent_raises_the_log_prob_of_positive_advantages(make_config, table):
    cfg = make_config(trainer={"lr": 1e-2, "warmup_steps": 0})
    run, _, model, rollout, exp, _ = _setup(cfg, table)
    state = make_train_state(model, lr=1e-2)
    before = batched_log_probs(model, rollout, micro_batch_size=64)
    policy_update(run, state, exp)
    after = batched_log_probs(model, rollout, micro_batch_size=64)
    m = rollout.response_mask
    delta = ((after - before) * m).sum(-1)
    adv = exp.advantages[:, 0] if exp.advantages.shape[1] else None
    assert float((delta * adv).sum()) > 0  # moved towards positive-advantage samples


def test_grad_clip_bounds_the_update(make_config, table):
    cfg = make_config(trainer={"grad_clip": 1e-3})
    run, _, model, _, exp, _ = _setup(cfg, table)
    state = make_train_state(model, lr=1e-12)
    policy_update(run, state, exp)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


def test_kl_loss_and_reward_penalty(make_config, table):
    cfg = make_config(algorithm={"use_kl_loss": True, "kl_loss_coef": 0.5, "use_kl_in_reward": True})
    run, _, model, rollout, exp, metrics = _setup(cfg, table)
    assert metrics["kl"] > 0
    out = policy_update(run, make_train_state(model, lr=1e-4), exp)
    assert out["kl_loss"] > 0
    with pytest.raises(ValueError, match="ref_log_probs"):
        make_experience(run, rollout, torch.zeros(rollout.batch_size), old_log_probs=exp.old_log_probs)


def test_token_rewards_places_scores_on_the_last_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert r.tolist() == [[0, 1, 0], [0, 0, 2], [3, 0, 0]]
    kl = torch.full((3, 3), 0.5)
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask, kl=kl, kl_coef=0.2)
    torch.testing.assert_close(r, torch.tensor([[-0.1, 0.9, 0], [-0.1, -0.1, 1.9], [2.9, 0, 0]]))
    with pytest.raises(ValueError, match="scores"):
        token_rewards(torch.zeros(2), mask)


def test_kl_controller():
    fixed = KLController(coef=0.1)
    assert fixed.update(5.0, 100) is fixed
    ad = KLController(coef=0.1, kind="adaptive", target=0.1, horizon=100)
    assert ad.update(1.0, 10).coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert ad.update(0.0, 10).coef == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))
    assert ad.coef == 0.1  # frozen: update returns a new controller


def test_warmup_schedule():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, lr=1.0, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(model, lr=0.0)


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_looped_adamw():
    """make_optimizer's AdamW runs torch's fused kernel; its steps are the per-parameter loop's
    within float rounding (weight decay, warm-up and gradients of several scales)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 3))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    opt, sched = make_optimizer(model, lr=3e-3, weight_decay=0.1, warmup_steps=2)
    assert opt.defaults["fused"] is True
    looped = torch.optim.AdamW(twin.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(looped, lambda k: min(1.0, (k + 1) / 2))
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (step % 5 - 2)
            q.grad = p.grad.clone()
        opt.step(), looped.step(), sched.step(), ref_sched.step()
    for p, q, p0 in zip(model.parameters(), twin.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert (p - p0).abs().max() > 1e-3  # they moved (together), not stayed put


def test_critic_and_gae(make_config, table):
    cfg = make_config(algorithm={"advantage_estimator": "gae", "estimator": {"lambd": 0.95}}, trainer={"micro_batch_size": 5})
    run = resolve(cfg, table)
    assert dict(run.algorithm.hyper["advantage_estimator"]) == {"lambd": 0.95}
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok)
    critic = build_critic(cfg.model, tok)
    rollout = HFBackend(model.eval(), tok, cfg.rollout).generate(PROMPTS, seed=0)
    values = batched_values(critic, rollout, micro_batch_size=5)
    assert values.shape == rollout.response_mask.shape and (values[~rollout.response_mask] == 0).all()
    old = batched_log_probs(model, rollout, micro_batch_size=5)
    scores = torch.ones(rollout.batch_size)
    with pytest.raises(ValueError, match="values"):
        make_experience(run, rollout, scores, old_log_probs=old)
    exp, _ = make_experience(run, rollout, scores, old_log_probs=old, values=values)
    state = make_train_state(critic, lr=1e-2)
    losses = [critic_update(run, state, exp)["value_loss"] for _ in range(15)]
    assert losses[-1] < losses[0]


@pytest.mark.slow  # torch.compile with inductor takes ~1 min on 2 cores
def test_compiled_kernel_matches_eager(make_config, table):
    cfg = make_config()
    run, _, model, _, exp, _ = _setup(cfg, table)
    eager, _ = _grads_after_update(run, model, exp)
    crun = resolve(dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, compile=True)), table)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="skyrl_fn: torch.compile unavailable")  # no silent eager fallback
        compiled, _ = _grads_after_update(crun, model, exp)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("epochs", [1, 2])
def test_old_log_probs_from_the_first_pass_equal_a_separate_pass(make_config, table, epochs):
    cfg = make_config(algorithm={"update_epochs": epochs}, trainer={"micro_batch_size": 5})
    run, _, model, _, exp, _ = _setup(cfg, table)
    assert exp.old_log_probs is not None
    given, m_given = _grads_after_update(run, model, exp)
    lazy, m_lazy = _grads_after_update(run, model, _without_old(exp))
    for k in given:
        torch.testing.assert_close(lazy[k], given[k], atol=1e-6, rtol=1e-5)
    assert m_lazy["loss"] == pytest.approx(m_given["loss"], abs=1e-6)


def _without_old(exp):
    import attrs

    return attrs.evolve(exp, old_log_probs=None)


@pytest.mark.parametrize("level", ["tis", "tis_sequence"])
def test_truncated_importance_sampling(make_config, table, level):
    cfg = make_config(algorithm={"off_policy_correction": (level,), "correction": {level: {"cap": 1.5}}}, trainer={"grad_clip": 0.0})
    run, _, model, _, exp, _ = _setup(cfg, table)
    plain_run = resolve(dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, off_policy_correction=(), correction={})), table)
    # Rollout log-probs equal to the trainer's: every weight is 1, the update is unchanged.
    same = type(exp)(**{**_fields(exp), "rollout_log_probs": exp.old_log_probs})
    g_tis, m_tis = _grads_after_update(run, model, same)
    g_plain, _ = _grads_after_update(plain_run, model, same)
    for k in g_plain:
        torch.testing.assert_close(g_tis[k], g_plain[k], atol=1e-6, rtol=1e-5)
    capped = "tis_capped_frac" if level == "tis" else "tis_seq_capped_frac"
    assert m_tis[capped] == 0.0
    # A rollout engine that under-estimated the probabilities: weights > 1, capped at 1.5.
    drift = type(exp)(**{**_fields(exp), "rollout_log_probs": exp.old_log_probs - 1.0})
    g_drift, m_drift = _grads_after_update(run, model, drift)
    assert m_drift[capped] == 1.0
    k = next(iter(g_plain))
    torch.testing.assert_close(g_drift[k], 1.5 * g_plain[k], atol=1e-6, rtol=1e-4)


def _fields(exp):
    import attrs

    return attrs.asdict(exp, recurse=False)


def test_backend_sync_weights(make_config):
    cfg = make_config()
    tok = build_tokenizer()
    a, b = build_tiny_model(cfg.model, tok, seed=1), build_tiny_model(cfg.model, tok, seed=2)
    backend = HFBackend(b.eval(), tok, cfg.rollout)
    backend.sync_weights(a.state_dict())
    r1 = backend.generate(PROMPTS, seed=3)
    r2 = HFBackend(a.eval(), tok, cfg.rollout).generate(PROMPTS, seed=3)
    assert torch.equal(r1.response_ids, r2.response_ids)


def test_reported_lr_is_the_rate_used(make_config, table):
    cfg = make_config(trainer={"lr": 1e-3, "warmup_steps": 2})
    run, _, model, _, exp, _ = _setup(cfg, table)
    state = make_train_state(model, lr=1e-3, warmup_steps=2)
    assert [policy_update(run, state, exp)["lr"] for _ in range(3)] == pytest.approx([5e-4, 1e-3, 1e-3])


# -- per-sample fields: declared by the pieces, produced by the trainer, checked at resolution -------
def test_a_field_no_step_produces_is_an_error_at_resolution(make_config, table):
    with pytest.raises(ValueError, match=r"algorithm.advantage_estimator 'gdpo' reads extras.format; task 'digits' provides no per-sample fields and the trainer provides \['old_log_probs', 'rollout_log_probs', 'sum_pi_squared'\]"):
        resolve(make_config(algorithm={"advantage_estimator": "gdpo", "estimator": {"reward_keys": ("format",)}}), table)
    assert resolve(make_config(algorithm={"advantage_estimator": "gdpo"}), table).algorithm.fields == {
        "algorithm.advantage_estimator 'gdpo'": frozenset(), "algorithm.policy_loss 'regular'": frozenset(),
    }


@requires("extras.old_log_probs", "extras.rollout_log_probs")
def _baseline_from_fields(batch: AdvantageInput) -> AdvantageOutput:
    """Test-only: the sampled tokens' surprisal as the advantage, read from the per-sample fields."""
    adv = torch.where(batch.response_mask, -batch.extras["old_log_probs"] + 0 * batch.extras["rollout_log_probs"], 0.0)
    return AdvantageOutput(advantages=adv, returns=adv)


def test_estimators_receive_the_steps_per_sample_fields(make_config, table):
    table = table.register("from_fields", _baseline_from_fields)
    run, _, _, rollout, exp, _ = _setup(make_config(algorithm={"advantage_estimator": "from_fields"}), table)
    torch.testing.assert_close(exp.advantages, torch.where(rollout.response_mask, -exp.old_log_probs, 0.0))
    assert torch.equal(exp.group_ids, rollout.group_ids)


@requires("extras.rollout_log_probs")
def _pg_reading_fields(batch: PolicyLossInput) -> PolicyLossOutput:
    """Test-only: a plain policy gradient that checks it sees the micro-batch's rollout log-probs."""
    assert batch.extras["rollout_log_probs"] is not None and batch.extras["rollout_log_probs"].shape == batch.log_probs.shape
    return _native_pg(batch)


@requires("extras.teacher_log_probs")
def _pg_needing_a_teacher(batch: PolicyLossInput) -> PolicyLossOutput:
    return _native_pg(batch)


def test_losses_receive_the_steps_per_sample_fields_and_a_missing_one_fails_at_resolution(make_config, table):
    table = table.register("pg_fields", _pg_reading_fields).register("pg_teacher", _pg_needing_a_teacher)
    run, _, model, _, exp, _ = _setup(make_config(algorithm={"policy_loss": "pg_fields"}, trainer={"micro_batch_size": 5}), table)
    out = policy_update(run, make_train_state(model, lr=1e-3), exp)
    assert out["skipped"] == 0.0
    with pytest.raises(ValueError, match=r"algorithm.policy_loss 'pg_teacher' reads extras.teacher_log_probs; task 'digits' provides no per-sample fields"):
        resolve(make_config(algorithm={"policy_loss": "pg_teacher"}), table)
