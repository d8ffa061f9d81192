"""Masked whitening over the valid tokens of a whole batch (REINFORCE++, GAE), and the
``whiten()`` advantage transform that ``gae`` and ``reinforce++`` are chained with.

``whiten`` lives here, beside the statistics it runs, so the estimators can name their chains
(``gae = chain(gae_raw, whiten())``) without importing ``skyrl_fn.transforms`` (which builds on
the estimators' helpers); ``skyrl_fn.transforms`` re-exports it.

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import functools

import attrs
import torch

from skyrl_fn.core._checks import check_number
from skyrl_fn.core.compose import AdvantageTransform
from skyrl_fn.estimators._groups import accum_dtype, outcome_scores_and_lengths, row_blocks
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput

__all__ = ["masked_whiten", "masked_whiten_rows", "whiten_stats", "whiten", "with_advantages"]


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
            accumulation dtype). A transposed view of a ``[T, B]`` buffer (time-major, as GAE
            computes) is read in that memory order (see :func:`whiten_stats`).
        response_mask: ``[B, T]`` bool.
        eps: added to the variance.

    Returns:
        ``[B, T]`` contiguous, in ``x``'s dtype (a new tensor).
    """
    mean, rstd = whiten_stats(x, response_mask, eps=eps)
    # A transposed x: one transposing copy, then contiguous element-wise passes (element-wise
    # ops reading a transposed view are several times slower than copy_'s transpose).
    out = x - mean if x.is_contiguous() else x.contiguous().sub_(mean)
    out.mul_(rstd)
    return torch.where(response_mask, out, torch.zeros((), dtype=x.dtype, device=x.device), out=out)


def whiten_stats(x: torch.Tensor, response_mask: torch.Tensor, *, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / sqrt(var + eps))`` of :func:`masked_whiten`, as 0-dim tensors in ``x``'s dtype.

    For callers that write the whitened values into a buffer of their own (e.g. transposed).
    The statistics are full reductions, so they are taken in ``x``'s memory order: a ``[B, T]``
    transposed view of a contiguous ``[T, B]`` buffer is summed time-major (as GAE's recursion
    leaves it), which is both the fast order and the one the fused GAE always used.
    """
    if x.dim() == 2 and not x.is_contiguous() and x.T.is_contiguous():
        x, response_mask = x.T, response_mask.T.contiguous()
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


def with_advantages(out: AdvantageOutput, batch: AdvantageInput, adv: torch.Tensor) -> AdvantageOutput:
    """``out`` with ``advantages = adv * m`` in ``out``'s dtype (``returns`` unchanged)."""
    adv = torch.where(batch.response_mask, adv.to(out.advantages.dtype), 0)
    return attrs.evolve(out, advantages=adv)


def _whiten_advantages(out: AdvantageOutput, batch: AdvantageInput, *, eps: float) -> AdvantageOutput:
    acc = accum_dtype(out.advantages.dtype)
    return with_advantages(out, batch, masked_whiten(out.advantages.to(acc), batch.response_mask, eps=eps))


def whiten(*, eps: float = 1e-8) -> AdvantageTransform:
    """Whiten the advantages over the valid tokens of the whole batch::

        n    = sum_{i,t} m_{i,t},   mean = sum A m / n,   var = sum (A - mean)^2 m / (n - 1)
        A'   = (A - mean) / sqrt(var + eps) * m

    as :func:`masked_whiten` (SkyRL-Train's / verl's ``masked_whiten``): unbiased variance; fewer
    than 2 valid tokens give ``A' = 0``. ``returns`` pass through unchanged. Statistics are taken
    in float32 (float64 for float64 advantages). The built-ins ``gae`` and ``reinforce++`` are
    ``chain(gae_raw, whiten())`` and ``chain(reinforce_plus_plus_raw, whiten())``.

    Args:
        eps: ``> 0``, added to the variance.

    Returns:
        An :class:`~skyrl_fn.core.compose.AdvantageTransform` (picklable) for :func:`~skyrl_fn.core.compose.chain`.

    Raises:
        TypeError / ValueError: ``eps`` is not a finite number ``> 0``.
    """
    eps = check_number("eps", eps, low=0.0, low_open=True)
    return AdvantageTransform(functools.partial(_whiten_advantages, eps=eps), name=f"whiten(eps={eps!r})")
