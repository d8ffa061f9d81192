"""Deliberately broken policy losses and aggregations: the kit fails each with the right property
named (zero gradient at masked tokens, no mutation, micro-batch invariance, ratio-1 gradient)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, settings

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput, PolicyLossOutput
from skyrl_fn.core.properties import ROW_LOCAL_POLICY_LOSS
from skyrl_fn.testing import PropertyViolation, check_aggregation, check_policy_loss

#: Derandomised, so a test that passes once passes every time; small, so the file stays fast.
# No shrinking: these tests check which property fails, not the counterexample's size
# (tests/testing/test_broken_estimators.py checks shrinking).
KIT = settings(max_examples=10, derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


# -- deliberately broken losses and aggregations ------------------------------------------------------
def _ratio(b: PolicyLossInput) -> torch.Tensor:
    return torch.exp(torch.clamp(b.log_probs - b.old_log_probs, -20, 20))


def _masked(b: PolicyLossInput, x: torch.Tensor) -> PolicyLossOutput:
    return PolicyLossOutput(token_loss=torch.where(b.loss_mask, x, torch.zeros((), dtype=x.dtype)))


def pg_loss(b: PolicyLossInput) -> PolicyLossOutput:
    """-A * ratio on valid tokens (correct). [B, T]."""
    return _masked(b, -b.advantages * _ratio(b))


def loss_ignores_mask(b: PolicyLossInput) -> PolicyLossOutput:
    return PolicyLossOutput(token_loss=-b.advantages * _ratio(b))


def loss_mutates_input(b: PolicyLossInput) -> PolicyLossOutput:
    b.advantages.clamp_(-10.0, 10.0)
    return _masked(b, -b.advantages * _ratio(b))


def loss_scales_with_microbatch(b: PolicyLossInput) -> PolicyLossOutput:
    return _masked(b, -b.advantages * _ratio(b) / b.batch_size)  # a local mean inside the loss


def loss_with_bias(b: PolicyLossInput) -> PolicyLossOutput:
    return _masked(b, -(b.advantages + 0.1) * _ratio(b))


BROKEN_LOSSES = [
    (loss_ignores_mask, "masked_grad_zero"),
    (loss_mutates_input, "no_mutation"),
    (loss_scales_with_microbatch, "microbatch_invariant"),
    (loss_with_bias, "zero_grad_at_ratio_one_zero_adv"),
]


def test_a_correct_custom_loss_passes():
    table = DEFAULT_TABLE.register("pg", pg_loss, promises=ROW_LOCAL_POLICY_LOSS)
    check_policy_loss("pg", table=table, settings=KIT)


@pytest.mark.parametrize("fn, prop", BROKEN_LOSSES, ids=[p for _, p in BROKEN_LOSSES])
def test_broken_loss_fails_with_the_right_property(fn, prop):
    table = DEFAULT_TABLE.register(fn.__name__, fn, promises=ROW_LOCAL_POLICY_LOSS)
    with pytest.raises(PropertyViolation) as err:
        check_policy_loss(fn.__name__, table=table, aggregations=["token_mean", "seq_mean_token_mean"], settings=KIT)
    assert err.value.property == prop and str(err.value).startswith(f"{prop}: ")
    assert "batch: PolicyLossInput" in str(err.value)


def local_token_mean(token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None):
    """Ignores global_tokens: right for one whole batch only."""
    return torch.where(loss_mask, token_loss, 0).sum() / loss_mask.sum().clamp(min=1)


def test_broken_aggregation_is_caught_and_breaks_a_good_loss_too():
    with pytest.raises(PropertyViolation, match="^microbatch_invariant: "):
        check_aggregation(local_token_mean, settings=KIT)
    with pytest.raises(PropertyViolation, match="^microbatch_invariant: ") as err:
        check_policy_loss(pg_loss, properties=["microbatch_invariant"], aggregations=[local_token_mean], settings=KIT)
    assert "aggregation: local_token_mean" in str(err.value)
