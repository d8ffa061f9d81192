"""SkyRL's small functions of ``ppo_utils`` / ``torch_utils``: KL estimate, masked mean, loss
reduction (0.3.0: a masked sum over pre-scaled advantages), KL controllers.

Notation: ``B`` sequences, ``T`` response tokens, ``m`` the loss mask (float; soft values weigh).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from skyrl_fn.compat._calls import caller_names, config_value
from skyrl_fn.losses import kl as native_kl
from skyrl_fn.losses.reduction_weights import REDUCTIONS, reduction_weights

__all__ = [
    "masked_mean",
    "compute_approx_kl",
    "reduce_loss",
    "apply_loss_reduction_to_advantages_minibatch",
    "FixedKLController",
    "AdaptiveKLController",
    "get_kl_controller",
]

#: SkyRL's ``kl_estimator_type`` -> the native estimator (``skyrl_fn.losses.kl``).
KL_ESTIMATORS = {"k1": native_kl.k1, "abs": native_kl.kl_abs, "k2": native_kl.k2, "k3": native_kl.k3}


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """``sum(x m) / max(sum(m), 1)`` over ``dim`` (all dims if None); the plain mean without a mask.

    SkyRL's ``torch_utils.masked_mean``: ``m`` may be soft (float weights).
    """
    if mask is None:
        return tensor.mean() if dim is None else tensor.mean(dim=dim)
    if dim is None:
        return (tensor * mask).sum() / mask.sum().clamp(min=1.0)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    kl_estimator_type: str = "k3",
) -> torch.Tensor:
    """``[B, T]`` per-token KL estimate of ``log_probs`` against ``log_probs_base`` (Schulman's
    k1 / abs / k2 / k3, http://joschu.net/blog/kl-approx.html; native ``skyrl_fn.losses.kl``).

    With ``loss_mask``: ``kl * m`` where ``m != 0`` and exactly 0 elsewhere, so NaN/inf inputs at
    masked positions never leak (SkyRL 0.3.0's masking).

    Raises:
        ValueError: unknown ``kl_estimator_type`` (SkyRL's "Invalid KL estimator type" wording).
    """
    fn = KL_ESTIMATORS.get(kl_estimator_type)
    if fn is None:
        raise ValueError(f"Invalid KL estimator type: {kl_estimator_type!r}; expected one of {sorted(KL_ESTIMATORS)}")
    with caller_names({"ref_log_probs": "log_probs_base"}):
        kld = fn(log_probs, log_probs_base)
    if loss_mask is not None:
        kld = torch.where(loss_mask.bool(), kld * loss_mask, torch.zeros((), dtype=kld.dtype, device=kld.device))
    return kld


def reduce_loss(loss: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """SkyRL 0.3.0's reduction inside a policy loss: the masked sum ``sum(l m)`` (``sum(l)`` without
    a mask). The mean is in the advantages (``apply_loss_reduction_to_advantages_minibatch``)."""
    return (loss * loss_mask).sum() if loss_mask is not None else loss.sum()


def apply_loss_reduction_to_advantages_minibatch(
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_reduction: str,
    micro_batch_size: int,
    max_seq_len: int,
    prompt_boundaries: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``[B, T]`` advantages scaled so that ``reduce_loss`` (a masked sum) gives ``loss_reduction``.

    ``advantages * w`` with ``w`` from the native ``skyrl_fn.losses.reduction_weights`` (formulas
    there): ``token_mean``, ``token_mean_legacy`` (per micro-batch of ``micro_batch_size`` rows,
    then averaged), ``sequence_mean``, ``seq_mean_token_sum_norm`` (``max_seq_len``),
    ``prompt_mean`` (``prompt_boundaries``: ``(start, end)`` row slices, one per prompt; rows in no
    slice get 0). As SkyRL 0.3.0 (which divides by ``1 / w``; equal up to one rounding).

    Raises:
        ValueError: unknown ``loss_reduction`` ("Invalid loss reduction type"), ``prompt_mean``
            without ``prompt_boundaries``, or a boundary outside ``[0, B]``.
    """
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"Invalid loss reduction type: {loss_reduction!r}; expected one of {list(REDUCTIONS)}")
    group_ids = None
    if loss_reduction == "prompt_mean":
        if prompt_boundaries is None:
            raise ValueError("`prompt_mean` loss reduction requires `prompt_boundaries`, got None")
        b = advantages.shape[0]
        group_ids = torch.full((b,), -1, dtype=torch.long)
        for p, (start, end) in enumerate(prompt_boundaries):
            if not 0 <= start <= end <= b:
                raise ValueError(f"prompt_boundaries[{p}]: expected 0 <= start <= end <= {b}, got ({start}, {end})")
            group_ids[start:end] = p
    w = reduction_weights(
        loss_mask,
        reduction=loss_reduction,
        max_seq_len=max_seq_len,
        micro_batch_size=micro_batch_size,
        group_ids=group_ids,
    )
    if loss_reduction == "prompt_mean" and prompt_boundaries:
        # SkyRL averages over len(prompt_boundaries) prompts, also an empty slice; the native weights
        # average over the prompts that own rows.
        owning = int(torch.unique(group_ids[group_ids >= 0]).numel())
        w = w * (owning / len(prompt_boundaries))
    return advantages * w.to(advantages.dtype)


class FixedKLController:
    """SkyRL's mutable fixed KL controller over the native frozen ``skyrl_fn.losses.kl.KLController``."""

    def __init__(self, kl_coef: float) -> None:
        self._ctrl = native_kl.KLController(coef=kl_coef, kind="fixed")

    @property
    def value(self) -> float:
        return self._ctrl.coef

    def update(self, current: float, n_steps: int) -> None:
        """No change (a fixed coefficient)."""
        self._ctrl = self._ctrl.update(current, n_steps)


class AdaptiveKLController:
    """SkyRL's mutable adaptive KL controller (Ziegler et al. 2019, arXiv:1909.08593)::

        value *= 1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon

    over the native frozen ``skyrl_fn.losses.kl.KLController(kind="adaptive")``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self._ctrl = native_kl.KLController(coef=init_kl_coef, kind="adaptive", target=target, horizon=horizon)

    @property
    def value(self) -> float:
        return self._ctrl.coef

    @property
    def target(self) -> float:
        return self._ctrl.target

    @property
    def horizon(self) -> int:
        return self._ctrl.horizon

    def update(self, current: float, n_steps: int) -> None:
        self._ctrl = self._ctrl.update(current, n_steps)


def get_kl_controller(algorithm_cfg: Any) -> FixedKLController | AdaptiveKLController:
    """The controller ``algorithm_cfg.kl_ctrl.type`` names, starting at ``kl_loss_coef``.

    Reads ``kl_ctrl.type``, ``kl_loss_coef``, ``kl_ctrl.kl_target``, ``kl_ctrl.horizon``.

    Raises:
        ValueError: ``kl_ctrl.type`` not ``fixed`` / ``adaptive`` ("Invalid KL controller type"), or
            ``kl_ctrl.horizon <= 0`` for adaptive.
    """
    kind = config_value(algorithm_cfg, ("kl_ctrl", "type"))
    coef = config_value(algorithm_cfg, ("kl_loss_coef",))
    coef = 0.001 if coef is None else coef
    if kind == "fixed":
        return FixedKLController(kl_coef=coef)
    if kind == "adaptive":
        horizon = config_value(algorithm_cfg, ("kl_ctrl", "horizon"))
        target = config_value(algorithm_cfg, ("kl_ctrl", "kl_target"))
        horizon = 10000 if horizon is None else horizon
        if horizon <= 0:
            raise ValueError(f"kl_ctrl.horizon: horizon must be larger than 0. Got {horizon}")
        return AdaptiveKLController(init_kl_coef=coef, target=0.1 if target is None else target, horizon=horizon)
    raise ValueError(f"kl_ctrl.type: Invalid KL controller type: {kind!r}; expected 'fixed' or 'adaptive'")
