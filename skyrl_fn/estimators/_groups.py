"""Vectorised per-group statistics over a batch of outcome scores.

Notation: ``B`` samples, ``P`` groups, dense group ids ``ids [B]`` in ``0..P-1``. Sums use
``index_add`` (one pass, no Python loop over groups); variances are computed in two passes
(mean first, then centred squares), never as E[x^2] - E[x]^2, which loses low-variance groups to
cancellation.

Row sums over ``[B, T]`` are :func:`skyrl_fn.core._rowsums.masked_row_sums` (blocked, cache-sized);
an ``AdvantageInput`` computes the outcome scores once when it checks the rewards, and
:func:`outcome_scores` reuses them while the rewards and mask are unchanged
(:mod:`skyrl_fn.core._facts`). The ``[B, T]`` broadcast writes into a huge-page-backed output
(:mod:`skyrl_fn.core._alloc`) in blocks of about 4 MiB, masked with :func:`mask_rows`.
"""

from __future__ import annotations

import torch

from skyrl_fn.core import _alloc
from skyrl_fn.core._checks import certify_masked_rows
from skyrl_fn.core._rowsums import (
    accum_dtype,
    known_outcome_scores,
    mask_rows,
    masked_row_sums,
    row_blocks,
)

__all__ = [
    "accum_dtype",
    "outcome_scores",
    "outcome_scores_and_lengths",
    "row_blocks",
    "group_count",
    "group_sum",
    "group_mean",
    "group_std",
    "mask_rows",
    "broadcast_to_tokens",
]


def outcome_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` masked sum of token rewards, in the accumulation dtype (rewards off the mask never reach it).

    :func:`skyrl_fn.core._rowsums.masked_row_sums`; the sums an ``AdvantageInput`` computed for these
    very tensors when it checked them are reused (bit for bit the same values) while neither
    tensor, nor the sums, was written in place since. Off the mask, rewards may hold anything.

    Args:
        token_level_rewards: ``[B, T]`` floating.
        response_mask: ``[B, T]`` bool.
    """
    known = known_outcome_scores(token_level_rewards, response_mask)
    return known if known is not None else masked_row_sums(token_level_rewards, response_mask)[0]


def outcome_scores_and_lengths(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outcome_scores, response_lengths)`` in one pass over the mask, both in the accumulation dtype."""
    return masked_row_sums(token_level_rewards, response_mask, with_lengths=True)


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
    """``[B, T]``: ``per_sample [B]`` on every response token, 0 elsewhere, cast to ``dtype``.

    The same values as ``torch.where(response_mask, per_sample[:, None], 0)``, bit for bit (see
    :func:`mask_rows`), written into a fresh huge-page-backed output in cache-sized row blocks
    (:func:`skyrl_fn.core._rowsums.row_blocks`). The output is certified
    (:func:`skyrl_fn.core._checks.certify_masked_rows`), so the table's output check reads the
    ``[B]`` values' finiteness instead of the ``[B, T]`` output.
    """
    m = response_mask
    values = per_sample.to(dtype)[:, None]
    out = _alloc.empty(tuple(m.shape), dtype, m.device)
    rows = row_blocks(out).step
    for v_part, m_part, o_part in zip(values.split(rows), m.split(rows), out.split(rows)):
        mask_rows(v_part, m_part, out=o_part)
    return certify_masked_rows(out, values, m)
