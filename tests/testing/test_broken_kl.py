"""Deliberately broken KL estimators: the kit fails each with the right property named (finite,
shapes, no mutation, determinism, token locality, zero at the reference, a broken promise)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.testing import PropertyViolation, check_kl_estimator

#: Derandomised, so a test that passes once passes every time; small, so the file stays fast.
KIT = settings(max_examples=15, derandomize=True, deadline=None, database=None)


def k3_unclamped(log_probs, ref_log_probs):
    """k3 without clamps, on a scaled log-ratio: overflows to inf for the far log-ratios drawn."""
    x = ref_log_probs - log_probs
    return torch.exp(x * 10) - x * 10 - 1  # e^{200} overflows float32 and float64 alike


def kl_summed_over_tokens(log_probs, ref_log_probs):
    return (log_probs - ref_log_probs).sum(-1)  # [B], not [B, T]


def kl_mutates_input(log_probs, ref_log_probs):
    ref_log_probs.clamp_(min=-10.0)
    return log_probs - ref_log_probs


def kl_with_noise(log_probs, ref_log_probs):
    return (log_probs - ref_log_probs) + 1e-3 * torch.rand_like(log_probs)


def kl_centred_over_batch(log_probs, ref_log_probs):
    d = log_probs - ref_log_probs
    return d.square() + d.mean()  # couples every token to the batch: micro-batching changes it


def kl_with_bias(log_probs, ref_log_probs):
    return 0.5 * (log_probs - ref_log_probs).square() + 0.01


def k1_correct(log_probs, ref_log_probs):
    return log_probs - ref_log_probs


BROKEN = [
    (k3_unclamped, "finite"),
    (kl_summed_over_tokens, "shapes"),
    (kl_mutates_input, "no_mutation"),
    (kl_with_noise, "deterministic"),
    (kl_centred_over_batch, "token_local"),
    (kl_with_bias, "zero_at_reference"),
]


@pytest.mark.parametrize(("fn", "prop"), BROKEN, ids=[p for _, p in BROKEN])
def test_the_kit_names_the_broken_property(fn, prop):
    with pytest.raises(PropertyViolation) as err:
        check_kl_estimator(fn, settings=KIT)
    assert err.value.property == prop, str(err.value)
    assert str(err.value).startswith(f"{prop}: ") and fn.__name__ in str(err.value)
    assert "log-prob pair B=" in str(err.value)  # the shrunk input is printed


def test_a_correct_estimator_passes_and_a_broken_promise_fails():
    check_kl_estimator(k1_correct, settings=KIT)
    table = DEFAULT_TABLE.register("k1_claims_non_negative", k1_correct, kind="kl_estimator", promises={"non_negative"})
    with pytest.raises(PropertyViolation, match=r"^non_negative: the estimate is negative"):
        check_kl_estimator("k1_claims_non_negative", table=table, settings=KIT)
    check_kl_estimator("k2", properties={"non_negative", "token_local"}, settings=KIT)


def test_properties_of_other_kinds_are_rejected():
    with pytest.raises(ValueError, match=r"\['mask'\] do not apply to a kl_estimator"):
        check_kl_estimator("k3", properties={"mask"}, settings=KIT)
