"""REINFORCE++, REINFORCE++-baseline and ReMax: the vectorised return-to-go, loop equivalence, edges."""

from __future__ import annotations

import pytest
import torch

import skyrl_reference as ref
from batches import random_batch
from skyrl_fn import AdvantageInput
from fused import fused_reinforce_plus_plus
from skyrl_fn import DEFAULT_TABLE, Chain, chain, group_mean, outcome_estimator, whiten
from skyrl_fn.estimators import (
    discounted_returns,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    reinforce_plus_plus_raw,
    remax,
)

GAMMAS = [0.0, 0.01, 0.5, 0.9, 0.99, 1.0]


def masks(b, t, gen):
    """Right-padded rows, rows with gaps, an empty row and a full row."""
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    right = torch.arange(t)[None, :] < lengths[:, None]
    gappy = torch.rand(b, t, generator=gen) < 0.8
    m = torch.where(torch.arange(b)[:, None] % 2 == 0, right, gappy)
    m[0] = False
    m[-1] = True
    return m


# -- the vectorised discounted return-to-go ------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("t", [1, 7, 300, 2048])
def test_discounted_returns_equal_the_skyrl_loop(gamma, t):
    gen = torch.Generator().manual_seed(t)
    b = 6
    m = masks(b, t, gen)
    r = torch.randn(b, t, generator=gen, dtype=torch.float64) * m
    expect = ref.reinforce_plus_plus_returns(r, m.double(), gamma) * m
    torch.testing.assert_close(discounted_returns(r, m, gamma=gamma), expect, rtol=1e-9, atol=1e-9)


def test_discounted_returns_hand_values():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, False, True]])
    # the stretch [0, 2) restarts at the gap: x1 = 2, x0 = 1 + 0.5 * 2; x3 = 4; x2 masked -> 0.
    torch.testing.assert_close(discounted_returns(r, m, gamma=0.5), torch.tensor([[2.0, 2.0, 0.0, 4.0]], dtype=torch.float64))


def test_discounted_returns_float32_in_float32_out():
    r, m = torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool)
    out = discounted_returns(r, m, gamma=1.0)
    assert out.dtype == torch.float32 and out[0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_discounted_returns_reject_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), gamma=gamma)


def test_discounted_returns_ignore_rewards_off_the_mask():
    r = torch.tensor([[1.0, float("nan"), 2.0, float("inf")]])
    m = torch.tensor([[True, False, True, False]])
    assert discounted_returns(r, m, gamma=0.9).tolist() == [[1.0, 0.0, 2.0, 0.0]]


# -- REINFORCE++ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reinforce_plus_plus_matches_skyrl(gamma, dtype):
    for seed in range(15):
        batch, rewards, mask, _ = random_batch(seed, dtype=dtype, gaps=seed % 2 == 0)
        if mask.sum() < 2:  # the peers raise; covered below
            continue
        out = reinforce_plus_plus(batch, gamma=gamma)
        adv, returns = ref.reinforce_plus_plus(rewards.clone(), mask, gamma=gamma)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.advantages, adv, **tol)
        torch.testing.assert_close(out.returns, returns * mask, **tol)
        assert out.advantages.dtype == dtype and out.returns.dtype == dtype


def test_reinforce_plus_plus_whitened_statistics():
    batch, _, mask, _ = random_batch(2, b=30, t=9, gaps=True)
    adv = reinforce_plus_plus(batch, gamma=0.8).advantages
    valid = adv[mask.bool()]
    torch.testing.assert_close(valid.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(valid.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_fewer_than_two_valid_tokens_give_zeros():
    # SkyRL/verl raise; we define the variance as 0: one token gives x - mean = 0.
    one = AdvantageInput(token_level_rewards=torch.tensor([[3.0, 1.0]]), response_mask=torch.tensor([[1, 0]]), group_ids=[0])
    none = AdvantageInput(token_level_rewards=torch.ones(2, 2), response_mask=torch.zeros(2, 2), group_ids=[0, 1])
    for batch in (one, none):
        for fn in (reinforce_plus_plus, reinforce_plus_plus_baseline):
            out = fn(batch)
            assert torch.equal(out.advantages, torch.zeros_like(out.advantages))
    assert reinforce_plus_plus(one).returns.tolist() == [[3.0, 0.0]]
    with pytest.raises(ValueError):
        ref.reinforce_plus_plus(one.token_level_rewards, one.float_mask())


# -- REINFORCE++ with a group baseline ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reinforce_plus_plus_baseline_matches_verl(dtype):
    for seed in range(30):
        batch, rewards, mask, index = random_batch(seed, dtype=dtype, gaps=seed % 3 == 0, string_ids=seed % 2 == 0)
        if mask.sum() < 2:
            continue
        out = reinforce_plus_plus_baseline(batch)
        adv, _ = ref.reinforce_plus_plus_baseline(rewards.clone(), mask, index)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.advantages, adv, **tol, msg=lambda m: f"seed {seed}: {m}")
        assert out.returns is out.advantages


def test_reinforce_plus_plus_baseline_hand_values():
    # scores: group 0 -> 1, 3 (mean 2) -> -1, 1; group 1 size 1 -> 4. Lengths 1, 1, 2 tokens:
    # token values -1, 1, 4, 4 -> mean 2, unbiased var = (9 + 1 + 4 + 4) / 3 = 6.
    rewards = torch.tensor([[1.0, 0.0], [3.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 0], [1, 1]])
    out = reinforce_plus_plus_baseline(AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 0, 1]))
    s = (6.0 + 1e-8) ** -0.5
    expect = torch.tensor([[-3 * s, 0.0], [-1 * s, 0.0], [2 * s, 2 * s]], dtype=torch.float64)
    torch.testing.assert_close(out.advantages, expect)


