"""Baselines and outcome_estimator: loop references, the chains that are dr_grpo, rloo and grpo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transform_batches import make_batch
from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.core.compose import chain
from skyrl_fn.estimators import grpo, rloo
from skyrl_fn.transforms import (
    batch_mean,
    group_mean,
    group_median,
    group_normalize_std,
    leave_one_out,
    outcome_estimator,
)


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
