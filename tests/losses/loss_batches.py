"""Small PolicyLossInput builders shared by the loss tests."""

from __future__ import annotations

import torch

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput

POLICY_LOSSES = DEFAULT_TABLE.names("policy_loss")
AGGREGATIONS = ("token_mean", "token_sum", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# Losses whose row's loss depends only on that row (micro-batch exact); the *_cov ones select
# tokens by batch-wide covariance.
LOCAL_LOSSES = tuple(n for n in POLICY_LOSSES if n not in ("clip_cov", "kl_cov"))


def make_batch(
    b: int = 4,
    t: int = 6,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    spread: float = 0.3,
    mask_p: float = 0.3,
    requires_grad: bool = True,
) -> PolicyLossInput:
    """Random log-probs in (-3, 0), an old policy ``spread`` away, random advantages and mask
    (every row keeps at least its first token), rollout and reference log-probs nearby."""
    g = torch.Generator().manual_seed(seed)
    lp = (-3.0 * torch.rand(b, t, generator=g) - 0.05).to(dtype)
    old = (lp + spread * torch.randn(b, t, generator=g, dtype=dtype)).clamp(max=-0.01)
    adv = torch.randn(b, t, generator=g, dtype=dtype)
    mask = torch.rand(b, t, generator=g) > mask_p
    mask[:, 0] = True
    roll = (old + 0.1 * torch.randn(b, t, generator=g, dtype=dtype)).clamp(max=-0.01)
    ref = (old + 0.2 * torch.randn(b, t, generator=g, dtype=dtype)).clamp(max=-0.01)
    if requires_grad:
        lp = lp.clone().requires_grad_()
    return PolicyLossInput(
        log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask, rollout_log_probs=roll, ref_log_probs=ref
    )


def with_log_probs(batch: PolicyLossInput, lp: torch.Tensor) -> PolicyLossInput:
    """The same batch with new ``log_probs`` (e.g. a gradcheck input)."""
    return PolicyLossInput(
        log_probs=lp,
        old_log_probs=batch.old_log_probs,
        advantages=batch.advantages,
        loss_mask=batch.loss_mask,
        rollout_log_probs=batch.rollout_log_probs,
        ref_log_probs=batch.ref_log_probs,
    )


def rows(batch: PolicyLossInput, idx: torch.Tensor, lp: torch.Tensor) -> PolicyLossInput:
    """Rows ``idx`` of ``batch``, with ``lp[idx]`` as the log-probs (keeps the autograd link)."""
    return PolicyLossInput(
        log_probs=lp[idx],
        old_log_probs=batch.old_log_probs[idx],
        advantages=batch.advantages[idx],
        loss_mask=batch.loss_mask[idx],
        rollout_log_probs=batch.rollout_log_probs[idx],
        ref_log_probs=batch.ref_log_probs[idx],
    )
