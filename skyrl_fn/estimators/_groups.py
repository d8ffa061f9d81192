"""Vectorised per-group statistics over a batch of outcome scores.

Notation: ``B`` samples, ``P`` groups, dense group ids ``ids [B]`` in ``0..P-1``. Sums use
``index_add`` (one pass, no Python loop over groups); variances are computed in two passes
(mean first, then centred squares), never as E[x^2] - E[x]^2, which loses low-variance groups to
cancellation.

Row sums over ``[B, T]`` run on CPU over blocks of rows of about 1 MiB: the masked temporary then
stays in cache and its memory is reused, where one full ``[B, T]`` temporary costs a fresh
allocation whose page faults dominate (5x slower at ``B = 65536, T = 256``). This is a loop over
fixed-size blocks of memory, not over samples or groups. Masking is an integer product of bit
patterns with the mask (:func:`mask_rows`), and the ``[B, T]`` broadcast writes into a
huge-page-backed output (:mod:`skyrl_fn.core._alloc`) in blocks of about 4 MiB.
"""

from __future__ import annotations

import torch

from skyrl_fn.core import _alloc

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


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 stays float64, anything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_BLOCK_BYTES = 1 << 20
_WRITE_BLOCK_BYTES = 4 << 20


def row_blocks(x: torch.Tensor, block_bytes: int = _BLOCK_BYTES) -> range:
    """Start rows of the blocks a ``[B, T]`` pass over ``x`` runs on (one block off the CPU)."""
    b, t = x.shape
    if x.device.type != "cpu":
        return range(0, b, max(b, 1))
    return range(0, b, max(1, block_bytes // max(1, t * x.element_size())))


def outcome_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` masked sum of token rewards, in the accumulation dtype (rewards off the mask never reach it).

    Off the mask, rewards may hold anything, NaN and inf included (records check finiteness on the
    mask only): each block is masked with :func:`mask_rows` (exactly ``torch.where``'s zeros), never
    with a float product, where ``NaN * 0`` would leak.

    Args:
        token_level_rewards: ``[B, T]`` floating.
        response_mask: ``[B, T]`` bool.
    """
    return _row_sums(token_level_rewards, response_mask, with_lengths=False)[0]


def outcome_scores_and_lengths(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outcome_scores, response_lengths)`` in one pass over the mask, both in the accumulation dtype."""
    return _row_sums(token_level_rewards, response_mask, with_lengths=True)


def _row_sums(r: torch.Tensor, mask: torch.Tensor, *, with_lengths: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    acc = accum_dtype(r.dtype)
    b = r.shape[0]
    scores = torch.empty(b, dtype=acc, device=r.device)
    # Counted in int32 (a float accumulator makes the count 2.5x slower), converted once.
    lengths = torch.empty(b, dtype=torch.int32, device=r.device) if with_lengths else None
    rows = row_blocks(r).step
    # One scratch block for every masked product: a fresh temporary per block goes through malloc
    # each time, and glibc may trim and re-fault it on every block (measured: 2x slower overall).
    scratch = torch.empty((min(rows, b), r.shape[1]), dtype=r.dtype, device=r.device)
    bits = _SAME_WIDTH_INT.get(r.dtype)
    counts = lengths.split(rows) if lengths is not None else [None] * -(-b // rows)
    # Views split once (per-block slicing and calls cost ~10 % here); mask_rows inlined so the
    # count reads the 0/1 integers the scratch holds midway.
    for r_part, m_part, s_part, c_part in zip(r.split(rows), mask.split(rows), scores.split(rows), counts):
        values = scratch if r_part.shape[0] == scratch.shape[0] else scratch[: r_part.shape[0]]
        if bits is None:  # no same-width integer: torch.where, counted from the mask
            mask_rows(r_part, m_part, out=values)
            if c_part is not None:
                torch.sum(m_part, dim=-1, dtype=torch.int32, out=c_part)
        else:
            target = values.view(bits)
            target.copy_(m_part)
            if c_part is not None:
                torch.sum(target, dim=-1, dtype=torch.int32, out=c_part)
            target.mul_(r_part.view(bits))
        torch.sum(values, dim=-1, dtype=acc, out=s_part)
    return scores, (lengths.to(acc) if lengths is not None else None)


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


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def mask_rows(x: torch.Tensor, mask: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``out = torch.where(mask, x, 0)`` bit for bit (``x`` broadcastable to ``mask``), written into ``out``.

    Computed on ``x``'s bit patterns, viewed as integers of the same width: ``out`` first takes the
    0/1 mask, then is multiplied in place by the bits. Off the mask every element is ``+0.0``
    whatever ``x`` holds (a float product would write ``-0.0`` for negative values and NaN for
    inf/NaN), and on CPU the two contiguous integer passes run 1.3-2x faster than ``torch.where``,
    whose bool kernels convert element by element. Dtypes without a same-width integer fall back to
    ``torch.where``.
    """
    bits = _SAME_WIDTH_INT.get(out.dtype)
    if bits is None or x.dtype != out.dtype:
        return torch.where(mask, x, torch.zeros((), dtype=out.dtype, device=out.device), out=out)
    target = out.view(bits)
    target.copy_(mask)
    target.mul_(x.view(bits))
    return out


def broadcast_to_tokens(per_sample: torch.Tensor, response_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]``: ``per_sample [B]`` on every response token, 0 elsewhere, cast to ``dtype``.

    The same values as ``torch.where(response_mask, per_sample[:, None], 0)``, bit for bit (see
    :func:`mask_rows`), written in blocks of about 4 MiB into a fresh huge-page-backed output.
    """
    m = response_mask
    values = per_sample.to(dtype)[:, None]
    out = _alloc.empty(tuple(m.shape), dtype, m.device)
    blocks = row_blocks(out, _WRITE_BLOCK_BYTES)
    for start in blocks:
        stop = start + blocks.step
        mask_rows(values[start:stop], m[start:stop], out=out[start:stop])
    return out
