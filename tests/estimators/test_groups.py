"""The shared per-group helpers, including the row-blocked sums over [B, T]."""

from __future__ import annotations

import pytest
import torch

from skyrl_fn.estimators._groups import (
    broadcast_to_tokens,
    group_mean,
    group_std,
    mask_rows,
    outcome_scores,
    outcome_scores_and_lengths,
    row_blocks,
)


def test_blocked_row_sums_cross_block_boundaries():
    gen = torch.Generator().manual_seed(0)
    b, t = 2500, 256  # ~1024 float32 rows per block: three blocks, the last one partial
    assert len(row_blocks(torch.empty(b, t))) == 3
    rewards = torch.randn(b, t, generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.5
    dirty = torch.where(mask, rewards, float("nan"))  # off-mask values never reach the sum
    torch.testing.assert_close(outcome_scores(dirty, mask), torch.where(mask, rewards, 0).sum(-1))
    assert torch.equal(outcome_scores_and_lengths(rewards, mask)[1], mask.sum(-1).float())


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_mask_rows_is_torch_where_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 9, generator=gen) * 3).to(dtype)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    x[1] = -x[1].abs()  # negative values off the mask must give +0.0, never -0.0
    mask = torch.rand(6, 9, generator=gen) < 0.5
    mask[0, :3] = False
    got = mask_rows(x, mask, out=torch.empty_like(x))
    want = torch.where(mask, x, torch.zeros((), dtype=dtype))
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # same bytes: no -0.0, no NaN


def test_broadcast_to_tokens_matches_where_on_a_huge_page_output():
    b, t = 8192, 300  # 9.4 MiB of float32: above _alloc.MIN_BYTES, several write blocks
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(b, generator=gen, dtype=torch.float64)
    values[::7] = -values[::7].abs()
    mask = torch.rand(b, t, generator=gen) < 0.6
    got = broadcast_to_tokens(values, mask, torch.float32)
    want = torch.where(mask, values.float()[:, None], 0.0)
    assert got.shape == (b, t) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_scores_and_lengths_in_one_pass():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(2500, 33, generator=gen)
    mask = torch.rand(2500, 33, generator=gen) < 0.3
    dirty = torch.where(mask, rewards, float("inf"))
    scores, lengths = outcome_scores_and_lengths(dirty, mask)
    assert torch.equal(scores, outcome_scores(rewards, mask))
    assert torch.equal(lengths, mask.sum(-1).float())


def test_row_sums_without_a_same_width_integer_fall_back_to_where():
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(1500, 9, generator=gen).to(torch.float8_e4m3fn)  # no int8 bit trick here
    mask = torch.rand(1500, 9, generator=gen) < 0.4
    scores, lengths = outcome_scores_and_lengths(rewards, mask)
    want = torch.where(mask, rewards.float(), 0.0).sum(-1)
    torch.testing.assert_close(scores, want)
    assert torch.equal(lengths, mask.sum(-1).float())
