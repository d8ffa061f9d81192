"""Bypass mode as verl 0.9.1's ``compute_policy_loss_bypass_mode``: with ``old_log_probs =
rollout_log_probs``, ``loss_type: ppo_clip`` is PPO (verl's vanilla loss has the dual clip) and
``loss_type: reinforce`` is REINFORCE with IS weights of the current policy against the sampler
(``tis`` / ``tis_sequence`` with ``against="current"``); the rejection masks are the pieces with
``against="current"``, composed after the IS weights (verl computes both on the response mask)."""

from __future__ import annotations

import functools

import attrs
import pytest
import torch

from skyrl_fn.losses import compose_corrections, dual_clip, geo_mask, policy_objective, reinforce, tis, tis_sequence, token_mean
from tests.losses.loss_batches import make_batch
from tests.peers import peer


def bypass_batch(seed: int):
    """A batch in bypass mode: the old log-probs are the rollout's, the policy moved from them."""
    x = make_batch(5, 7, seed=seed, spread=0.15)
    return attrs.evolve(x, old_log_probs=x.rollout_log_probs)


def verl_bypass(x, loss_type: str, rollout_is, rollout_rs=None, rollout_rs_threshold=None):
    core_algos = peer("verl.trainer.ppo.core_algos")
    omegaconf = peer("omegaconf")
    config = omegaconf.OmegaConf.create({
        "clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0, "global_batch_info": {},
        "policy_loss": {"rollout_correction": {
            "loss_type": loss_type, "rollout_is": rollout_is, "rollout_is_threshold": 2.0,
            "rollout_rs": rollout_rs, "rollout_rs_threshold": rollout_rs_threshold,
        }},
    })
    loss, metrics = core_algos.compute_policy_loss_bypass_mode(
        old_log_prob=x.rollout_log_probs, log_prob=x.log_probs, advantages=x.advantages,
        response_mask=x.loss_mask.double(), loss_agg_mode="token-mean", config=config,
    )
    return loss


def assert_same(ours, theirs, lp):
    torch.testing.assert_close(ours.loss, theirs)
    (g1,) = torch.autograd.grad(ours.loss, lp, retain_graph=True)
    (g2,) = torch.autograd.grad(theirs, lp)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rs", [None, "seq_mean_k1"])
def test_bypass_ppo_clip_matches_verl(seed, rs):
    x = bypass_batch(seed)
    h = 1.05
    theirs = verl_bypass(x, "ppo_clip", "sequence", rs, None if rs is None else f"{1 / h}_{h}")
    # verl's PPO-clip in bypass applies no IS weight (the ratio already is pi / pi_rollout)
    correction = None if rs is None else compose_corrections(functools.partial(geo_mask, low=1 / h, high=h, against="current"))
    ours = policy_objective(x, loss=dual_clip, aggregation=token_mean, correction=correction)
    assert_same(ours, theirs, x.log_probs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bypass_reinforce_matches_verl(seed, level):
    x = bypass_batch(seed)
    h = 1.05
    theirs = verl_bypass(x, "reinforce", level, "seq_mean_k1", f"{1 / h}_{h}")
    piece = tis if level == "token" else tis_sequence
    ours = policy_objective(x, loss=reinforce, aggregation=token_mean, correction=compose_corrections(
        functools.partial(piece, cap=2.0, against="current"), functools.partial(geo_mask, low=1 / h, high=h, against="current"),
    ))
    assert_same(ours, theirs, x.log_probs)
