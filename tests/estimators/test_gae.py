"""GAE: verl's masked recursion, SkyRL-Train's unmasked one on right padding, special cases;
``gae`` is ``chain(gae_raw, whiten())``, bit for bit the fused form."""

from __future__ import annotations

import pytest
import torch

import skyrl_reference as ref
from batches import random_batch
from fused import fused_gae
from skyrl_fn import DEFAULT_TABLE, AdvantageInput, Chain, chain, clip_advantages, scale_rewards
from skyrl_fn.estimators import gae, gae_raw
from skyrl_fn.estimators._whiten import masked_whiten

PARAMS = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)]


@pytest.mark.parametrize(("gamma", "lambd"), PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_verl_masked_recursion(gamma, lambd, dtype):
    for seed in range(12):
        batch, rewards, mask, _ = random_batch(seed, dtype=dtype, gaps=seed % 2 == 0)
        if mask.sum() < 2:
            continue
        out = gae(batch, gamma=gamma, lambd=lambd)
        adv, returns = ref.gae_verl(rewards, batch.values, mask, gamma, lambd)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.advantages, adv * mask, **tol, msg=lambda m: f"seed {seed}: {m}")
        torch.testing.assert_close(out.returns, returns * mask, **tol)


@pytest.mark.parametrize(("gamma", "lambd"), PARAMS)
def test_equals_skyrl_unmasked_recursion_on_zero_right_padding(gamma, lambd):
    for seed in range(12):
        batch, rewards, mask, _ = random_batch(seed, empty_rows=False)  # right-padded, values 0 on padding
        if mask.sum() < 2:
            continue
        out = gae(batch, gamma=gamma, lambd=lambd)
        adv, returns = ref.gae_skyrl(rewards, batch.values, mask, gamma, lambd)
        torch.testing.assert_close(out.advantages, adv * mask)
        torch.testing.assert_close(out.returns, returns * mask)


def test_skyrl_differs_on_gaps_where_verl_skips():
    # A hole in the mask: SkyRL bootstraps through the masked value, verl (and we) skip it.
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64).repeat(2, 1)
    values = torch.tensor([[0.2, 5.0, 0.3]], dtype=torch.float64).repeat(2, 1)
    mask = torch.tensor([[1, 0, 1], [1, 0, 1]])
    batch = AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 1], values=values)
    ours = gae(batch, gamma=1.0, lambd=1.0).returns
    assert ours[0].tolist() == [1.0, 0.0, 1.0]  # lambda = 1: returns are the reward-to-go
    skyrl = ref.gae_skyrl(rewards, values, mask.double(), 1.0, 1.0)[1]
    assert float(skyrl[0, 0]) == pytest.approx(1.0)  # here the chain still sums to the same return ...
    skyrl_td = ref.gae_skyrl(rewards, values, mask.double(), 1.0, 0.0)[1]
    ours_td = gae(batch, gamma=1.0, lambd=0.0).returns
    assert float(skyrl_td[0, 0]) == pytest.approx(5.0) and float(ours_td[0, 0]) == pytest.approx(0.3)  # ... but one-step TD bootstraps differently


def test_lambda_one_returns_are_discounted_returns():
    batch, rewards, mask, _ = random_batch(4, b=20, t=9, gaps=True)
    out = gae(batch, gamma=0.9, lambd=1.0)
    torch.testing.assert_close(out.returns, discounted_returns_skipping(rewards, mask.bool(), 0.9))


def discounted_returns_skipping(rewards, mask, gamma):
    """Reward-to-go over the *valid* tokens only (masked tokens skipped, not restarting)."""
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[i, t]:
                running = rewards[i, t] + gamma * running
                out[i, t] = running
    return out


def test_lambda_zero_is_the_td_error():
    batch, rewards, mask, _ = random_batch(5, b=10, t=6, empty_rows=False)  # right-padded
    values = batch.values
    out = gae(batch, gamma=0.8, lambd=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(values.shape[0], 1, dtype=values.dtype)], dim=1) * torch.cat(
        [mask[:, 1:], torch.zeros(values.shape[0], 1, dtype=mask.dtype)], dim=1
    )
    td = (rewards + 0.8 * next_v - values) * mask
    torch.testing.assert_close(out.returns - values * mask, td)


