"""Reward transforms, and every piece's hyperparameter errors at construction."""

from __future__ import annotations

import math

import pytest
import torch

from transform_batches import make_batch
from skyrl_fn import AdvantageInput
from skyrl_fn.transforms import (
    clip_advantages,
    group_normalize_std,
    last_token,
    length_penalty,
    scale_rewards,
    shape_rewards,
    weighted_sum,
    whiten,
)


# -- reward transforms ------------------------------------------------------------------------


def test_scale_rewards():
    batch = make_batch()
    out = scale_rewards(-2.5)(batch)
    expected = torch.where(batch.response_mask, batch.token_level_rewards * -2.5, 0)
    assert torch.equal(out.token_level_rewards, expected)
    assert out.group_ids is not None and torch.equal(out.group_ids, batch.group_ids)
    assert repr(scale_rewards(2)) == "scale_rewards(2.0)"


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: scale_rewards("2"), TypeError),
        (lambda: scale_rewards(True), TypeError),
        (lambda: scale_rewards(float("nan")), ValueError),
        (lambda: scale_rewards(math.inf), ValueError),
        (lambda: length_penalty(-0.1), ValueError),
        (lambda: clip_advantages(-1.0), ValueError),
        (lambda: clip_advantages(0), ValueError),
        (lambda: clip_advantages(math.inf), ValueError),
        (lambda: clip_advantages(None), TypeError),
        (lambda: whiten(eps=0.0), ValueError),
        (lambda: group_normalize_std(epsilon=-1e-6), ValueError),
        (lambda: shape_rewards("tanh"), TypeError),
        (lambda: weighted_sum({}), ValueError),
        (lambda: weighted_sum([("a", 1.0)]), TypeError),
        (lambda: weighted_sum({"a": float("nan")}), ValueError),
        (lambda: weighted_sum({1: 1.0}), TypeError),
    ],
)
def test_bad_hyperparameters_fail_at_construction(build, error):
    with pytest.raises(error):
        build()


def test_error_messages_name_the_argument():
    with pytest.raises(ValueError, match=r"max_abs: expected a number > 0, got -1.0"):
        clip_advantages(-1)
    with pytest.raises(ValueError, match=r"coef: expected a number >= 0, got -0.5"):
        length_penalty(-0.5)
    with pytest.raises(ValueError, match=r"weights\['x'\]: expected a finite number"):
        weighted_sum({"x": math.inf})


def test_shape_rewards_applies_fn_and_zeroes_padding():
    batch = make_batch()
    out = shape_rewards(lambda r, m: r.abs() + 1.0)(batch)
    expected = torch.where(batch.response_mask, batch.token_level_rewards.abs() + 1.0, 0)
    assert torch.equal(out.token_level_rewards, expected)
    with pytest.raises(ValueError, match=r"expected the function to return shape \[B, T\] = \(8, 5\), got \(8,\)"):
        shape_rewards(lambda r, m: r.sum(-1))(batch)
    with pytest.raises(TypeError, match="expected a floating tensor"):
        shape_rewards(lambda r, m: m)(batch)


def test_last_token():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert last_token(mask).tolist() == [[False, True, False], [False, False, False], [False, False, True]]


def test_weighted_sum_places_heads():
    b, t = 3, 4
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    token_head = torch.arange(b * t, dtype=torch.float32).reshape(b, t)
    batch = AdvantageInput(
        token_level_rewards=torch.ones(b, t),
        response_mask=mask,
        group_ids=[0, 0, 1],
        extras={"outcome": torch.tensor([1.0, 2.0, 3.0]), "dense": token_head, "flag": torch.tensor([True, False, True])},
    )
    out = weighted_sum({"outcome": 2.0, "dense": 0.5, "token_level_rewards": 1.0, "flag": -1.0})(batch)
    expected = torch.where(mask, 0.5 * token_head + 1.0, 0)
    expected[0, 1] += 2.0 * 1.0 - 1.0
    expected[1, 3] += 2.0 * 2.0
    expected[2, 0] += 2.0 * 3.0 - 1.0
    torch.testing.assert_close(out.token_level_rewards, expected)
    # The outcome score is the weighted sum of the heads' outcome scores.
    scores = out.token_level_rewards.sum(-1)
    torch.testing.assert_close(scores, 2.0 * batch.extras["outcome"] + 0.5 * torch.where(mask, token_head, 0).sum(-1)
                               + mask.sum(-1) - batch.extras["flag"].float())


def test_weighted_sum_unknown_head_names_it_and_lists_extras():
    batch = make_batch(extras={"correct": torch.ones(8), "style": torch.zeros(8, 5)})
    with pytest.raises(ValueError) as info:
        weighted_sum({"corect": 1.0})(batch)
    msg = str(info.value)
    assert "'corect'" in msg and "did you mean 'correct'" in msg and "['correct', 'style', 'token_level_rewards']" in msg


def test_length_penalty_lowers_the_outcome_score_by_coef_times_length():
    batch = make_batch()
    out = length_penalty(0.1)(batch)
    lengths = batch.response_mask.sum(-1).float()
    before = torch.where(batch.response_mask, batch.token_level_rewards, 0).sum(-1)
    torch.testing.assert_close(out.token_level_rewards.sum(-1), before - 0.1 * lengths)
    changed = out.token_level_rewards != torch.where(batch.response_mask, batch.token_level_rewards, 0)
    assert torch.equal(changed, last_token(batch.response_mask))
