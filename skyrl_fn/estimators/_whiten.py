"""Masked whitening over the valid tokens of a whole batch (REINFORCE++, GAE).

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import outcome_scores_and_lengths, row_blocks

__all__ = ["masked_whiten", "masked_whiten_rows", "whiten_stats"]


def _masked_centred_square_sum(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``sum((x - mean)^2 m)`` over row blocks, so the temporary stays small (see ``row_blocks``)."""
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    blocks = row_blocks(x)
    for start in blocks:
        stop = start + blocks.step
        total += torch.where(mask[start:stop], (x[start:stop] - mean).square_(), zero).sum()
    return total


def masked_whiten(x: torch.Tensor, response_mask: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """``[B, T]`` whitened ``x`` over the tokens where ``response_mask`` is 1, zero elsewhere.

    With ``n`` valid tokens, ``mean = sum(x m) / n`` and the unbiased ``var = sum((x - mean)^2 m) /
    (n - 1)``::

        y = (x - mean) / sqrt(var + eps) * m

    as SkyRL-Train's / verl's ``masked_whiten`` (then multiplied by the mask).

    Deviation: SkyRL-Train/verl raise for fewer than 2 valid tokens. Here the variance is defined
    as 0 then, so a single valid token gives ``y = 0`` (``x - mean = 0``) and an all-masked batch
    gives all zeros. Values of ``x`` at masked positions never reach the result (they may be NaN).

    Args:
        x: ``[B, T]`` floating; statistics are taken in ``x``'s dtype (callers pass the
            accumulation dtype).
        response_mask: ``[B, T]`` bool.
        eps: added to the variance.

    Returns:
        ``[B, T]`` in ``x``'s dtype (a new tensor).
    """
    mean, rstd = whiten_stats(x, response_mask, eps=eps)
    out = (x - mean).mul_(rstd)
    return torch.where(response_mask, out, torch.zeros((), dtype=x.dtype, device=x.device), out=out)


def whiten_stats(x: torch.Tensor, response_mask: torch.Tensor, *, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / sqrt(var + eps))`` of :func:`masked_whiten`, as 0-dim tensors in ``x``'s dtype.

    For callers that write the whitened values into a buffer of their own (e.g. transposed).
    """
    sums, lengths = outcome_scores_and_lengths(x, response_mask)  # one pass over x and the mask
    n = lengths.sum()
    mean = sums.sum() / n.clamp(min=1)
    var = _masked_centred_square_sum(x, response_mask, mean) / (n - 1).clamp(min=1)
    return mean, torch.rsqrt(var + eps)


def masked_whiten_rows(per_sample: torch.Tensor, lengths: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """``[B]``: :func:`masked_whiten` of a per-sample value broadcast to its valid tokens.

    When ``x_{i,t} = a_i`` on every valid token, the token statistics only need the per-sample
    values and the lengths ``len_i = sum_t m_{i,t}``: with ``n = sum_i len_i``,
    ``mean = sum_i len_i a_i / n`` and ``var = sum_i len_i (a_i - mean)^2 / (n - 1)`` (0 when
    ``n < 2``). This skips a ``[B, T]`` pass; broadcasting the result over the mask equals
    ``masked_whiten`` of the broadcast values up to rounding.

    Args:
        per_sample: ``[B]`` floating (the accumulation dtype).
        lengths: ``[B]`` number of valid tokens per sample, same dtype.
        eps: added to the variance.

    Returns:
        ``[B]`` whitened values (meaningful where ``len_i > 0``).
    """
    n = lengths.sum()
    mean = (lengths * per_sample).sum() / n.clamp(min=1)
    centred = per_sample - mean
    var = (lengths * centred.square()).sum() / (n - 1).clamp(min=1)
    return centred * torch.rsqrt(var + eps)
