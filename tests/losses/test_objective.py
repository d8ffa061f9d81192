"""The one policy objective: its terms equal their hand-written sum, the corrections and the KL
estimator see what they should, and micro-batches add up to the full batch."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.losses import k3, off_policy_correction, policy_objective, regular, seq_mean_token_mean, token_mean
from skyrl_fn.core.records import PolicyLossInput

from loss_batches import make_batch


def _rows(batch: PolicyLossInput, idx: torch.Tensor) -> PolicyLossInput:
    return PolicyLossInput(**{k: getattr(batch, k)[idx] for k in (
        "log_probs", "old_log_probs", "advantages", "loss_mask", "rollout_log_probs", "ref_log_probs")})


def test_every_term_is_the_hand_written_sum():
    b = make_batch(4, 6, seed=2)
    m = b.loss_mask
    ent = torch.rand(4, 6, dtype=b.log_probs.dtype)
    tis = functools.partial(off_policy_correction, tis_ratio_type="token", tis_cap=2.0)
    out = policy_objective(
        b, loss=regular, aggregation=token_mean, correction=tis, kl_estimator=k3, kl_loss_coef=0.1,
        entropy=ent, entropy_coef=0.01,
    )
    c = tis(b.old_log_probs, b.rollout_log_probs, m)
    pg = token_mean(regular(b).token_loss * c.weights, m)
    kl = token_mean(torch.where(m, k3(torch.where(m, b.log_probs, 0), torch.where(m, b.ref_log_probs, 0)), 0), m)
    ent_term = token_mean(torch.where(m, ent, 0), m)
    torch.testing.assert_close(out.loss, pg + 0.1 * kl - 0.01 * ent_term)
    torch.testing.assert_close(out.metrics["pg_loss"], pg.detach())
    torch.testing.assert_close(out.metrics["kl_loss"], kl.detach())
    torch.testing.assert_close(out.metrics["entropy"], ent_term)
    assert {"tis_capped_frac", "mismatch_abs_logp", "ratio_mean"} <= set(out.metrics)


def test_off_terms_are_not_computed_and_missing_inputs_are_named():
    b = make_batch(3, 4, seed=1)
    out = policy_objective(b, loss=regular, aggregation=token_mean)
    assert set(out.metrics) >= {"pg_loss"} and not {"kl_loss", "entropy"} & set(out.metrics)
    with pytest.raises(ValueError, match="entropy: expected the"):
        policy_objective(b, loss=regular, aggregation=token_mean, entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator: expected"):
        policy_objective(b, loss=regular, aggregation=token_mean, kl_loss_coef=0.1)
    with pytest.raises(TypeError, match="PolicyLossOutput"):
        policy_objective(b, loss=lambda batch: batch.log_probs, aggregation=token_mean)


@given(seed=st.integers(0, 2**16), cut=st.integers(1, 5))
def test_micro_batches_sum_to_the_full_batch_with_every_term(seed, cut):
    b = make_batch(6, 5, seed=seed)
    ent = torch.rand(6, 5, dtype=b.log_probs.dtype)
    tis = functools.partial(off_policy_correction, tis_ratio_type="sequence", tis_cap=3.0)
    norms = dict(global_tokens=float(b.loss_mask.sum()), global_seqs=6.0, max_seq_len=5)
    objective = functools.partial(
        policy_objective, loss=regular, aggregation=seq_mean_token_mean, correction=tis, kl_estimator=k3, kl_loss_coef=0.2,
        entropy_coef=0.05, **norms,
    )
    full = objective(b, entropy=ent).loss
    idx = torch.arange(6)
    parts = sum(objective(_rows(b, i), entropy=ent[i]).loss for i in (idx[:cut], idx[cut:]))
    torch.testing.assert_close(parts, full, rtol=1e-10, atol=1e-12)
