"""An ``AdvantageInput`` sums the rewards over the mask once, where it checks them; the estimators
reuse those sums only while they are still true.

The fast path (scores remembered by the record) must give every built-in exactly the outputs of
the general path (the record built with ``AdvantageInput.unchecked``, which remembers nothing, so
every estimator sums the rewards itself), on random groupings, masks and rewards; and any in-place
write to the rewards, the mask or the remembered sums sends the estimator back to its own pass.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE, AdvantageInput
from skyrl_fn.core._rowsums import known_outcome_scores, masked_row_sums
from skyrl_fn.estimators._groups import outcome_scores

BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
OUTCOME = ["grpo", "dr_grpo", "rloo", "maxrl", "gpg", "opo", "grpo_passk", "reinforce_plus_plus_baseline", "remax"]


def _general(batch: AdvantageInput) -> AdvantageInput:
    """The same record with nothing remembered (the rewards are a new tensor object, same values)."""
    return AdvantageInput.unchecked(
        token_level_rewards=batch.token_level_rewards.clone(),
        response_mask=batch.response_mask,
        group_ids=batch.group_ids,
        values=batch.values,
        reward_baselines=batch.reward_baselines,
    )


@given(
    st.lists(st.integers(2, 5), min_size=1, max_size=6),
    st.integers(1, 9),
    st.randoms(use_true_random=False),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    st.sampled_from(["bool", "float"]),
)
def test_remembered_scores_give_every_outcome_estimator_the_general_path_s_outputs(sizes, t, rnd, dtype, mask_kind):
    """Random group sizes in a shuffled order (uids as strings), ragged masks (fully masked rows
    included), rewards with NaN/inf off the mask, every dtype; bool or float 0/1 masks."""
    ids = [g for g, n in enumerate(sizes) for _ in range(n)]
    rnd.shuffle(ids)
    b = len(ids)
    mask = torch.tensor([[rnd.random() < 0.6 for _ in range(t)] for _ in range(b)])
    rewards = torch.tensor([[rnd.choice([0.0, 1.0, -0.5, rnd.uniform(-3, 3)]) for _ in range(t)] for _ in range(b)])
    rewards = torch.where(mask, rewards, torch.tensor(rnd.choice([0.0, float("nan"), float("inf")]))).to(dtype)
    batch = AdvantageInput(
        token_level_rewards=rewards,
        response_mask=mask.float() if mask_kind == "float" else mask,
        group_ids=[f"uid-{g}" for g in ids],
        reward_baselines=torch.rand(b, generator=torch.Generator().manual_seed(b)).to(dtype),
    )
    assert known_outcome_scores(batch.token_level_rewards, batch.response_mask) is not None
    general = _general(batch)
    for name in OUTCOME:
        if name == "grpo_passk" and min(sizes) < 2:
            continue
        fast = DEFAULT_TABLE.compute_advantages(name, batch).advantages
        slow = DEFAULT_TABLE.compute_advantages(name, general).advantages
        assert torch.equal(fast.view(BITS[dtype]), slow.view(BITS[dtype])), name  # bit for bit


def _batch(seed: int = 0) -> AdvantageInput:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(8, 6, generator=gen) < 0.7
    mask[:, 0] = True
    rewards = torch.where(mask, torch.randn(8, 6, generator=gen), 0.0)
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=torch.arange(8) // 4)


def test_the_record_s_sums_are_the_masked_row_sums():
    batch = _batch()
    known = known_outcome_scores(batch.token_level_rewards, batch.response_mask)
    assert known is not None
    assert torch.equal(known, masked_row_sums(batch.token_level_rewards, batch.response_mask)[0])
    assert outcome_scores(batch.token_level_rewards, batch.response_mask) is known


def _edit_rewards(batch):
    batch.token_level_rewards[0, 0] += 5.0


def _edit_mask(batch):
    batch.response_mask[0, :] = False


def _edit_sums(batch):
    known_outcome_scores(batch.token_level_rewards, batch.response_mask).add_(1.0)


@pytest.mark.parametrize("edit", [_edit_rewards, _edit_mask, _edit_sums])
def test_any_in_place_write_after_construction_is_seen(edit):
    batch = _batch()
    edit(batch)
    assert known_outcome_scores(batch.token_level_rewards, batch.response_mask) is None
    want = torch.where(batch.response_mask, batch.token_level_rewards, 0.0).sum(-1)
    assert torch.equal(outcome_scores(batch.token_level_rewards, batch.response_mask), want)
    fresh = DEFAULT_TABLE.compute_advantages("grpo", _general(batch)).advantages
    assert torch.equal(DEFAULT_TABLE.compute_advantages("grpo", batch).advantages, fresh)


def test_other_tensors_with_the_same_values_share_nothing():
    batch = _batch()
    assert known_outcome_scores(batch.token_level_rewards.clone(), batch.response_mask) is None
    assert known_outcome_scores(batch.token_level_rewards, batch.response_mask.clone()) is None
    assert known_outcome_scores(batch.token_level_rewards[:4], batch.response_mask[:4]) is None


def test_non_finite_rewards_on_the_mask_are_still_rejected_naming_the_row():
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 3, dtype=torch.bool)
    rewards = torch.randn(4, 3, generator=gen)
    rewards[2, 1] = float("nan")
    with pytest.raises(ValueError, match="token_level_rewards: expected finite values, got NaN/inf in row 2"):
        AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 0, 1, 1])
    rewards[2, 1] = 3e38  # finite, but the row sums overflow: the element check decides (accepted)
    rewards[2, 2] = 3e38
    AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 0, 1, 1])
    mask[2, 1] = False  # NaN off the mask is fine
    rewards[2, 1] = float("nan")
    AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 0, 1, 1])
