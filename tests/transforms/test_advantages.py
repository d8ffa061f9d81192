"""Advantage transforms against references; every piece keeps the dtype and never mutates its inputs."""

from __future__ import annotations

import pytest
import torch

from transform_batches import make_batch
from skyrl_fn import AdvantageInput, AdvantageOutput, DEFAULT_TABLE
from skyrl_fn.core.compose import AdvantageTransform, RewardTransform, chain
from skyrl_fn.estimators import grpo
from skyrl_fn.estimators._whiten import masked_whiten
from skyrl_fn.transforms import (
    clip_advantages,
    group_normalize_std,
    length_penalty,
    normalize_by_length,
    scale_rewards,
    shape_rewards,
    weighted_sum,
    whiten,
)


# -- advantage transforms ---------------------------------------------------------------------


def test_whiten_matches_the_shared_helper_and_reference():
    batch = make_batch(3, b=6, t=7)
    est = grpo(batch)
    out = whiten()(est, batch)
    assert torch.equal(out.advantages, masked_whiten(est.advantages, batch.response_mask))
    valid = est.advantages[batch.response_mask]
    ref = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(out.advantages[batch.response_mask], ref)
    assert out.returns is est.returns  # returns pass through


def test_whiten_with_fewer_than_two_valid_tokens_is_zero():
    mask = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)
    batch = AdvantageInput(token_level_rewards=torch.tensor([[3.0, 0.0], [0.0, 0.0]]), response_mask=mask, group_ids=[0, 1])
    out = chain(grpo, whiten())(batch)
    assert torch.equal(out.advantages, torch.zeros(2, 2))


def test_clip_advantages():
    batch = make_batch(2)
    est = AdvantageOutput(advantages=torch.where(batch.response_mask, 5 * batch.token_level_rewards, 0), returns=torch.zeros(8, 5))
    out = clip_advantages(1.0)(est, batch)
    assert torch.equal(out.advantages, est.advantages.clamp(-1, 1))
    assert float(out.advantages.abs().max()) == 1.0


def test_normalize_by_length_makes_row_sums_the_row_mean():
    batch = make_batch(4)
    est = grpo(batch)
    out = normalize_by_length()(est, batch)
    torch.testing.assert_close(out.advantages.sum(-1), est.advantages[:, 0])
    empty = AdvantageInput(token_level_rewards=torch.ones(2, 2), response_mask=torch.tensor([[1, 1], [0, 0]]), group_ids=[0, 0])
    assert torch.equal(chain(grpo, normalize_by_length())(empty).advantages[1], torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pieces_keep_the_rewards_dtype(dtype):
    batch = make_batch(5, dtype=dtype)
    est = chain(scale_rewards(0.5), length_penalty(0.01), grpo, whiten(), clip_advantages(3.0), normalize_by_length(),
                group_normalize_std())
    out = DEFAULT_TABLE.register("all", est).compute_advantages("all", batch)
    assert out.advantages.dtype == dtype


PIECES = [
    scale_rewards(3.0),
    shape_rewards(lambda r, m: torch.tanh(r)),
    weighted_sum({"token_level_rewards": 1.0, "bonus": 0.5}),
    length_penalty(0.1),
    whiten(),
    clip_advantages(0.5),
    normalize_by_length(),
    group_normalize_std(),
]


@pytest.mark.parametrize("piece", PIECES, ids=repr)
def test_no_piece_mutates_its_inputs(piece):
    batch = make_batch(6, extras={"bonus": torch.randn(8)})
    est = grpo(batch)
    snapshot = [x.clone() for x in (batch.token_level_rewards, batch.response_mask, batch.group_ids, batch.extras["bonus"],
                                     est.advantages, est.returns)]
    if isinstance(piece, RewardTransform):
        new = piece(batch)
        assert new is not batch and new.token_level_rewards is not batch.token_level_rewards
    else:
        assert isinstance(piece, AdvantageTransform)
        new = piece(est, batch)
        assert new is not est and new.advantages is not est.advantages
    after = [batch.token_level_rewards, batch.response_mask, batch.group_ids, batch.extras["bonus"], est.advantages, est.returns]
    for a, b in zip(snapshot, after):
        assert torch.equal(a, b)
