"""Loss aggregation: per-token loss ``[B, T]`` -> scalar, exact under micro-batching.

Notation: ``l`` the per-token loss, ``m`` the bool loss mask, ``n_i = sum_t m_it`` the valid
tokens of row ``i``. Every mode is a *sum over rows divided by a constant*::

    token_mean               sum_it m l / N_tok
    token_sum                sum_it m l
    seq_mean_token_sum       sum_i (sum_t m l) / N_seq
    seq_mean_token_mean      sum_i (sum_t m l / max(n_i, 1)) / N_seq
    seq_mean_token_sum_norm  sum_i (sum_t m l) / (N_seq * max_seq_len)

``N_tok = global_tokens`` and ``N_seq = global_seqs`` are the totals over **all micro-batches and
data-parallel ranks** of one optimiser step. Pass them and the micro-batch losses add up exactly to
the full-batch loss, so the accumulated gradient does not depend on the micro-batch size, the
number of micro-batches or the data-parallel size (sum the per-rank gradients; do not average
them). Left at None they default to the counts of the tensor passed in (``N_tok = sum m``,
``N_seq = B``), which is right only for a single, whole batch.

``N_seq`` counts every row, also rows whose mask is all zero, as SkyRL-Train's ``.mean()`` over the
batch (verl counts only rows with a valid token: pass ``global_seqs`` for that). ``max_seq_len``
defaults to the ``T`` of the tensor passed in (verl's ``loss_scale_factor`` default); under
micro-batching with per-micro-batch padding, pass the configured constant explicitly.
"""

from __future__ import annotations

import difflib
from typing import Mapping

import torch

from skyrl_fn.core._checks import check_floating, check_shape, check_tensor

__all__ = [
    "token_mean",
    "token_sum",
    "seq_mean_token_sum",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "AGGREGATIONS",
    "SKYRL_REDUCTIONS",
    "aggregation_name",
    "aggregate",
]

Number = float | int | torch.Tensor


