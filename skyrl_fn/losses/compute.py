"""One call from a ``PolicyLossInput`` to a scalar loss ready for ``backward()``.

``compute_policy_loss`` = look up the loss -> per-token loss -> (optional) off-policy correction ->
aggregation with the *global* normalisers -> (optional) KL loss term. The trainer can equally do the
two steps itself: ``table.policy_loss(name)(batch, **hyper)`` then
``table.get("aggregation", mode)(out.token_loss, batch.loss_mask, global_tokens=..., ...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from skyrl_fn.losses.aggregation import aggregation_name
from skyrl_fn.losses.compile import compile_loss
from skyrl_fn.losses.kl import kl_token_loss
from skyrl_fn.losses.off_policy import OffPolicyCorrection
from skyrl_fn.records import PolicyLossInput, PolicyLossOutput, ReducedLoss

__all__ = ["aggregate", "compute_policy_loss"]


def _table(table):
    if table is None:
        from skyrl_fn.table import DEFAULT_TABLE

        return DEFAULT_TABLE
    return table


def aggregate(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str = "token_mean",
    *,
    table=None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Reduce ``token_loss [B, T]`` to a scalar with the aggregation registered as ``mode``.

    ``mode`` also accepts verl's hyphenated names and SkyRL's ``sequence_mean``. See
    ``skyrl_fn.losses.aggregation`` for the formulas and the global normalisers.

    Raises:
        UnknownNameError: unknown mode (lists the available ones).
    """
    fn = _table(table).get("aggregation", aggregation_name(mode))
    return fn(token_loss, loss_mask, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_seq_len)


def compute_policy_loss(
    table,
    name: str,
    batch: PolicyLossInput,
    *,
    aggregation: str = "token_mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    max_seq_len: int | None = None,
    correction: OffPolicyCorrection | None = None,
    kl_loss_coef: float = 0.0,
    kl_estimator: str = "k3",
    compile: bool | str = False,
    **hyper: Any,
) -> ReducedLoss:
    """Policy loss ``name`` on ``batch``, aggregated to a scalar::

        l = table.policy_loss(name)(batch, **hyper).token_loss               [B, T]
        l = l * correction.weights;  mask = correction.loss_mask             (if correction)
        loss = agg(l, mask) + kl_loss_coef * agg(KL_est(log_probs, ref_log_probs), mask)

    For micro-batching pass ``global_tokens`` / ``global_seqs`` (totals over all micro-batches
    and data-parallel ranks of the optimiser step, counted on the *final* mask) and a fixed
    ``max_seq_len``; the micro-batch losses then sum exactly to the full-batch loss.

    Args:
        table: an ``AlgorithmTable`` (None: ``DEFAULT_TABLE``).
        name: registered policy loss name.
        batch: the ``PolicyLossInput``.
        aggregation: registered aggregation name (SkyRL's ``sequence_mean`` and verl's hyphenated
            names accepted).
        global_tokens, global_seqs, max_seq_len: passed to the aggregation.
        correction: an ``OffPolicyCorrection`` from ``off_policy_correction``.
        kl_loss_coef: weight of the KL-to-reference loss term (SkyRL ``use_kl_loss`` /
            ``kl_loss_coef``); 0 disables it. Needs ``batch.ref_log_probs``.
        kl_estimator: registered ``kl_estimator`` name for that term (SkyRL ``kl_estimator_type``).
        compile: run the loss through ``compile_loss`` (torch.compile, dynamic shapes, eager
            fallback with one warning); a string names the torch.compile backend (default inductor).
        **hyper: the loss's hyperparameters; unknown names raise ValueError.

    Returns:
        ``ReducedLoss``: ``loss []``; metrics = the loss's metrics (after the correction's),
        ``policy_loss`` and, with a KL term, ``kl_loss``.

    Raises:
        UnknownNameError: unknown loss, aggregation or KL estimator name.
        ValueError: unknown hyperparameter; ``kl_loss_coef != 0`` without ``ref_log_probs``;
            a correction of the wrong shape.
        TypeError: ``batch`` is not a ``PolicyLossInput``, or the loss returns something else than
            a ``PolicyLossOutput``.
    """
    table = _table(table)
    if not isinstance(batch, PolicyLossInput):
        raise TypeError(f"batch: expected a PolicyLossInput, got {type(batch).__name__}")
    fn = table.policy_loss(name)
    agg = table.get("aggregation", aggregation_name(aggregation))
    table.check_hyperparameters("policy_loss", name, hyper)
    if isinstance(kl_loss_coef, bool) or not isinstance(kl_loss_coef, (int, float)):
        raise TypeError(f"kl_loss_coef: expected a number, got {type(kl_loss_coef).__name__}")
    if kl_loss_coef != 0:
        if batch.ref_log_probs is None:
            raise ValueError("ref_log_probs: expected a [B, T] tensor when kl_loss_coef != 0, got None")
        table.get("kl_estimator", kl_estimator)  # unknown names fail before any compute
    if compile:
        fn = compile_loss(fn) if compile is True else compile_loss(fn, backend=str(compile))
    out = fn(batch, **hyper)
    if not isinstance(out, PolicyLossOutput):
        raise TypeError(f"policy loss {name!r}: expected it to return a PolicyLossOutput, got {type(out).__name__}")
    shape = tuple(batch.log_probs.shape)
    if tuple(out.token_loss.shape) != shape:
        raise ValueError(f"policy loss {name!r}: token_loss expected shape [B, T] = {shape}, got {tuple(out.token_loss.shape)}")
    token_loss, mask = out.token_loss, batch.loss_mask
    metrics = dict(out.metrics)
    if correction is not None:
        if not isinstance(correction, OffPolicyCorrection):
            raise TypeError(f"correction: expected an OffPolicyCorrection, got {type(correction).__name__}")
        for field in ("weights", "loss_mask"):
            got = tuple(getattr(correction, field).shape)
            if got != shape:
                raise ValueError(f"correction.{field}: expected shape [B, T] = {shape}, got {got}")
        mask = correction.loss_mask
        token_loss = torch.where(mask, token_loss * correction.weights.to(token_loss.dtype), torch.zeros_like(token_loss))
        metrics.update(correction.metrics)
    norms = dict(global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_seq_len)
    pg = agg(token_loss, mask, **norms)
    metrics["policy_loss"] = pg.detach()
    loss = pg
    if kl_loss_coef != 0:
        kl = kl_token_loss(batch.log_probs, batch.ref_log_probs, mask, kl_estimator=kl_estimator, table=table)
        kl_value = agg(kl, mask, **norms)
        metrics["kl_loss"] = kl_value.detach()
        loss = loss + kl_loss_coef * kl_value
    return ReducedLoss(loss=loss, metrics=metrics)
