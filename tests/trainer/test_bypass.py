"""Bypass mode (``algorithm.bypass_mode``, verl's ``rollout_correction.bypass_mode``): the old
log-probs are the rollout engine's, the policy worker runs no scoring pass, and the update's loss
is the policy loss with ``old = rollout`` exactly."""

from __future__ import annotations

import attrs
import pytest
import torch

from skyrl_fn.core.records import PolicyLossInput
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.learner import make_experience, make_train_state, policy_update
from skyrl_fn.models.model import build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.tasks.base import DataState, next_prompts
from skyrl_fn.trainer.roles import PolicyWorker

PROMPTS = ["n:74>", "n:35>"]


def test_bypass_with_a_scoring_pass_is_refused(make_config, table):
    with pytest.raises(ValueError, match=r"algorithm.bypass_mode, algorithm.recompute_old_log_probs: expected at most one"):
        resolve(make_config(algorithm={"bypass_mode": True, "recompute_old_log_probs": True}), table)


def _rollout(cfg):
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    return model, HFBackend(model.eval(), tok, cfg.rollout).generate(PROMPTS, seed=0)


def test_the_old_log_probs_are_the_rollouts(make_config, table):
    run = resolve(make_config(algorithm={"bypass_mode": True}), table)
    model, rollout = _rollout(run.config)
    scores = torch.linspace(0, 1, rollout.batch_size)
    exp, _ = make_experience(run, rollout, scores)
    assert exp.old_log_probs is rollout.rollout_log_probs
    with pytest.raises(ValueError, match="old_log_probs: expected None in bypass mode"):
        make_experience(run, rollout, scores, old_log_probs=rollout.rollout_log_probs.clone())


class _Counter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


@pytest.mark.parametrize("bypass", [False, True])
def test_the_worker_skips_the_scoring_pass(make_config, table, bypass):
    # Decoupled (three policies, recompute_old_log_probs) scores the rollout with one no-grad pass
    # per micro-batch before the update; bypass mode runs only the update's own passes.
    algorithm = {"bypass_mode": True} if bypass else {"recompute_old_log_probs": True}
    cfg = make_config(algorithm={**algorithm, "update_epochs": 2}, trainer={"micro_batch_size": 4})
    run = resolve(cfg, table)
    worker = PolicyWorker(run, samples=True)
    examples, _ = next_prompts(worker.task, DataState(), 2)
    gen = worker.generate(examples, seed=1)
    counter = _Counter(worker.train_state.model)
    metrics, exp = worker.update(gen.rollout, gen.scores, None, None, 0.0)
    micro = -(-gen.rollout.batch_size // 4)
    assert counter.calls == micro * 2 + (0 if bypass else micro)
    assert metrics["skipped"] == 0.0
    if bypass:
        assert exp.old_log_probs is gen.rollout.rollout_log_probs


def test_the_update_loss_is_the_policy_loss_against_the_rollout(make_config, table):
    # A rollout engine that scored every token 0.3 lower: in bypass mode the first epoch's ratio is
    # exp(lp - rollout), and the loss the update reports is the objective on old = rollout.
    cfg = make_config(algorithm={"bypass_mode": True, "policy_loss": "dro", "loss": {"dro_beta": 0.5}}, trainer={"grad_clip": 0.0})
    run = resolve(cfg, table)
    model, rollout = _rollout(cfg)
    rollout = attrs.evolve(rollout, rollout_log_probs=torch.where(rollout.response_mask, rollout.rollout_log_probs - 0.3, 0.0))
    scores = torch.linspace(0, 1, rollout.batch_size)
    exp, _ = make_experience(run, rollout, scores)
    from skyrl_fn.trainer.forward import sequence_log_probs

    with torch.no_grad():
        lp, _ = sequence_log_probs(model.train(), exp.input_ids, exp.attention_mask, exp.response_len,
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    m = exp.response_mask
    d = torch.where(m, lp - rollout.rollout_log_probs, 0.0)
    spec = torch.where(m, -(exp.advantages * lp - 0.25 * d * d), 0.0).sum() / m.sum()
    batch = PolicyLossInput(log_probs=lp, old_log_probs=rollout.rollout_log_probs, advantages=exp.advantages, loss_mask=m)
    assert float(run.algorithm.objective()(batch).loss) == pytest.approx(float(spec), rel=1e-5)
    out = policy_update(run, make_train_state(model, lr=1e-12), exp)
    assert out["loss"] == pytest.approx(float(spec), rel=1e-4)
    assert out["approx_kl"] == pytest.approx(float(-(d.sum() / m.sum())), rel=1e-4)