def _inputs(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_floating("token_loss", token_loss)
    if token_loss.dim() != 2:
        raise ValueError(f"token_loss: expected shape [B, T], got {tuple(token_loss.shape)}")
    check_tensor("loss_mask", loss_mask)
    check_shape("loss_mask", loss_mask, tuple(token_loss.shape), "[B, T] (as token_loss)")
    if loss_mask.dtype != torch.bool:
        if loss_mask.dtype.is_complex:
            raise TypeError(f"loss_mask: expected a bool or 0/1 mask, got {loss_mask.dtype}")
        loss_mask = loss_mask != 0
    return token_loss, loss_mask


def _total(name: str, value: Number | None, default: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The normaliser: ``value`` if given (number or 0-dim tensor), else ``default``."""
    if value is None:
        return default.to(dtype)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name}: expected a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0 (a total over all micro-batches and ranks), got {value!r}")
    return torch.tensor(float(value), dtype=dtype, device=default.device)


def _row_sums(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``sum_t m l`` (``where`` keeps NaN/inf in padding out)."""
    zero = torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
    return torch.where(loss_mask, token_loss, zero).sum(dim=-1)


def token_mean(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``sum_it m_it l_it / global_tokens``; default ``global_tokens = max(sum m, 1)``.

    Every valid token weighs the same (DAPO's token-level loss, SkyRL's ``token_mean``).
    ``global_seqs`` and ``max_seq_len`` are accepted and ignored (one call convention for all modes).

    Args:
        token_loss: ``[B, T]`` floating.
        loss_mask: ``[B, T]`` bool (0/1 numeric accepted).
        global_tokens: valid tokens over all micro-batches and ranks of the step.

    Returns:
        ``[]`` scalar.
    """
    token_loss, loss_mask = _inputs(token_loss, loss_mask)
    n = _total("global_tokens", global_tokens, loss_mask.sum().clamp(min=1), token_loss.dtype)
    return _row_sums(token_loss, loss_mask).sum() / n


def token_sum(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``sum_it m_it l_it`` (SkyRL's ``cross_entropy`` / ``importance_sampling`` reduction, Tinker's
    sum). No normaliser, so micro-batch sums are exact by construction. [B, T] -> []."""
    token_loss, loss_mask = _inputs(token_loss, loss_mask)
    return _row_sums(token_loss, loss_mask).sum()


def seq_mean_token_sum(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``sum_i (sum_t m_it l_it) / global_seqs``; default ``global_seqs = B``. [B, T] -> []."""
    token_loss, loss_mask = _inputs(token_loss, loss_mask)
    b = torch.tensor(token_loss.shape[0], device=token_loss.device)
    return _row_sums(token_loss, loss_mask).sum() / _total("global_seqs", global_seqs, b, token_loss.dtype)


def seq_mean_token_mean(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``sum_i (sum_t m_it l_it / max(n_i, 1)) / global_seqs``; default ``global_seqs = B``.

    Every sequence weighs the same (SkyRL's ``sequence_mean``; GSPO / SAPO / GMPO's reduction).
    A row with no valid token contributes 0 but is still counted in the default ``global_seqs``.
    [B, T] -> [].
    """
    token_loss, loss_mask = _inputs(token_loss, loss_mask)
    n_i = loss_mask.sum(dim=-1).clamp(min=1).to(token_loss.dtype)
    b = torch.tensor(token_loss.shape[0], device=token_loss.device)
    return (_row_sums(token_loss, loss_mask) / n_i).sum() / _total("global_seqs", global_seqs, b, token_loss.dtype)


def seq_mean_token_sum_norm(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """``sum_i (sum_t m_it l_it) / (global_seqs * max_seq_len)`` (Dr. GRPO, arXiv:2503.20783).

    A constant normaliser removes the length bias of ``seq_mean_token_mean``. Defaults:
    ``global_seqs = B``, ``max_seq_len = T`` of ``token_loss`` (set it to the configured maximum
    response length explicitly when micro-batches are padded to different ``T``). [B, T] -> [].

    Raises:
        ValueError: ``max_seq_len`` not a positive int.
    """
    token_loss, loss_mask = _inputs(token_loss, loss_mask)
    if max_seq_len is None:
        max_seq_len = token_loss.shape[1]
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len: expected an int >= 1 (the normalising length), got {max_seq_len!r}")
    b = torch.tensor(token_loss.shape[0], device=token_loss.device)
    n = _total("global_seqs", global_seqs, b, token_loss.dtype)
    return _row_sums(token_loss, loss_mask).sum() / (n * max_seq_len)


#: Registered name -> aggregation function.
AGGREGATIONS: Mapping[str, object] = {
    "token_mean": token_mean,
    "token_sum": token_sum,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}

#: SkyRL-Train's ``loss_reduction`` values -> our aggregation names.
SKYRL_REDUCTIONS: Mapping[str, str] = {
    "token_mean": "token_mean",
    "sequence_mean": "seq_mean_token_mean",
    "seq_mean_token_sum_norm": "seq_mean_token_sum_norm",
}


def aggregation_name(mode: str) -> str:
    """Normalise an aggregation name: verl's hyphens (``token-mean``) and SkyRL's ``sequence_mean``
    map to the registered names; anything else is returned unchanged (the table reports unknown
    names with the closest match)."""
    if not isinstance(mode, str):
        raise TypeError(f"aggregation: expected a mode name (str), got {type(mode).__name__}")
    name = mode.replace("-", "_")
    return SKYRL_REDUCTIONS.get(name, name)


def aggregate(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str = "token_mean",
    *,
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Reduce ``token_loss [B, T]`` to ``[]`` with the built-in aggregation named ``mode``.

    ``mode`` is a name of :data:`AGGREGATIONS`, verl's hyphenated form or SkyRL's
    ``sequence_mean``. A registered aggregation of your own is called directly (or bound from a
    table by ``skyrl_fn.algorithm``); this helper knows only the built-ins.

    Raises:
        ValueError: unknown mode (lists the built-ins and the closest one).
    """
    name = aggregation_name(mode)
    fn = AGGREGATIONS.get(name)
    if fn is None:
        guess = difflib.get_close_matches(name, list(AGGREGATIONS), n=1, cutoff=0.5)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ValueError(f"unknown aggregation {mode!r}{hint} Available: {sorted(AGGREGATIONS)}")
    return fn(token_loss, loss_mask, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_seq_len)
