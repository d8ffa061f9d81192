"""Off-policy corrections: TIS, IcePop, sequence rejection, mismatch metrics, applied through
compute_policy_loss."""

from __future__ import annotations

import math

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput
from skyrl_fn.algorithm import compute_policy_loss
from skyrl_fn.losses import (
    icepop_mask,
    mismatch_metrics,
    off_policy_correction,
    sequence_mask,
    tis_weights,
)

F64 = torch.float64
LN = math.log
# trainer-minus-rollout log-ratios d, one row per case
D = torch.tensor([[LN(3.0), LN(0.5), 0.0], [LN(1.005), LN(1.005), 0.0], [LN(0.1), 0.0, 0.0]], dtype=F64)
ROLL = torch.full((3, 3), -1.0, dtype=F64)
OLD = ROLL + D
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def test_token_and_sequence_tis():
    w, met = tis_weights(OLD, ROLL, MASK, level="token", cap=2.0)
    expect = torch.tensor([[2.0, 0.5, 1.0], [1.005, 1.005, 0.0], [0.1, 1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(w, expect)
    assert float(met["tis_capped_frac"]) == pytest.approx(1 / 8)
    w, met = tis_weights(OLD, ROLL, MASK, level="sequence", cap=5.0)
    seq = torch.tensor([1.5, 1.005**2, 0.1], dtype=F64)
    torch.testing.assert_close(w, torch.where(MASK, seq[:, None].expand(3, 3), 0))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="level"):
        tis_weights(OLD, ROLL, MASK, level="row")
    with pytest.raises(ValueError, match="rollout_log_probs"):
        tis_weights(OLD, None, MASK)


def test_icepop_and_sequence_masks():
    keep, met = icepop_mask(OLD, ROLL, MASK, low=0.45, high=2.0)
    assert keep.tolist() == [[False, True, True], [True, True, False], [False, True, True]]
    assert float(met["icepop_masked_frac"]) == pytest.approx(2 / 8)
    geo, met = sequence_mask(OLD, ROLL, MASK, metric="geometric")  # 0.99 .. 1.01
    assert geo.tolist() == [[False] * 3, [True, True, False], [False] * 3]
    assert float(met["seq_masked_frac"]) == pytest.approx(2 / 3)
    prod, _ = sequence_mask(OLD, ROLL, MASK, metric="product")  # 0.5 .. 2: 1.5 ok, 1.01 ok, 0.1 no
    assert prod.any(-1).tolist() == [True, True, False]
    outlier, _ = sequence_mask(OLD, ROLL, MASK, metric="token", high=2.5)
    assert outlier.any(-1).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="low, high"):
        icepop_mask(OLD, ROLL, MASK, low=2.0, high=1.0)


def test_mismatch_metrics():
    met = mismatch_metrics(OLD, ROLL, MASK)
    valid = D[MASK]
    assert float(met["mismatch_abs_logp"]) == pytest.approx(float(valid.abs().mean()))
    assert float(met["mismatch_max_abs_logp"]) == pytest.approx(LN(10.0))
    assert float(met["is_ratio_max"]) == pytest.approx(3.0)
    assert float(met["is_ratio_min"]) == pytest.approx(0.1)
    assert all(v.dim() == 0 and not v.requires_grad for v in met.values())


def test_combined_correction_applied_in_compute_policy_loss():
    corr = off_policy_correction(OLD, ROLL, MASK, tis_ratio_type="token", tis_cap=2.0,
                                 token_mask_low=0.2, token_mask_high=5.0)
    assert corr.loss_mask.tolist() == [[True, True, True], [True, True, False], [False, True, True]]
    assert float(corr.metrics["masked_frac"]) == pytest.approx(1 / 8)
    lp = (OLD + 0.05).clone().requires_grad_()
    batch = PolicyLossInput(log_probs=lp, old_log_probs=OLD, advantages=torch.ones_like(OLD), loss_mask=MASK,
                            rollout_log_probs=ROLL)
    out = DEFAULT_TABLE.policy_loss("regular")(batch)
    r = compute_policy_loss(DEFAULT_TABLE, "regular", batch, correction=corr)
    m = corr.loss_mask
    expect = torch.where(m, out.token_loss * corr.weights, 0).sum() / m.sum()
    torch.testing.assert_close(r.loss, expect)
    assert "tis_capped_frac" in r.metrics and "mismatch_abs_logp" in r.metrics
    identity = off_policy_correction(OLD, ROLL, MASK)
    assert torch.equal(identity.loss_mask, MASK) and torch.equal(identity.weights, MASK.to(F64))
    with pytest.raises(ValueError, match="token_mask_low, token_mask_high"):
        off_policy_correction(OLD, ROLL, MASK, token_mask_low=0.5)
