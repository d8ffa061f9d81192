"""Deliberately broken advantage estimators: the kit fails each with the right property named,
with a shrunk batch and the offending positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, settings

from skyrl_fn import AdvantageInput, AdvantageOutput, AlgorithmTable, UnknownNameError
from skyrl_fn.testing import PropertyReportWarning, PropertyViolation, check_estimator

#: Derandomised, so a test that passes once passes every time; small, so the file stays fast.
SHRINK = settings(max_examples=10, derandomize=True, deadline=None, database=None)
#: Without shrinking, for the tests that check which property fails and what the message holds:
#: shrinking was most of this file's CPU; test_violation_is_shrunk_and_names_positions keeps it.
KIT = settings(SHRINK, phases=[Phase.explicit, Phase.reuse, Phase.generate])
_GROUP_CENTRED = {"permutation_equivariant", "group_local", "shift_invariant"}


# -- deliberately broken estimators ------------------------------------------------------------------
def _scores(b: AdvantageInput) -> torch.Tensor:
    return torch.where(b.response_mask, b.token_level_rewards, 0).sum(-1)


def _group_mean(b: AdvantageInput, s: torch.Tensor) -> torch.Tensor:
    n = torch.bincount(b.group_ids, minlength=b.num_groups).to(s.dtype)
    return (torch.zeros(b.num_groups, dtype=s.dtype).index_add_(0, b.group_ids, s) / n)[b.group_ids]


def _out(b: AdvantageInput, per_row: torch.Tensor) -> AdvantageOutput:
    adv = torch.where(b.response_mask, per_row[:, None], 0)
    return AdvantageOutput(advantages=adv, returns=adv)


@torch.no_grad()
def centred(b: AdvantageInput) -> AdvantageOutput:
    """Score minus the group mean (correct: Dr. GRPO without the size-1 rule). [B, T]."""
    s = _scores(b)
    return _out(b, torch.where(torch.bincount(b.group_ids)[b.group_ids] > 1, s - _group_mean(b, s), 0))


@torch.no_grad()
def ignores_mask(b: AdvantageInput) -> AdvantageOutput:
    s = _scores(b)
    adv = (s - _group_mean(b, s))[:, None].expand_as(b.token_level_rewards).clone()
    return AdvantageOutput(advantages=adv, returns=adv)


@torch.no_grad()
def mutates_input(b: AdvantageInput) -> AdvantageOutput:
    r = b.token_level_rewards.mul_(b.response_mask)  # in place: the caller's rewards change
    s = r.sum(-1)
    return _out(b, s - _group_mean(b, s))


@torch.no_grad()
def leaks_across_groups(b: AdvantageInput) -> AdvantageOutput:
    s = _scores(b)
    return _out(b, s - s.mean())  # the batch mean, not the group mean


@torch.no_grad()
def nan_on_constant_group(b: AdvantageInput) -> AdvantageOutput:
    s = _scores(b)
    centred_s = s - _group_mean(b, s)
    var = torch.zeros(b.num_groups, dtype=s.dtype).index_add_(0, b.group_ids, centred_s**2)
    return _out(b, centred_s / var.sqrt()[b.group_ids])  # 0 / 0 on a constant group


@torch.no_grad()
def depends_on_row_order(b: AdvantageInput) -> AdvantageOutput:
    s = _scores(b)
    first = torch.full((b.num_groups,), b.batch_size).scatter_reduce(0, b.group_ids, torch.arange(b.batch_size), "amin")
    return _out(b, s - s[first[b.group_ids]])  # baseline: the group's first row in batch order


@torch.no_grad()
def random_tie_break(b: AdvantageInput) -> AdvantageOutput:
    s = _scores(b) + 1e-3 * torch.rand(b.batch_size, dtype=b.token_level_rewards.dtype)  # unseeded noise
    return _out(b, s - _group_mean(b, s))


BROKEN_ESTIMATORS = [
    (random_tie_break, "deterministic"),
    (ignores_mask, "mask"),
    (mutates_input, "no_mutation"),
    (leaks_across_groups, "group_local"),
    (nan_on_constant_group, "finite"),
    (depends_on_row_order, "permutation_equivariant"),
]


def test_a_correct_custom_estimator_passes_what_it_promises():
    table = AlgorithmTable().register("centred", centred, promises=_GROUP_CENTRED)
    check_estimator("centred", table=table, settings=KIT)


@pytest.mark.parametrize("fn, prop", BROKEN_ESTIMATORS, ids=[p for _, p in BROKEN_ESTIMATORS])
def test_broken_estimator_fails_with_the_right_property(fn, prop):
    # Promised like the correct one, so the whole default battery runs in the default order.
    table = AlgorithmTable().register(fn.__name__, fn, promises=_GROUP_CENTRED)
    with pytest.raises(PropertyViolation) as err:
        check_estimator(fn.__name__, table=table, settings=KIT)
    assert err.value.property == prop
    message = str(err.value)
    assert message.startswith(f"{prop}: ")
    assert f"'{fn.__name__}'" in message and "batch: AdvantageInput" in message
    assert isinstance(err.value, AssertionError) and isinstance(err.value.batch, AdvantageInput)


def test_violation_is_shrunk_and_names_positions():
    with pytest.raises(PropertyViolation) as err:
        check_estimator(nan_on_constant_group, settings=SHRINK)
    v = err.value
    assert v.batch.batch_size <= 2 and v.batch.token_level_rewards.shape[1] <= 2
    assert v.positions and all(len(p) == 2 for p in v.positions)
    assert "offending positions (row, token)" in str(v)


def test_promises_decide_what_is_checked_and_hand_selection_overrides():
    with pytest.warns(PropertyReportWarning):  # promises nothing: universal checks pass, the rest is reported
        report = check_estimator(leaks_across_groups, settings=KIT)
    assert "group_local" in report.broken and "group_local" not in report
    with pytest.raises(PropertyViolation, match="^group_local: "):
        check_estimator(leaks_across_groups, properties=["group_local"], settings=KIT)
    with pytest.raises(ValueError, match="do not apply"):
        check_estimator("grpo", properties=["microbatch_invariant"], settings=KIT)
    with pytest.raises(UnknownNameError, match="did you mean 'grpo'"):
        check_estimator("gpro", settings=KIT)


def test_shift_and_scale_invariance_are_checked_with_an_epsilon():
    # GRPO's (s - mean) / (std + 1e-6) is only approximately scale invariant: the kit's tolerance
    # accepts it; a large epsilon is a real violation and is caught.
    check_estimator("grpo", properties=["scale_invariant", "batch_scale_invariant", "shift_invariant"], settings=KIT)
    with pytest.raises(PropertyViolation, match="^scale_invariant: "):
        check_estimator("grpo", properties=["scale_invariant"], hyperparameters={"epsilon": 0.5}, settings=KIT)


# -- what a new user writes: SkyRL-style functions, nothing declared -------------------------------------
def skyrl_batch_mean(token_level_rewards, response_mask, index, **kwargs):
    """SkyRL style, with the bug: the baseline is the batch mean, not the group mean."""
    scores = (token_level_rewards * response_mask).sum(-1)
    adv = (scores - scores.mean())[:, None] * response_mask
    return adv, adv


def skyrl_first_row_baseline(token_level_rewards, response_mask, index, **kwargs):
    """SkyRL style, with the bug: each group's baseline is its first row in batch order."""
    scores = (token_level_rewards * response_mask).sum(-1)
    first = {}
    for i, g in enumerate(index.tolist()):
        first.setdefault(g, i)
    base = torch.stack([scores[first[g]] for g in index.tolist()])
    adv = (scores - base)[:, None] * response_mask
    return adv, adv


