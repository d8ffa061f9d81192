"""Masked row sums over ``[B, T]`` tensors, in cache-sized blocks.

Row sums over ``[B, T]`` run on CPU over blocks of rows of about 1 MiB: the masked temporary then
stays in cache and its memory is reused, where one full ``[B, T]`` temporary costs a fresh
allocation whose page faults dominate (5x slower at ``B = 65536, T = 256``). This is a loop over
fixed-size blocks of memory, not over samples or groups. Masking is an integer product of bit
patterns with the mask (:func:`mask_rows`). The records' finiteness check and the estimators'
outcome scores are the same sums (``skyrl_fn.core.records`` computes them once, see
:mod:`skyrl_fn.core._facts`).
"""

from __future__ import annotations

import torch

from skyrl_fn.core._facts import recall, remember

__all__ = [
    "accum_dtype",
    "row_blocks",
    "mask_rows",
    "masked_row_sums",
    "remembered_outcome_scores",
    "known_outcome_scores",
    "BLOCK_BYTES",
]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 stays float64, anything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


BLOCK_BYTES = 1 << 20


def row_blocks(x: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> range:
    """Start rows of the blocks a ``[B, T]`` pass over ``x`` runs on (one block off the CPU)."""
    b, t = x.shape
    if x.device.type != "cpu":
        return range(0, b, max(b, 1))
    return range(0, b, max(1, block_bytes // max(1, t * x.element_size())))


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


def masked_row_sums(r: torch.Tensor, mask: torch.Tensor, *, with_lengths: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B]`` sums of ``r [B, T]`` over the bool ``mask [B, T]`` in the accumulation dtype, and
    (``with_lengths``) the ``[B]`` mask counts in that dtype, else None.

    Off the mask, ``r`` may hold anything, NaN and inf included: each block is masked with
    :func:`mask_rows` (exactly ``torch.where``'s zeros), never with a float product, where
    ``NaN * 0`` would leak. Each row is summed by ``torch.sum(dim=-1)`` over its masked copy, so
    the result equals ``torch.where(mask, r, 0).sum(-1, dtype=accum_dtype(r.dtype))`` bit for bit.
    Each block's ops use torch's own intra-op threads.
    """
    acc = accum_dtype(r.dtype)
    b = r.shape[0]
    scores = torch.empty(b, dtype=acc, device=r.device)
    # Counted in int32 (a float accumulator makes the count 2.5x slower), converted once.
    lengths = torch.empty(b, dtype=torch.int32, device=r.device) if with_lengths else None
    rows = row_blocks(r).step
    bits = _SAME_WIDTH_INT.get(r.dtype)
    # One scratch block for every masked product: a fresh temporary per block goes through malloc
    # each time (measured: 2x slower overall).
    scratch = torch.empty((min(rows, b), r.shape[1]), dtype=r.dtype, device=r.device)
    counts = lengths.split(rows) if lengths is not None else [None] * -(-b // rows)
    # Views split once; mask_rows inlined so the count reads the 0/1 integers the scratch holds midway.
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


def remembered_outcome_scores(r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_row_sums(r, mask)[0]``, remembered (:mod:`skyrl_fn.core._facts`) for these very tensors,
    so that :func:`known_outcome_scores` hands them to the estimators without another pass."""
    scores = masked_row_sums(r, mask)[0]
    remember("outcome_scores", r, mask, (scores, scores._version))
    return scores


def known_outcome_scores(r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The sums :func:`remembered_outcome_scores` computed for this very ``r`` and ``mask``, if
    neither they nor the sums were written in place since; else None."""
    known = recall("outcome_scores", r, mask)
    if known is None or known[0]._version != known[1]:
        return None
    return known[0]
