"""The property vocabulary (skyrl_fn.core.properties): every name has a place in the check order and a
kind it applies to; unknown promises are rejected."""

from __future__ import annotations

import pytest

from skyrl_fn.core.properties import DESCRIPTIONS, KNOWN, ORDER, applicable, check_promises, universal


def test_vocabulary():
    assert set(ORDER) == set(applicable("advantage_estimator") | applicable("policy_loss") | applicable("kl_estimator"))
    assert set(ORDER) == KNOWN  # every property has a place in the order
    assert "mask" not in applicable("kl_estimator") and {"token_local", "zero_at_reference"} <= universal("kl_estimator")
    assert "masked_grad_zero" in universal("policy_loss") and "microbatch_invariant" in universal("aggregation")
    with pytest.raises(ValueError, match="unknown properties"):
        check_promises("x", ["group_locall"])
    with pytest.raises(TypeError):
        check_promises("x", "group_local")
    assert set(DESCRIPTIONS) == KNOWN
    for kind in ("advantage_estimator", "policy_loss", "aggregation", "kl_estimator"):
        assert universal(kind) <= applicable(kind)
