"""The pieces of skyrl_fn.transforms: formulas against loop references, hyperparameter errors at
construction, and no input mutation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import AdvantageInput, AdvantageOutput, DEFAULT_TABLE
from skyrl_fn.compose import AdvantageTransform, RewardTransform, chain
from skyrl_fn.estimators import grpo, rloo
from skyrl_fn.estimators._whiten import masked_whiten
from skyrl_fn.transforms import (
    batch_mean,
    clip_advantages,
    group_mean,
    group_median,
    group_normalize_std,
    last_token,
    leave_one_out,
    length_penalty,
    normalize_by_length,
    outcome_estimator,
    scale_rewards,
    shape_rewards,
    weighted_sum,
    whiten,
)


def make_batch(seed: int = 0, b: int = 8, t: int = 5, groups: int = 3, dtype=torch.float32, extras=None) -> AdvantageInput:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    ids = torch.arange(b) % groups
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=ids, extras=extras or {})


# Hypothesis: group structure and scores, bounded and finite.
group_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=5)


@st.composite
def scores_and_groups(draw):
    sizes = draw(group_sizes)
    ids = [g for g, n in enumerate(sizes) for _ in range(n)]
    perm = draw(st.permutations(list(range(len(ids)))))
    ids = [ids[i] for i in perm]
    values = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=len(ids), max_size=len(ids)))
    return torch.tensor(values, dtype=torch.float64), torch.tensor(ids), len(sizes)


def loop_baseline(kind: str, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(scores)
    for i in range(len(scores)):
        group = scores[ids == ids[i]]
        others = scores[(ids == ids[i]) & (torch.arange(len(scores)) != i)]
        if kind == "group_mean":
            out[i] = group.mean() if len(group) > 1 else 0.0
        elif kind == "leave_one_out":
            out[i] = others.mean() if len(others) else scores[i]
        elif kind == "batch_mean":
            out[i] = scores.mean()
        else:
            out[i] = float(np.median(group.numpy())) if len(group) > 1 else 0.0
    return out


BASELINES = {"group_mean": group_mean, "leave_one_out": leave_one_out, "batch_mean": batch_mean, "group_median": group_median}


@pytest.mark.parametrize("kind", sorted(BASELINES))
@given(data=scores_and_groups())
def test_baselines_match_loop_reference(kind, data):
    scores, ids, p = data
    got = BASELINES[kind](scores, ids, p)
    assert got.shape == scores.shape
    torch.testing.assert_close(got, loop_baseline(kind, scores, ids), rtol=1e-9, atol=1e-9)


def test_outcome_estimator_group_mean_is_dr_grpo_and_leave_one_out_is_rloo():
    for seed in range(5):
        batch = make_batch(seed, b=9, groups=4)  # group 3 has fewer samples; sizes 3,2,2,2
        dr = DEFAULT_TABLE.compute_advantages("dr_grpo", batch)
        mine = outcome_estimator(baseline=group_mean)(batch)
        assert torch.equal(mine.advantages, dr.advantages)
        torch.testing.assert_close(outcome_estimator(baseline=leave_one_out)(batch).advantages, rloo(batch).advantages)
    single = make_batch(1, b=3, groups=3)  # every group of size 1
    assert torch.equal(outcome_estimator(baseline=group_mean)(single).advantages, grpo(single, norm_by_std=False).advantages)


def test_outcome_estimator_with_group_normalize_std_is_grpo():
    for seed in range(5):
        batch = make_batch(seed, b=10, groups=4)
        got = chain(outcome_estimator(baseline=group_mean), group_normalize_std(epsilon=1e-6))(batch)
        torch.testing.assert_close(got.advantages, grpo(batch, epsilon=1e-6).advantages)


def test_outcome_estimator_checks_the_baseline():
    batch = make_batch()
    with pytest.raises(TypeError, match="baseline: expected a callable"):
        outcome_estimator(baseline=3)
    bad_shape = outcome_estimator(baseline=lambda s, ids, p: s[:2])
    with pytest.raises(ValueError, match=r"expected it to return shape \[B\] = \(8,\), got \(2,\)"):
        bad_shape(batch)
    nan = outcome_estimator(baseline=lambda s, ids, p: s * float("nan"))
    with pytest.raises(ValueError, match="expected finite values"):
        nan(batch)
    assert repr(outcome_estimator(baseline=group_median)) == "outcome_estimator(baseline=group_median)"


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
