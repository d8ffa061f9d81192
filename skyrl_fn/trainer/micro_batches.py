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

Not switchable: nothing a caller sees changes beyond rounding, and an objective that depends on
the grouping is recognised by its promise, not by a flag.

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import torch

__all__ = ["length_order", "in_row_order"]


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
