"""RLOO: hand values, the leave-one-out identity, loop equivalence, edge cases."""

from __future__ import annotations

import pytest
import torch

import skyrl_reference as ref
from batches import random_batch
from skyrl_fn import AdvantageInput
from skyrl_fn.estimators import rloo


def outcome_batch(scores, ids, t=2, dtype=torch.float64):
    rewards = torch.zeros(len(scores), t, dtype=dtype)
    rewards[:, -1] = torch.tensor(scores, dtype=dtype)
    return AdvantageInput(token_level_rewards=rewards, response_mask=torch.ones(len(scores), t), group_ids=ids)


def test_hand_values():
    # group a: 1 - (0 + 2)/2 = 0, 0 - 3/2, 2 - 1/2; group b: 4 - 0, 0 - 4; group c (size 1): 0.
    out = rloo(outcome_batch([1.0, 4.0, 0.0, 2.0, 0.0, 9.0], ["a", "b", "a", "a", "b", "c"]))
    expect = torch.tensor([0.0, 4.0, -1.5, 1.5, -4.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out.advantages, expect[:, None].expand(6, 2))
    assert out.returns is out.advantages


def test_leave_one_out_identity():
    batch, rewards, mask, index = random_batch(3, b=40, t=5, min_group=2, max_group=6)
    adv = rloo(batch).advantages.sum(-1) / batch.response_mask.sum(-1).clamp(min=1)
    scores = rewards.sum(-1)
    for i in range(len(index)):  # a test may loop; the estimator may not
        others = [scores[j] for j in range(len(index)) if index[j] == index[i] and j != i]
        if batch.response_mask[i].any():
            torch.testing.assert_close(adv[i], scores[i] - torch.stack(others).mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_skyrl_loop(dtype):
    for seed in range(40):
        batch, rewards, mask, index = random_batch(seed, dtype=dtype, gaps=seed % 3 == 0, string_ids=seed % 4 == 0)
        adv, _ = ref.rloo(rewards.clone(), mask, index)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(rloo(batch).advantages, adv, **tol, msg=lambda m: f"seed {seed}: {m}")


def test_size_one_groups_and_single_sample_batch_are_zero():
    out = rloo(outcome_batch([3.0, -2.0], [0, 1]))
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))
    assert torch.equal(rloo(outcome_batch([5.0], [0])).advantages, torch.zeros(1, 2, dtype=torch.float64))


def test_constant_group_and_empty_rows():
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]])
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    out = rloo(AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 0, 0]))
    # scores 1, 0, 1 -> A = 1 - 0.5, 0 - 1, 1 - 0.5; the empty row stays 0.
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.5, 0.0]]))
    const = rloo(outcome_batch([2.0, 2.0, 2.0], [1, 1, 1]))
    assert torch.equal(const.advantages, torch.zeros_like(const.advantages))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    batch, rewards, _, index = random_batch(4, b=50, t=6, dtype=dtype)
    up = AdvantageInput(token_level_rewards=rewards.float(), response_mask=batch.response_mask, group_ids=index)
    out = rloo(batch)
    assert out.advantages.dtype == dtype
    torch.testing.assert_close(out.advantages, rloo(up).advantages.to(dtype))


def test_inputs_are_not_mutated():
    batch, _, _, _ = random_batch(8, b=20, t=4)
    before = batch.token_level_rewards.clone()
    rloo(batch)
    assert torch.equal(batch.token_level_rewards, before)
