"""Micro-batches cut from rows ordered by response length, so each forward pass's attended columns
(``skyrl_fn.trainer.forward.attended_columns``: the micro-batch's longest prompt and longest
response) fit its rows.

Cut in the sampled order, every micro-batch of a batch whose response lengths spread within each
prompt group holds a row near the token limit, and trimming a micro-batch to its longest response
saves almost nothing. Ordered by length, the micro-batches hold rows of similar lengths and the
padded work shrinks to about the tokens the batch holds (measured on ``bench/scale.py``'s model: about
half of the update's CPU time at ``W = 1`` on its first batch, whose response lengths spread over
the range; 6–11 % on its later batches, where most responses reach the token limit).

The order is a stable sort of the response lengths, **longest first** (ties keep their sampled
order, so a batch always gives the same micro-batches): the widest micro-batch runs first, so a
batch that does not fit the device fails at its first forward pass rather than after most of an
epoch's work. The padded work is the same in either
direction. Every caller maps its per-row results back with :func:`in_row_order`, so nothing a
caller sees depends on the order; the sums over micro-batches (the loss, the gradient, the
metrics) group the rows differently, so they change by float rounding only — for an objective
that promises ``microbatch_invariant`` (``skyrl_fn.algorithm.binding.Algorithm``): the policy
update keeps the row order for one that does not (``token_mean_legacy``, ``clip_cov``,
``kl_cov``), and the policy loss's own metrics (``ratio_mean``, the clip fractions: means per
micro-batch) follow the grouping.

Where the micro-batches are cut (:func:`micro_batch_bounds`; on the CPU, see
:func:`micro_batch_overhead`): at most ``micro_batch_size`` rows each, at the cut points that minimise the padded work — each micro-batch's rows times its
attended columns — plus a fixed cost per micro-batch, the per-call overhead of a forward and
backward pass (:func:`micro_batch_overhead`). Rows of one length are cut every
``micro_batch_size`` rows, as SkyRL cuts them; a cut that would put one long row with many short
ones makes a micro-batch of its own for the long rows. On ``bench/scale.py``'s batches that saves
4-10 % of the single worker's padded tokens while responses still spread, and at ``W = 2`` it
keeps each rank's padded work at about half the single worker's (cuts every 16 rows: 0.57-0.58x
of it on the batches where most but not all responses reach the token limit, as a rank's second
micro-batch then holds one of them and 15 short rows).

Not switchable: nothing a caller sees changes beyond rounding, and an objective that depends on
the grouping is recognised by its promise, not by a flag; it keeps SkyRL's cuts (every
``micro_batch_size`` rows, in row order).

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from skyrl_fn.trainer.sharding import transformer_blocks

__all__ = ["length_order", "in_row_order", "micro_batch_bounds", "micro_batch_overhead", "even_bounds"]


def length_order(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: the row indices of ``response_mask [B, T]`` by response length, longest
    first, ties in row order (a stable sort)."""
    lengths = response_mask.long().sum(-1)
    return torch.sort(lengths, descending=True, stable=True).indices


def in_row_order(ordered: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``ordered [B, ...]``, whose row ``i`` is row ``order[i]``, back in row order: ``out[order] = ordered``."""
    out = torch.empty_like(ordered)
    out[order] = ordered
    return out


def even_bounds(batch_size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of rows ``0..B`` cut every ``micro_batch_size`` rows (SkyRL's cuts)."""
    return [(s, min(s + micro_batch_size, batch_size)) for s in range(0, batch_size, micro_batch_size)]


#: The fixed cost of a forward and backward pass in token-columns is about this over the
#: parameters of one transformer block (about 3 ms per block of overhead at the ~40 GFLOP/s of
#: one CPU thread, 6 FLOP per parameter and token). Fitted on one CPU thread of this machine
#: (2026-12-02), one row against 16 and 64 rows of Llama models: hidden 64 x 2 blocks (the
#: embedded default, 12 columns): 187 measured, 305 by this; hidden 128 x 2: 72 and 76;
#: hidden 256 x 4 (``bench/scale.py``): 48 and 31.
OVERHEAD_PARAMETER_TOKENS = 2e7


def micro_batch_overhead(model: nn.Module) -> int | None:
    """The fixed cost of a micro-batch's forward and backward pass through ``model``, in
    token-columns: ``OVERHEAD_PARAMETER_TOKENS`` over the parameters of one transformer block
    (the first of ``skyrl_fn.trainer.sharding.transformer_blocks``; their global sizes when
    sharded); 0 for a model without one. Large on a small model, where the per-call overhead is
    many rows' work; a fraction of a row on a large one, where :func:`micro_batch_bounds`' floor
    of one row applies.

    None for a model on another device than the CPU: the fit is the CPU's, and a GPU's per-call
    overhead is many more tokens' work (kernel launches against fast matmuls) and its small
    micro-batches run below its throughput, which the linear cost does not model; there
    :func:`micro_batch_bounds` cuts every ``micro_batch_size`` rows until it is measured on one.
    """
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return None
    try:
        blocks = transformer_blocks(model)
    except ValueError:  # no nn.ModuleList
        return 0
    params = sum(math.prod(p.shape) for p in blocks[0].parameters()) if blocks else 0
    return int(OVERHEAD_PARAMETER_TOKENS / params) if params else 0


def micro_batch_bounds(attention_mask: torch.Tensor, response_len: int, micro_batch_size: int, *, overhead: int | None = 0) -> list[tuple[int, int]]:
    """``[(start, stop)]``: consecutive micro-batches of the rows of ``attention_mask [B, L]`` (in
    the order given; the last ``T = response_len`` columns are the responses, the prompts
    left-padded), at most ``micro_batch_size`` rows each, cut where the work is least.

    The work of a micro-batch is its rows times its attended columns (its longest prompt plus its
    longest response, as ``skyrl_fn.trainer.forward.attended_columns`` cuts them) plus a fixed
    cost: ``overhead`` token-columns (:func:`micro_batch_overhead`), at least one row of the
    batch's widest columns. The cuts minimise the sum over micro-batches (exactly: dynamic
    programming over the cut points, ``O(B * micro_batch_size)``). Ties go to the longer
    micro-batch, so rows of one length are cut every ``micro_batch_size`` rows. ``overhead``
    None: :func:`even_bounds` (every ``micro_batch_size`` rows).
    """
    b = attention_mask.shape[0]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size: expected >= 1, got {micro_batch_size}")
    if overhead is None:
        return even_bounds(b, micro_batch_size)
    am = attention_mask.bool().cpu()
    split = am.shape[1] - int(response_len)
    prompt = am[:, :split].sum(-1).numpy().astype(np.int64)
    response = am[:, split:].sum(-1).numpy().astype(np.int64)
    fixed = max(int(overhead), int(prompt.max(initial=0) + response.max(initial=0)))
    best = np.zeros(b + 1, dtype=np.int64)  # best[s]: the least work of rows s..B
    stop = np.zeros(b + 1, dtype=np.int64)
    for s in range(b - 1, -1, -1):
        e = min(b, s + micro_batch_size)
        width = np.maximum.accumulate(prompt[s:e]) + np.maximum.accumulate(response[s:e])
        work = np.arange(1, e - s + 1) * width + fixed + best[s + 1 : e + 1]
        k = len(work) - 1 - int(np.argmin(work[::-1]))  # the longest of the least
        best[s], stop[s] = work[k], s + k + 1
    bounds, s = [], 0
    while s < b:
        bounds.append((s, int(stop[s])))
        s = int(stop[s])
    return bounds