# -- ReMax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_remax_matches_verl(dtype):
    for seed in range(20):
        batch, rewards, mask, _ = random_batch(seed, dtype=dtype)  # right-padded
        out = remax(batch)
        adv, returns = ref.remax(rewards, batch.reward_baselines, mask)
        torch.testing.assert_close(out.advantages, adv * mask)
        torch.testing.assert_close(out.returns, returns)


def test_remax_hand_values_and_gap_deviation():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    mask = torch.tensor([[True, True, False, True]])
    batch = AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0], reward_baselines=torch.tensor([0.5]))
    out = remax(batch)
    assert out.returns.tolist() == [[3.0, 3.0, 0.0, 2.0]]
    assert out.advantages.tolist() == [[2.5, 2.5, 0.0, 1.5]]
    # verl keeps the reward-to-go (2) at the masked gap; we zero it (documented deviation).
    adv, returns = ref.remax(rewards, batch.reward_baselines, mask.float())
    assert returns[0, 2] == 2.0 and adv[0, 2] == 2.0


def test_remax_needs_reward_baselines():
    batch = AdvantageInput(token_level_rewards=torch.ones(2, 2), response_mask=torch.ones(2, 2), group_ids=[0, 0])
    with pytest.raises(ValueError, match="reward_baselines"):
        remax(batch)


@pytest.mark.parametrize("fn", [reinforce_plus_plus, reinforce_plus_plus_baseline, remax])
def test_inputs_are_not_mutated_and_half_precision_is_finite(fn):
    batch, _, _, _ = random_batch(6, b=25, t=7, dtype=torch.bfloat16, gaps=True)
    before = batch.token_level_rewards.clone(), batch.reward_baselines.clone()
    out = fn(batch)
    assert torch.equal(batch.token_level_rewards, before[0]) and torch.equal(batch.reward_baselines, before[1])
    assert out.advantages.dtype == torch.bfloat16 and torch.isfinite(out.advantages).all()
    out.check_against(batch)


# -- reinforce++ is chain(reinforce_plus_plus_raw, whiten()) -----------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chain_is_bit_identical_to_the_fused_reinforce_plus_plus(gamma, dtype):
    assert isinstance(reinforce_plus_plus, Chain) and reinforce_plus_plus.estimator is reinforce_plus_plus_raw
    for seed in range(10):
        batch, _, _, _ = random_batch(seed, b=2 + 9 * seed, t=1 + 2 * seed, dtype=dtype, gaps=seed % 2 == 1)
        out = reinforce_plus_plus(batch, gamma=gamma)
        adv, returns = fused_reinforce_plus_plus(batch, gamma=gamma)
        assert torch.equal(out.advantages, adv) and torch.equal(out.returns, returns), seed


def test_raw_reinforce_plus_plus_is_the_masked_reward_to_go():
    batch, rewards, mask, _ = random_batch(5, b=20, t=9, gaps=True)
    raw = reinforce_plus_plus_raw(batch, gamma=0.9)
    expect = ref.reinforce_plus_plus_returns(rewards, mask, 0.9) * mask
    torch.testing.assert_close(raw.advantages, expect, rtol=1e-9, atol=1e-9)
    assert raw.returns is raw.advantages
    assert DEFAULT_TABLE.estimator("reinforce++_raw") is reinforce_plus_plus_raw


def test_reinforce_plus_plus_baseline_is_dr_grpo_then_whiten():
    # Not registered as the chain: its per-sample whitening skips two [B, T] passes. Equal to rounding.
    chained = chain(outcome_estimator(baseline=group_mean), whiten())
    for seed in range(8):
        batch, _, _, _ = random_batch(seed, b=5 + 4 * seed, t=6, gaps=seed % 2 == 0)
        a, b = reinforce_plus_plus_baseline(batch), chained(batch)
        torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-9, atol=1e-9)


def test_remax_needs_reward_baselines_by_its_entry():
    assert DEFAULT_TABLE.entry("advantage_estimator", "remax").requires == {"reward_baselines"}