def test_the_default_call_fails_a_row_order_dependence_with_nothing_declared():
    with pytest.raises(PropertyViolation, match="^permutation_equivariant: "):
        check_estimator(skyrl_first_row_baseline, settings=KIT)


def test_the_default_call_reports_a_batch_mean_as_not_group_local_and_strict_fails_it():
    with pytest.warns(PropertyReportWarning, match="breaks group_local"):
        report = check_estimator(skyrl_batch_mean, settings=KIT)
    assert "permutation_equivariant" in report.checked and "batch_shift_invariant" in report.optional
    assert set(report.broken) >= {"group_local", "shift_invariant"}
    assert "breaks group_local" in str(report) and "SkyRL style" in str(report)
    with pytest.raises(PropertyViolation, match="^group_local: "):
        check_estimator(skyrl_batch_mean, strict=True, settings=KIT)


def test_a_correct_function_is_told_what_it_satisfies():
    with pytest.warns(PropertyReportWarning, match="breaks scale_invariant"):
        report = check_estimator(centred, settings=KIT, strict=False)
    assert {"group_local", "shift_invariant"} <= set(report.optional)
    assert set(report.broken) == {"scale_invariant", "batch_scale_invariant"}  # centring does not divide by the std
    # Promising what it holds silences the report; a table entry's promises are its declaration.
    table = AlgorithmTable().register("centred", centred, promises=_GROUP_CENTRED | {"batch_shift_invariant"})
    assert check_estimator("centred", table=table, settings=KIT).broken == {}


def test_group_locality_message_names_the_value_before_and_after_the_change():
    with pytest.raises(PropertyViolation) as err:
        check_estimator(leaks_across_groups, properties=["group_local"], settings=KIT)
    v = err.value
    row, tok = v.positions[0]
    before = leaks_across_groups(v.batch).advantages[row, tok]
    assert f"{(row, tok)}: before the change {float(before):.6g}, after " in str(v)
