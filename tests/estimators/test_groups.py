"""The shared per-group helpers, including the row-blocked sums over [B, T]."""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import group_mean, group_std, outcome_scores, response_lengths, row_blocks


def test_blocked_row_sums_cross_block_boundaries():
    gen = torch.Generator().manual_seed(0)
    b, t = 2500, 256  # ~1024 float32 rows per block: three blocks, the last one partial
    assert len(row_blocks(torch.empty(b, t))) == 3
    rewards = torch.randn(b, t, generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.5
    dirty = torch.where(mask, rewards, float("nan"))  # off-mask values never reach the sum
    torch.testing.assert_close(outcome_scores(dirty, mask), torch.where(mask, rewards, 0).sum(-1))
    assert torch.equal(response_lengths(mask, torch.float32), mask.sum(-1).float())


def test_half_precision_scores_accumulate_in_float32():
    rewards = torch.full((2, 3000), 0.1, dtype=torch.float16)
    mask = torch.ones(2, 3000, dtype=torch.bool)
    scores = outcome_scores(rewards, mask)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.full((2,), 3000 * float(torch.tensor(0.1, dtype=torch.float16))))


def test_two_pass_std_keeps_low_variance_groups():
    x = torch.tensor([1e4 + 1e-3, 1e4 - 1e-3, 5.0, 7.0], dtype=torch.float32)
    ids = torch.tensor([0, 0, 1, 1])
    count = torch.tensor([2.0, 2.0])
    mean = group_mean(x, ids, 2, count)
    std = group_std(x, ids, 2, mean, count)
    torch.testing.assert_close(std, torch.stack([x[:2].std(), x[2:].std()]), rtol=1e-2, atol=0)
