"""``dro`` (direct reward optimisation): the formula, its gradient, the special case ratio 1 =
REINFORCE, the kit, and verl 0.9.1's ``compute_policy_loss_dro`` when installed."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.losses import dro, policy_objective, reinforce, token_sum
from skyrl_fn.testing import check_policy_loss
from tests.losses.loss_batches import make_batch
from tests.peers import peer


@given(st.integers(0, 2**16), st.floats(0.001, 2.0), st.sampled_from([0.05, 0.5, 2.0]))
def test_dro_is_the_penalised_policy_gradient(seed, beta, spread):
    b = make_batch(5, 7, seed=seed, spread=spread)
    out = dro(b, dro_beta=beta)
    m = b.loss_mask
    d = b.log_probs - b.old_log_probs
    want = torch.where(m, -(b.advantages * b.log_probs - 0.5 * beta * d * d), 0.0)
    torch.testing.assert_close(out.token_loss, want)
    # d loss / d log_probs = -(A - beta d) on the mask, 0 off it
    (g,) = torch.autograd.grad(out.token_loss.sum(), b.log_probs)
    torch.testing.assert_close(g, torch.where(m, -(b.advantages - beta * d), 0.0).detach())


def test_dro_at_ratio_one_has_the_reinforce_gradient():
    b = make_batch(4, 6, seed=3)
    import attrs

    on = attrs.evolve(b, old_log_probs=b.log_probs.detach().clone())
    (g_dro,) = torch.autograd.grad(dro(on, dro_beta=0.7).token_loss.sum(), on.log_probs)
    (g_pg,) = torch.autograd.grad(reinforce(on).token_loss.sum(), on.log_probs)
    torch.testing.assert_close(g_dro, g_pg)


def test_dro_penalty_pulls_toward_the_old_policy():
    # zero advantages: the gradient points the log-ratio back to 0 (descent lowers |d|)
    b = make_batch(3, 5, seed=1, spread=0.5)
    import attrs

    z = attrs.evolve(b, advantages=torch.zeros_like(b.advantages))
    (g,) = torch.autograd.grad(dro(z, dro_beta=1.0).token_loss.sum(), z.log_probs)
    d = (z.log_probs - z.old_log_probs).detach()
    m = z.loss_mask & (d != 0)
    assert bool((torch.sign(g[m]) == torch.sign(d[m])).all())


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), True])
def test_dro_rejects_a_bad_beta(beta):
    with pytest.raises(ValueError, match="dro_beta: expected a finite number > 0"):
        dro(make_batch(), dro_beta=beta)


def test_dro_declares_row_locality_and_zero_gradient_on_policy():
    # the kit checks them (tests/testing/test_builtins.py runs it over every entry)
    assert {"microbatch_invariant", "zero_grad_at_ratio_one_zero_adv"} <= DEFAULT_TABLE.entry("policy_loss", "dro").promises
    check_policy_loss("dro", properties=["zero_grad_at_ratio_one_zero_adv"])


@pytest.mark.parametrize("seed", range(4))
def test_dro_matches_verl(seed):
    core_algos = peer("verl.trainer.ppo.core_algos")
    omegaconf = peer("omegaconf")
    b = make_batch(4, 6, seed=seed, spread=0.4)
    beta = 0.05 + 0.3 * seed
    config = omegaconf.OmegaConf.create({"policy_loss": {"dro_beta": beta}, "global_batch_info": {}})
    m = b.loss_mask.double()
    theirs, metrics = core_algos.compute_policy_loss_dro(
        old_log_prob=b.old_log_probs, log_prob=b.log_probs, advantages=b.advantages, response_mask=m,
        loss_agg_mode="token-sum", config=config,
    )
    ours = policy_objective(b, loss=functools.partial(dro, dro_beta=beta), aggregation=token_sum)
    torch.testing.assert_close(ours.loss, theirs)
    (g_ours,) = torch.autograd.grad(ours.loss, b.log_probs, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, b.log_probs)
    torch.testing.assert_close(g_ours, g_theirs)
    assert float(ours.metrics["approx_kl"]) == pytest.approx(metrics["actor/ppo_kl"])
