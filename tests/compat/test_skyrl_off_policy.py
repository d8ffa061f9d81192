"""``skyrl_fn.compat.off_policy_correction_utils`` against the definitions written out here, and
SkyRL 0.3.0's trainer metric helpers for the train-vs-rollout drift."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.compat import (
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY,
    OffPolicyCorrectionConfig,
    compute_minibatch_rollout_logprob_diff_metrics,
    finalize_minibatch_rollout_logprob_diff_std,
    reduce_metrics,
)
from skyrl_fn.compat.off_policy_correction_utils import (
    apply_off_policy_correction,
    compute_off_policy_correction,
    compute_outlier_token_mask,
    compute_sequence_mask,
    compute_tis_ratio,
    compute_token_mask,
    off_policy_correction_enabled,
)


@st.composite
def pairs(draw):
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    old = torch.randn(b, t, generator=g, dtype=torch.float64) - 1
    rollout = old + torch.randn(b, t, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.05, 0.5, 3.0]))
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    return old, rollout, mask


def rho(old, rollout):
    return torch.exp((old - rollout).clamp(-20, 20))


@given(pairs(), st.floats(0.5, 4.0))
def test_tis_ratio_token_and_sequence(p, cap):
    old, rollout, mask = p
    valid = mask.bool()
    cfg = OffPolicyCorrectionConfig(token_tis_ratio_clip_high=cap, sequence_tis_ratio_clip_high=cap)
    w, m = compute_tis_ratio(old, rollout, mask, "token", cfg)
    torch.testing.assert_close(w[valid], rho(old, rollout).clamp(max=cap)[valid])
    n = max(int(valid.sum()), 1)
    assert m["tis_token_clip_high_ratio"] == pytest.approx(float(((rho(old, rollout) > cap) & valid).sum()) / n)
    seq, m = compute_tis_ratio(old, rollout, mask, "sequence", cfg)
    s = torch.exp((((old - rollout) * mask).sum(-1, keepdim=True)).clamp(-20, 20))
    torch.testing.assert_close(seq, s.clamp(max=cap))  # [B, 1]
    assert m["tis_seq_clip_high_ratio"] == pytest.approx(float((s > cap).double().mean()))


@given(pairs(), st.sampled_from(["geometric", "product"]))
def test_sequence_masks(p, metric):
    old, rollout, mask = p
    low, high = (0.9, 1.1) if metric == "geometric" else (0.5, 2.0)
    cfg = OffPolicyCorrectionConfig(geo_mask_low=low, geo_mask_high=high, product_mask_low=low, product_mask_high=high)
    keep, m = compute_sequence_mask(old, rollout, mask, metric, cfg)
    total = ((old - rollout) * mask).sum(-1, keepdim=True)
    stat = torch.exp(total / mask.sum(-1, keepdim=True).clamp(min=1)) if metric == "geometric" else torch.exp(total.clamp(-20, 20))
    want = ((stat >= low) & (stat <= high)).double()
    torch.testing.assert_close(keep, want)
    prefix = "geo" if metric == "geometric" else "product"
    assert m[f"{prefix}_sequence_mask_masked_ratio"] == pytest.approx(float(1 - want.mean()))
    assert m[f"{prefix}_sequence_mask_over_high_ratio"] == pytest.approx(float((stat > high).double().mean()))
    assert m[f"{prefix}_sequence_mask_under_low_ratio"] == pytest.approx(float((stat < low).double().mean()))


@given(pairs(), st.sampled_from([None, 1e-2]), st.sampled_from([None, 5.0]))
def test_outlier_mask_rejects_rows_with_any_valid_outlier(p, low, high):
    old, rollout, mask = p
    keep, m = compute_outlier_token_mask(
        old, rollout, mask, OffPolicyCorrectionConfig(outlier_token_is_threshold_low=low, outlier_token_is_threshold_high=high)
    )
    r, valid = rho(old, rollout), mask.bool()
    over = ((r > high) & valid).any(-1) if high is not None else torch.zeros(r.shape[0], dtype=torch.bool)
    under = ((r < low) & valid).any(-1) if low is not None else torch.zeros(r.shape[0], dtype=torch.bool)
    torch.testing.assert_close(keep, (~(over | under)).double()[:, None])
    assert m["outlier_seq_over_high_ratio"] == pytest.approx(float(over.double().mean()))
    assert m["outlier_seq_under_low_ratio"] == pytest.approx(float(under.double().mean()))


@given(pairs())
def test_token_mask_drops_valid_tokens_outside_inclusive_bounds(p):
    old, rollout, mask = p
    cfg = OffPolicyCorrectionConfig(token_mask_is_threshold_low=0.5, token_mask_is_threshold_high=2.0)
    keep, m = compute_token_mask(old, rollout, mask, cfg)
    r, valid = rho(old, rollout), mask.bool()
    inside = (r >= 0.5) & (r <= 2.0)
    torch.testing.assert_close(keep, (inside | ~valid).double())  # masked positions stay 1
    assert m["token_mask_ratio"] == pytest.approx(float((~inside & valid).sum()) / max(int(valid.sum()), 1))


def test_bounds_are_inclusive_and_unknown_kinds_use_skyrls_wording():
    old = torch.zeros(1, 2)
    rollout = -torch.log(torch.tensor([[0.5, 2.0]]))
    keep, _ = compute_token_mask(old, rollout, torch.ones(1, 2), OffPolicyCorrectionConfig(token_mask_is_threshold_low=0.5, token_mask_is_threshold_high=2.0))
    assert keep.tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="Unknown tis_ratio_type: 'invalid'"):
        compute_tis_ratio(old, old, torch.ones(1, 2), "invalid", OffPolicyCorrectionConfig())
    with pytest.raises(ValueError, match="Unknown sequence_mask_metric: 'invalid'"):
        compute_sequence_mask(old, old, torch.ones(1, 2), "invalid", OffPolicyCorrectionConfig())
    with pytest.raises(ValueError, match="^rollout_logprobs: expected shape"):
        compute_tis_ratio(old, torch.zeros(1, 3), torch.ones(1, 2), "token", OffPolicyCorrectionConfig())


def test_enabled_truth_table():
    assert not off_policy_correction_enabled(OffPolicyCorrectionConfig())
    for fields in ({"tis_ratio_type": "token"}, {"sequence_mask_metric": "product"},
                   {"outlier_token_is_threshold_low": 1e-4}, {"outlier_token_is_threshold_high": 100.0},
                   {"token_mask_is_threshold_low": 0.5, "token_mask_is_threshold_high": 2.0}):
        assert off_policy_correction_enabled(OffPolicyCorrectionConfig(**fields)), fields
    assert not off_policy_correction_enabled(OffPolicyCorrectionConfig(token_mask_is_threshold_low=0.5))
    assert off_policy_correction_enabled({"tis_ratio_type": "sequence"})  # a plain mapping works too


@given(pairs())
def test_full_correction_runs_every_step_in_skyrls_order(p):
    old, rollout, mask = p
    cfg = OffPolicyCorrectionConfig(
        tis_ratio_type="sequence", sequence_tis_ratio_clip_high=3.0, sequence_mask_metric="geometric",
        geo_mask_low=0.5, geo_mask_high=2.0, outlier_token_is_threshold_low=1e-3, outlier_token_is_threshold_high=50.0,
        token_mask_is_threshold_low=0.2, token_mask_is_threshold_high=5.0,
    )
    tis, metrics, new_mask = compute_off_policy_correction(old, rollout, mask, cfg)
    step = mask * compute_outlier_token_mask(old, rollout, mask, cfg)[0]
    step = step * compute_token_mask(old, rollout, step, cfg)[0]
    want_tis, _ = compute_tis_ratio(old, rollout, step, "sequence", cfg)  # on the mask so far
    step = step * compute_sequence_mask(old, rollout, step, "geometric", cfg)[0]
    torch.testing.assert_close(new_mask, step)
    torch.testing.assert_close(tis, want_tis)
    r = rho(old, rollout)
    assert metrics["is_ratio_mean"] == pytest.approx(float((r * mask).sum() / mask.sum().clamp(min=1)))
    assert metrics["is_ratio_max"] == pytest.approx(float((r * mask).max()))
    for key in ("outlier_seq_masked_ratio", "token_mask_ratio", "tis_seq_clip_high_ratio", "geo_sequence_mask_masked_ratio"):
        assert key in metrics
    loss = torch.ones_like(old)
    corrected, corrected_mask, _ = apply_off_policy_correction(loss, old, rollout, mask, cfg)
    torch.testing.assert_close(corrected, loss * tis)
    torch.testing.assert_close(corrected_mask, new_mask)


def test_nothing_enabled_or_no_rollout_log_probs_is_the_identity():
    old, rollout, mask = torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)
    tis, metrics, new_mask = compute_off_policy_correction(old, rollout, mask, OffPolicyCorrectionConfig())
    assert tis is None and metrics == {} and new_mask is mask
    loss = torch.randn(1, 3)
    out = apply_off_policy_correction(loss, old, None, mask, OffPolicyCorrectionConfig(tis_ratio_type="token"))
    assert out[0] is loss and out[1] is mask and out[2] == {}


# -- trainer metric helpers ---------------------------------------------------------------------------
def test_rollout_drift_metrics_reduce_to_the_pooled_std():
    g = torch.Generator().manual_seed(0)
    diffs = [torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4)]
    per_micro = [
        compute_minibatch_rollout_logprob_diff_metrics(d[None, :], torch.zeros(1, 6, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64))
        for d in diffs
    ]
    keys = list(per_micro[0])
    mini = [reduce_metrics({k: [a[k], b[k]] for k in keys}) for a, b in (per_micro[:2], per_micro[2:])]
    total = reduce_metrics({k: [m[k] for m in mini] for k in keys})
    finalize_minibatch_rollout_logprob_diff_std(total)
    pooled = torch.cat(diffs)
    assert MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY not in total
    assert total[MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY] == pytest.approx(float(pooled.mean()))
    assert total[MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY] == pytest.approx(float(pooled.std(unbiased=False)))
    assert total[MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY] == pytest.approx(float(pooled.max()))
    assert total[MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY] == pytest.approx(float(pooled.min()))


def test_drift_metric_edge_cases_and_reduce_metrics_rules():
    lp = torch.tensor([[-1.0, -2.0]])
    assert compute_minibatch_rollout_logprob_diff_metrics(lp, None, None) == {}
    masked = compute_minibatch_rollout_logprob_diff_metrics(lp, lp + 0.5, torch.zeros(1, 2))
    assert len(masked) == 4 and all(v == 0.0 for v in masked.values())
    metrics = {"a_max": [1.0, 3.0], "a_min": [1.0, 3.0], "policy_loss": [1.0, 3.0], "mtp_loss": [1.0, 3.0], "x": [1.0, 3.0], "s": ["no"]}
    assert reduce_metrics(metrics, sum_loss_metrics=True) == {"a_max": 3.0, "a_min": 1.0, "policy_loss": 4.0, "mtp_loss": 2.0, "x": 2.0}
    assert reduce_metrics(metrics)["policy_loss"] == 2.0
    with pytest.raises(ValueError, match="metrics\\['k'\\]: expected at least one value"):
        reduce_metrics({"k": []})
    untouched = {"foo": 1.0}
    finalize_minibatch_rollout_logprob_diff_std(untouched)
    assert untouched == {"foo": 1.0}
    negative = {MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY: 1.0, MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY: 1.0 - 1e-12}
    finalize_minibatch_rollout_logprob_diff_std(negative)
    assert negative[MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY] == 0.0 and not math.isnan(negative[MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY])


def test_bound_errors_name_skyrls_config_fields():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="geo_mask_low, geo_mask_high: expected geo_mask_low <= geo_mask_high"):
        compute_sequence_mask(old, old, mask, "geometric", OffPolicyCorrectionConfig(geo_mask_low=2.0, geo_mask_high=1.0))
    with pytest.raises(ValueError, match="^outlier_token_is_threshold_high: expected a number >= 0"):
        compute_outlier_token_mask(old, old, mask, OffPolicyCorrectionConfig(outlier_token_is_threshold_high=-1.0))
    with pytest.raises(ValueError, match="^token_tis_ratio_clip_high: expected a number > 0"):
        compute_tis_ratio(old, old, mask, "token", OffPolicyCorrectionConfig(token_tis_ratio_clip_high=0.0))
