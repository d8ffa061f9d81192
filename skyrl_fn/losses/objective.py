"""The policy objective: one pure function from a ``PolicyLossInput`` to the scalar to minimise.

Every piece is passed in as a callable with its hyperparameters already bound (the training
run binds them once, ``skyrl_fn.algorithm``); the normalisers are the *global* counts of the whole
optimiser step, so the micro-batch objectives sum exactly to the full-batch objective. The
learner's kernel is ``functools.partial(policy_objective, loss=..., aggregation=..., ...)`` and
``compile_loss`` / ``skyrl_fn.ops.kernels.compile_kernel`` wrap that partial.

Notation: ``B`` sequences, ``T`` response tokens, ``m`` the loss mask.
"""

from __future__ import annotations

from typing import Callable

import torch

from skyrl_fn.losses.kl import kl_token_loss
from skyrl_fn.losses.off_policy import OffPolicyCorrection
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput, ReducedLoss

__all__ = ["policy_objective", "SUMMED_METRICS"]

#: Metrics of :func:`policy_objective` that are globally normalised terms of the objective (a
#: sum over micro-batches gives the full batch's value); the loss's own metrics are per-call means.
SUMMED_METRICS = ("pg_loss", "kl_loss", "entropy")

Number = float | int | torch.Tensor


def policy_objective(
    batch: PolicyLossInput,
    *,
    loss: Callable[[PolicyLossInput], PolicyLossOutput],
    aggregation: Callable[..., torch.Tensor],
    global_tokens: Number | None = None,
    global_seqs: Number | None = None,
    max_seq_len: int | None = None,
    correction: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], OffPolicyCorrection] | None = None,
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    kl_loss_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> ReducedLoss:
    """The policy objective of one (micro-)batch::

        l, metrics = loss(batch)                                          l: [B, T]
        c = correction(old_log_probs, rollout_log_probs, m)               (if given)
        l = where(c.loss_mask, l * c.weights, 0);  m = c.loss_mask
        pg = agg(l, m)
        J = pg + kl_loss_coef * agg(KL(log_probs, ref_log_probs), m) - entropy_coef * agg(H, m)

    where ``agg(x, m) = aggregation(x, m, global_tokens=, global_seqs=, max_seq_len=)``. The KL
    estimator sees its inputs masked (``kl_token_loss``), so padding never reaches it.

    Args:
        batch: ``PolicyLossInput`` (``log_probs`` carries the gradient).
        loss: the policy loss, hyperparameters bound (``table.policy_loss(name)`` or a partial).
        aggregation: ``fn(token_loss [B, T], mask [B, T], *, global_tokens, global_seqs,
            max_seq_len) -> []``.
        global_tokens, global_seqs, max_seq_len: the normalisers of the whole optimiser step
            (``skyrl_fn.losses.aggregation``); None: those of ``batch`` alone.
        correction: ``fn(old_log_probs, rollout_log_probs, loss_mask) -> OffPolicyCorrection``
            (e.g. a partial of ``off_policy_correction``), or None.
        kl_estimator: ``fn(log_probs, ref_log_probs) -> [B, T]``; used when ``kl_loss_coef != 0``.
        kl_loss_coef: weight of the KL-to-reference term (0 disables it).
        entropy: ``[B, T]`` token entropy of the policy (from the forward pass), or None.
        entropy_coef: weight of the entropy bonus (0 disables it).

    Returns:
        ``ReducedLoss``: ``loss []`` (ready for ``backward()``); metrics: the loss's and the
        correction's metrics, ``pg_loss``, and ``kl_loss`` / ``entropy`` when those terms are on
        (all detached).

    Raises:
        TypeError: ``batch`` is not a ``PolicyLossInput``, the loss returns something else than a
            ``PolicyLossOutput``, or the correction something else than an ``OffPolicyCorrection``.
        ValueError: a KL term without ``ref_log_probs`` or ``kl_estimator``; an entropy term
            without ``entropy``; a token loss or correction of another shape than ``[B, T]``.
    """
    if not isinstance(batch, PolicyLossInput):
        raise TypeError(f"batch: expected a PolicyLossInput, got {type(batch).__name__}")
    out = loss(batch)
    if not isinstance(out, PolicyLossOutput):
        raise TypeError(f"policy loss {loss!r}: expected it to return a PolicyLossOutput, got {type(out).__name__}")
    shape = tuple(batch.log_probs.shape)
    if tuple(out.token_loss.shape) != shape:
        raise ValueError(f"policy loss: token_loss expected shape [B, T] = {shape}, got {tuple(out.token_loss.shape)}")
    token_loss, mask = out.token_loss, batch.loss_mask
    metrics = dict(out.metrics)
    if correction is not None:
        c = correction(batch.old_log_probs, batch.rollout_log_probs, mask)
        if not isinstance(c, OffPolicyCorrection):
            raise TypeError(f"correction: expected it to return an OffPolicyCorrection, got {type(c).__name__}")
        for field in ("weights", "loss_mask"):
            got = tuple(getattr(c, field).shape)
            if got != shape:
                raise ValueError(f"correction.{field}: expected shape [B, T] = {shape}, got {got}")
        mask = c.loss_mask
        token_loss = torch.where(mask, token_loss * c.weights.to(token_loss.dtype), torch.zeros_like(token_loss))
        metrics.update(c.metrics)
    norms = dict(global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_seq_len)
    pg = aggregation(token_loss, mask, **norms)
    metrics["pg_loss"] = pg.detach()
    total = pg
    if kl_loss_coef != 0:
        if batch.ref_log_probs is None:
            raise ValueError("ref_log_probs: expected a [B, T] tensor when kl_loss_coef != 0, got None")
        if kl_estimator is None:
            raise ValueError("kl_estimator: expected a KL estimator when kl_loss_coef != 0, got None")
        kl = aggregation(kl_token_loss(batch.log_probs, batch.ref_log_probs, mask, estimator=kl_estimator), mask, **norms)
        metrics["kl_loss"] = kl.detach()
        total = total + kl_loss_coef * kl
    if entropy_coef != 0:
        if entropy is None:
            raise ValueError("entropy: expected the [B, T] token entropy when entropy_coef != 0, got None")
        ent = aggregation(torch.where(mask, entropy, torch.zeros_like(entropy)), mask, **norms)
        metrics["entropy"] = ent.detach()
        total = total - entropy_coef * ent
    return ReducedLoss(loss=total, metrics=metrics)