def test_hand_values():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25], [1.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = gae(AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 1], values=values), gamma=0.5, lambd=0.5)
    # row 0: d1 = 1 - 0.25 = 0.75; d0 = 0 + 0.5 * 0.25 - 0.5 = -0.375; A0 = -0.375 + 0.25 * 0.75.
    # row 1: the padded value 9 is skipped: A0 = 2 - 1 = 1.
    raw = torch.tensor([-0.1875, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out.returns, torch.tensor([[0.3125, 1.0], [2.0, 0.0]], dtype=torch.float64))
    white = (raw - raw.mean()) / (raw.var() + 1e-8).sqrt()
    torch.testing.assert_close(out.advantages, torch.tensor([[white[0], white[1]], [white[2], 0.0]], dtype=torch.float64))


def test_needs_values():
    batch = AdvantageInput(token_level_rewards=torch.ones(2, 2), response_mask=torch.ones(2, 2), group_ids=[0, 0])
    with pytest.raises(ValueError, match="values"):
        gae(batch)


def test_masked_values_and_rewards_are_never_read():
    batch, rewards, mask, _ = random_batch(7, b=12, t=8, gaps=True)
    nan = torch.full_like(rewards, float("nan"))
    dirty = AdvantageInput(
        token_level_rewards=torch.where(mask.bool(), rewards, nan),
        response_mask=batch.response_mask,
        group_ids=batch.group_ids,
        values=torch.where(mask.bool(), batch.values, nan),
    )
    a, b = gae(batch, gamma=0.9, lambd=0.9), gae(dirty, gamma=0.9, lambd=0.9)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)


def test_edge_cases_single_token_all_masked_half_precision():
    one = AdvantageInput(token_level_rewards=torch.tensor([[1.0, 0.0]]), response_mask=torch.tensor([[1, 0]]), group_ids=[0], values=torch.tensor([[0.25, 0.0]]))
    out = gae(one)
    assert out.advantages.tolist() == [[0.0, 0.0]] and out.returns.tolist() == [[1.0, 0.0]]
    none = AdvantageInput(token_level_rewards=torch.ones(2, 3), response_mask=torch.zeros(2, 3), group_ids=[0, 0], values=torch.ones(2, 3))
    assert gae(none).advantages.eq(0).all() and gae(none).returns.eq(0).all()
    batch, _, _, _ = random_batch(3, b=16, t=5, dtype=torch.float16)
    before = batch.values.clone()
    out = gae(batch, gamma=0.99, lambd=0.95)
    assert out.advantages.dtype == torch.float16 and torch.isfinite(out.advantages).all()
    assert torch.equal(batch.values, before)
    out.check_against(batch)


# -- gae is chain(gae_raw, whiten()) ---------------------------------------------------------------


@pytest.mark.parametrize(("gamma", "lambd"), PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chain_is_bit_identical_to_the_fused_gae(gamma, lambd, dtype):
    assert isinstance(gae, Chain) and gae.estimator is gae_raw and repr(gae.advantage_transforms[0]) == "whiten(eps=1e-08)"
    for seed in range(10):
        batch, _, _, _ = random_batch(seed, b=3 + 7 * seed, t=1 + seed, dtype=dtype, gaps=seed % 2 == 0)
        out = gae(batch, gamma=gamma, lambd=lambd)
        adv, returns = fused_gae(batch, gamma=gamma, lambd=lambd)
        assert torch.equal(out.advantages, adv) and torch.equal(out.returns, returns), seed
        assert out.advantages.is_contiguous() and out.returns.is_contiguous()


def test_chain_in_half_precision_whitens_the_rounded_raw_advantages():
    batch, _, _, _ = random_batch(3, b=40, t=9, dtype=torch.bfloat16, gaps=True)
    out = gae(batch, gamma=0.9, lambd=0.8)
    adv, returns = fused_gae(batch, gamma=0.9, lambd=0.8)
    assert torch.equal(out.returns, returns)
    torch.testing.assert_close(out.advantages, adv, rtol=2e-2, atol=2e-2)  # documented deviation


def test_raw_gae_is_the_unwhitened_recursion_and_whitening_it_gives_gae():
    batch, rewards, mask, _ = random_batch(8, b=30, t=8, gaps=True)
    raw = gae_raw(batch, gamma=0.95, lambd=0.9)
    adv, returns = ref.gae_verl(rewards, batch.values, mask, 0.95, 0.9, whiten=False)
    torch.testing.assert_close(raw.advantages, adv * mask)
    torch.testing.assert_close(raw.returns, returns * mask)
    torch.testing.assert_close(masked_whiten(raw.advantages, batch.response_mask), gae(batch, gamma=0.95, lambd=0.9).advantages)


def test_gae_and_every_chain_of_it_need_a_critic():
    assert DEFAULT_TABLE.entry("advantage_estimator", "gae").requires == {"values"}
    assert DEFAULT_TABLE.entry("advantage_estimator", "gae_raw").requires == {"values"}
    clipped = DEFAULT_TABLE.register("gae_clipped", chain(gae_raw, clip_advantages(1.0)))
    assert clipped.entry("advantage_estimator", "gae_clipped").requires == {"values"}
    nested = DEFAULT_TABLE.register("gae_nested", chain(scale_rewards(2.0), gae, clip_advantages(1.0)))
    assert nested.entry("advantage_estimator", "gae_nested").requires == {"values"}
    assert "values" not in DEFAULT_TABLE.entry("advantage_estimator", "grpo").requires
