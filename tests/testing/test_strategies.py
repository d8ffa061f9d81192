"""The kit's strategies reach what they promise; the property vocabulary; the kit's settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, find, settings

from skyrl_fn.testing import DEFAULT_MAX_EXAMPLES, kit_settings
from skyrl_fn.testing.strategies import advantage_inputs, decode, log_prob_pairs, microbatch_cuts, policy_loss_inputs, token_losses


def _scores(b):
    return torch.where(b.response_mask, b.token_level_rewards, 0).sum(-1)


# -- strategies, vocabulary, settings ----------------------------------------------------------------
# Reachability only: the first example found is enough, so no shrinking (most of the CPU otherwise).
_FIND = settings(max_examples=2000, database=None, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.mark.parametrize(
    "what, predicate",
    [
        ("size-1 group", lambda b: bool((torch.bincount(b.group_ids) == 1).any())),
        ("groups of 3+", lambda b: bool((torch.bincount(b.group_ids) >= 3).any())),
        ("constant group of 2+", lambda b: any(
            (ids := b.group_ids == g).sum() > 1 and bool((_scores(b)[ids] == _scores(b)[ids][0]).all()) and bool(b.response_mask[ids].any())
            for g in range(b.num_groups))),
        ("all-masked row next to a valid one", lambda b: bool((~b.response_mask.any(1)).any() and b.response_mask.any())),
        ("mask with a hole", lambda b: bool((~b.response_mask[:, :-1] & b.response_mask[:, 1:]).any())),
        ("extreme value", lambda b: bool((b.token_level_rewards.abs() >= 1e5).any())),
        ("float32", lambda b: b.token_level_rewards.dtype == torch.float32),
        ("float64", lambda b: b.token_level_rewards.dtype == torch.float64),
        ("scattered groups", lambda b: bool((b.group_ids[1:] < b.group_ids[:-1]).any())),
    ],
)
def test_advantage_strategy_reaches(what, predicate):
    find(advantage_inputs(), predicate, settings=_FIND)


def test_group_ids_come_as_ints_and_strings():
    from skyrl_fn.testing.strategies import _labels

    assert all(isinstance(x, int) for x in _labels(5, 3, False))
    assert len(set(_labels(5, 3, True))) == 3 and all(x.startswith("uid-") for x in _labels(5, 3, True))


def test_other_strategies_and_decoding():
    assert decode(0) == 0.0 and decode(1) == 0.25 and decode(2) == -0.25 and abs(decode(192)) == 1e6
    find(policy_loss_inputs(), lambda b: not bool(b.loss_mask.any()), settings=_FIND)
    find(policy_loss_inputs(), lambda b: bool(((b.log_probs - b.old_log_probs).abs() >= 5).any()), settings=_FIND)
    find(token_losses(), lambda p: p[0].shape[0] > 1 and bool(p[1].any()), settings=_FIND)
    cuts = find(microbatch_cuts(5), lambda c: len(c) == 3, settings=_FIND)
    assert cuts[0][0] == 0 and cuts[-1][1] == 5


def test_settings_follow_the_profile_or_the_argument():
    assert kit_settings(settings(max_examples=3)).max_examples == 3
    current = settings.get_current_profile_name()
    try:
        settings.load_profile("default")
        assert kit_settings().max_examples == DEFAULT_MAX_EXAMPLES and kit_settings().deadline is None
        assert Phase.shrink in kit_settings().phases and Phase.explain not in kit_settings().phases
        settings.register_profile("_no_shrink", phases=[Phase.explicit, Phase.generate])
        settings.load_profile("_no_shrink")
        assert kit_settings().phases == (Phase.explicit, Phase.generate)  # the loaded profile's phases
    finally:
        settings.load_profile(current)
    assert kit_settings().max_examples == (settings.default.max_examples if current != "default" else DEFAULT_MAX_EXAMPLES)


def test_log_prob_pairs_reach_equal_and_far_tokens():
    find(log_prob_pairs(), lambda p: bool((p.log_probs == p.ref_log_probs).any()) and p.shape[0] > 1, settings=_FIND)
    find(log_prob_pairs(), lambda p: bool(((p.log_probs - p.ref_log_probs).abs() >= 20).any()), settings=_FIND)
    pair = find(log_prob_pairs(), lambda p: p.log_probs.dtype == torch.float64, settings=_FIND)
    assert pair.ref_log_probs.dtype == torch.float64 and pair.ref_log_probs.shape == pair.shape
