"""Vectorised per-group statistics over a batch of outcome scores.

Notation: ``B`` samples, ``P`` groups, dense group ids ``ids [B]`` in ``0..P-1``. Sums use
``index_add`` (one pass, no Python loop over groups); variances are computed in two passes
(mean first, then centred squares), never as E[x^2] - E[x]^2, which loses low-variance groups to
cancellation.
"""

from __future__ import annotations

import torch

__all__ = [
    "accum_dtype",
    "outcome_scores",
    "group_count",
    "group_sum",
    "group_mean",
    "group_std",
    "broadcast_to_tokens",
]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 stays float64, anything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def outcome_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` masked sum of token rewards, in the accumulation dtype.

    Args:
        token_level_rewards: ``[B, T]`` floating.
        response_mask: ``[B, T]`` bool.
    """
    acc = accum_dtype(token_level_rewards.dtype)
    return torch.where(response_mask, token_level_rewards, 0).sum(dim=-1, dtype=acc)


def group_count(ids: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``[P]`` number of samples in each group."""
    return torch.bincount(ids, minlength=num_groups).to(dtype)


def group_sum(x: torch.Tensor, ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[P]`` sum of ``x [B]`` over each group."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, ids, x)


def group_mean(x: torch.Tensor, ids: torch.Tensor, num_groups: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """``[P]`` mean of ``x [B]`` over each group (every group has at least one sample)."""
    if count is None:
        count = group_count(ids, num_groups, x.dtype)
    return group_sum(x, ids, num_groups) / count


def group_std(
    x: torch.Tensor,
    ids: torch.Tensor,
    num_groups: int,
    mean: torch.Tensor,
    count: torch.Tensor,
    *,
    unbiased: bool = True,
) -> torch.Tensor:
    """``[P]`` standard deviation of ``x [B]`` over each group, two-pass.

    ``unbiased=True`` divides by ``n - 1`` as ``torch.std`` does; groups with ``n - 1 = 0`` get
    NaN here and callers decide what a size-1 group means (documented per estimator).
    """
    centred = x - mean[ids]
    denom = count - 1 if unbiased else count
    return (group_sum(centred * centred, ids, num_groups) / denom).sqrt()


def broadcast_to_tokens(per_sample: torch.Tensor, response_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]``: ``per_sample [B]`` on every response token, 0 elsewhere, cast to ``dtype``."""
    return torch.where(response_mask, per_sample.to(dtype)[:, None], 0)
