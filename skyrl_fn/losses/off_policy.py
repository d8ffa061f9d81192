"""Off-policy corrections between the rollout engine and the trainer.

The rollout engine (vLLM, ...) samples with log-probs ``q`` that differ from the trainer's ``p``
for the same weights (kernels, precision, staleness). Notation: ``B`` sequences, ``T`` tokens,
``d_t = p_t - q_t`` (``p = old_log_probs`` from the trainer, ``q = rollout_log_probs``),
``rho_t = exp(clamp(d_t, -20, 20))``, ``m`` the loss mask. References: Yao et al., "Your efficient
RL framework secretly brings you off-policy RL training" (https://fengyao.notion.site/off-policy-rl),
IcePop (Ring-1T, arXiv:2510.18855), SkyRL-Train's ``off_policy_correction`` config.

Pieces (pure, detached, no device sync):

- ``tis_weights``: truncated importance weights, token (``min(rho_t, C)``) or sequence
  (``min(prod_t rho_t, C)`` on every token of the row).
- ``icepop_mask``: drop tokens whose ``rho_t`` leaves ``[low, high]``.
- ``sequence_mask``: drop whole sequences by the geometric-mean / product ratio, or by any
  outlier token.
- ``mismatch_metrics``: how far apart the two policies are.
- ``off_policy_correction``: all of them in SkyRL's order, returning an ``OffPolicyCorrection``
  (weights + new loss mask + metrics) that ``policy_objective(correction=...)`` applies (bind
  the options with ``functools.partial``).
"""

from __future__ import annotations

from typing import Mapping

import attrs
import torch

from skyrl_fn.core._checks import as_mask, check_floating, check_shape
from skyrl_fn.core._frozen import FrozenDict
from skyrl_fn.losses._common import masked_mean, masked_sum, safe_ratio

__all__ = [
    "OffPolicyCorrection",
    "tis_weights",
    "icepop_mask",
    "sequence_keep",
    "sequence_mask",
    "mismatch_metrics",
    "off_policy_correction",
]


def _inputs(old_log_probs, rollout_log_probs, loss_mask):
    check_floating("old_log_probs", old_log_probs)
    if old_log_probs.dim() != 2:
        raise ValueError(f"old_log_probs: expected shape [B, T], got {tuple(old_log_probs.shape)}")
    shape = tuple(old_log_probs.shape)
    if rollout_log_probs is None:
        raise ValueError("rollout_log_probs: expected a [B, T] tensor for an off-policy correction, got None")
    check_floating("rollout_log_probs", rollout_log_probs)
    check_shape("rollout_log_probs", rollout_log_probs, shape, "[B, T] (as old_log_probs)")
    m = as_mask("loss_mask", loss_mask, shape)
    zero = torch.zeros((), dtype=old_log_probs.dtype, device=old_log_probs.device)
    d = torch.where(m, old_log_probs.detach() - rollout_log_probs.detach().to(old_log_probs.dtype), zero)
    return d, m


def _bounds(name_low: str, low, name_high: str, high) -> None:
    for name, v in ((name_low, low), (name_high, high)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise ValueError(f"{name}: expected a number >= 0 or None, got {v!r}")
    if low is not None and high is not None and not low <= high:
        raise ValueError(f"{name_low}, {name_high}: expected {name_low} <= {name_high}, got {low!r}, {high!r}")


@torch.no_grad()
def tis_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    level: str = "token",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling weights (TIS)::

        token:     w_t = min(rho_t, cap)
        sequence:  w_t = min(exp(clamp(sum_s m_s d_s, -20, 20)), cap)     (same on every token of the row)

    Defaults: ``cap = 2.0`` (SkyRL's ``token_tis_ratio_clip_high``; its sequence default is 5.0,
    ``sequence_tis_ratio_clip_high``). Multiply the per-token loss by ``w``.

    Returns:
        ``([B, T] weights, 0 off the mask, detached; metrics)``: ``tis_capped_frac`` (tokens or
        sequences at the cap).
    """
    d, m = _inputs(old_log_probs, rollout_log_probs, loss_mask)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"cap: expected a number > 0, got {cap!r}")
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    if level == "token":
        rho = safe_ratio(d)
        capped = masked_mean((rho > cap).to(d.dtype), m)
    elif level == "sequence":
        seq = safe_ratio(masked_sum(d, m, dim=-1))[:, None]  # [B, 1]
        capped = (seq > cap).to(d.dtype).mean()
        rho = seq.expand_as(d)
    else:
        raise ValueError(f"level: expected 'token' or 'sequence', got {level!r}")
    w = torch.where(m, torch.clamp(rho, max=cap), zero)
    return w, {"tis_capped_frac": capped}


@torch.no_grad()
def icepop_mask(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    low: float = 0.5,
    high: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IcePop token masking: keep a token only if ``low <= rho_t <= high`` (IcePop's
    ``alpha = 0.5``, ``beta = 5``; SkyRL's ``token_mask_is_threshold_low/high``).

    Returns:
        ``([B, T] bool new mask = loss_mask and in bounds; metrics)``: ``icepop_masked_frac`` (valid
        tokens dropped).
    """
    d, m = _inputs(old_log_probs, rollout_log_probs, loss_mask)
    _bounds("low", low, "high", high)
    rho = safe_ratio(d)
    keep = (rho >= low) & (rho <= high)
    return m & keep, {"icepop_masked_frac": masked_mean((~keep).to(d.dtype), m)}


@torch.no_grad()
def sequence_keep(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    metric: str = "geometric",
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Which rows survive sequence rejection: ``keep_i`` is False when the row's ratio statistic
    leaves ``[low, high]``::

        geometric:  exp(sum_t m d_t / max(n, 1))     defaults low 0.99, high 1.01 (SkyRL geo_mask_*)
        product:    exp(clamp(sum_t m d_t, -20, 20)) defaults low 0.5,  high 2.0  (SkyRL product_mask_*)
        token:      any valid token's rho_t outside [low, high]; None disables a side (SkyRL's
                    outlier_token_is_threshold_low/high, suggested 1e-4 / 100)

    A row without valid tokens has statistic 1 (``token``: no outlier), as SkyRL's.

    Returns:
        ``([B] bool keep; metrics)``: ``seq_masked_frac``, ``seq_over_high_frac``,
        ``seq_under_low_frac`` (fractions of all ``B`` rows).
    """
    d, m = _inputs(old_log_probs, rollout_log_probs, loss_mask)
    if metric == "geometric":
        low, high = 0.99 if low is None else low, 1.01 if high is None else high
    elif metric == "product":
        low, high = 0.5 if low is None else low, 2.0 if high is None else high
    elif metric != "token":
        raise ValueError(f"metric: expected 'geometric', 'product' or 'token', got {metric!r}")
    _bounds("low", low, "high", high)
    if metric == "token":
        rho = safe_ratio(d)
        over = ((rho > high) & m).any(dim=-1) if high is not None else torch.zeros_like(m[:, 0])
        under = ((rho < low) & m).any(dim=-1) if low is not None else torch.zeros_like(m[:, 0])
    else:
        s = masked_sum(d, m, dim=-1)
        if metric == "geometric":
            s = s / m.sum(dim=-1).clamp(min=1).to(d.dtype)
        stat = safe_ratio(s)
        over, under = stat > high, stat < low
    keep = ~(over | under)
    f = d.dtype
    metrics = {
        "seq_masked_frac": (~keep).to(f).mean(),
        "seq_over_high_frac": over.to(f).mean(),
        "seq_under_low_frac": under.to(f).mean(),
    }
    return keep, metrics


@torch.no_grad()
def sequence_mask(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    metric: str = "geometric",
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence rejection: drop every token of a row that :func:`sequence_keep` rejects.

    Returns:
        ``([B, T] bool new mask = loss_mask and keep; metrics)``: ``seq_masked_frac``,
        ``seq_over_high_frac``, ``seq_under_low_frac`` (fractions of rows).
    """
    keep, metrics = sequence_keep(old_log_probs, rollout_log_probs, loss_mask, metric=metric, low=low, high=high)
    return as_mask("loss_mask", loss_mask, tuple(old_log_probs.shape)) & keep[:, None], metrics


@torch.no_grad()
def mismatch_metrics(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Rollout/trainer mismatch over valid tokens (detached 0-dim tensors): ``mismatch_abs_logp``
    (mean ``|d|``), ``mismatch_max_abs_logp``, ``mismatch_k3`` (mean k3 estimate of
    KL(q || p)), ``is_ratio_mean``, ``is_ratio_min``, ``is_ratio_max``."""
    d, m = _inputs(old_log_probs, rollout_log_probs, loss_mask)
    rho = safe_ratio(d)
    one = torch.ones((), dtype=d.dtype, device=d.device)
    inf = torch.full((), float("inf"), dtype=d.dtype, device=d.device)
    anyv = m.any()
    x = torch.clamp(d, -20.0, 20.0)
    return {
        "mismatch_abs_logp": masked_mean(d.abs(), m),
        "mismatch_max_abs_logp": torch.where(m, d.abs(), torch.zeros_like(d)).amax(),
        "mismatch_k3": masked_mean(torch.exp(x) - x - 1.0, m),
        "is_ratio_mean": torch.where(anyv, masked_mean(rho, m), one),
        "is_ratio_min": torch.where(anyv, torch.where(m, rho, inf).amin(), one),
        "is_ratio_max": torch.where(anyv, torch.where(m, rho, -inf).amax(), one),
    }


@attrs.frozen(kw_only=True, eq=False)
class OffPolicyCorrection:
    """Result of ``off_policy_correction``.

    Attributes:
        weights: ``[B, T]`` detached per-token weights to multiply the per-token loss by (1 where
            no TIS is configured; 0 off the new mask).
        loss_mask: ``[B, T]`` bool, the mask to aggregate with (the input mask minus rejected tokens).
        metrics: detached 0-dim tensors.
    """

    weights: torch.Tensor
    loss_mask: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=FrozenDict)


def off_policy_correction(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    tis_ratio_type: str | None = None,
    tis_cap: float | None = None,
    token_mask_low: float | None = None,
    token_mask_high: float | None = None,
    sequence_mask_metric: str | None = None,
    sequence_mask_low: float | None = None,
    sequence_mask_high: float | None = None,
) -> OffPolicyCorrection:
    """All corrections in SkyRL-Train's order: token mask (IcePop), TIS weights, sequence mask.

    SkyRL mapping (``algorithm.off_policy_correction.*``): ``tis_ratio_type -> tis_ratio_type``;
    ``token_tis_ratio_clip_high`` / ``sequence_tis_ratio_clip_high -> tis_cap`` (default 2.0 for
    token, 5.0 for sequence); ``token_mask_is_threshold_low/high -> token_mask_low/high`` (both
    needed to enable); ``sequence_mask_metric -> sequence_mask_metric`` (``geometric`` /
    ``product``, or ``token`` for SkyRL's ``outlier_token_is_threshold_low/high``);
    ``geo_mask_low/high`` or ``product_mask_low/high`` or the outlier thresholds ->
    ``sequence_mask_low/high``. With every option None this is the identity.

    Returns:
        ``OffPolicyCorrection`` with mismatch metrics and each step's metrics; ``masked_frac``:
        fraction of originally valid tokens dropped.
    """
    d, m0 = _inputs(old_log_probs, rollout_log_probs, loss_mask)
    metrics = dict(mismatch_metrics(old_log_probs, rollout_log_probs, m0))
    m = m0
    if token_mask_low is not None or token_mask_high is not None:
        if token_mask_low is None or token_mask_high is None:
            raise ValueError("token_mask_low, token_mask_high: expected both set (or both None), got one")
        m, extra = icepop_mask(old_log_probs, rollout_log_probs, m, low=token_mask_low, high=token_mask_high)
        metrics.update(extra)
    weights = m.to(d.dtype)
    if tis_ratio_type is not None:
        cap = tis_cap if tis_cap is not None else (2.0 if tis_ratio_type == "token" else 5.0)
        weights, extra = tis_weights(old_log_probs, rollout_log_probs, m, level=tis_ratio_type, cap=cap)
        metrics.update(extra)
    if sequence_mask_metric is not None:
        m, extra = sequence_mask(
            old_log_probs, rollout_log_probs, m, metric=sequence_mask_metric, low=sequence_mask_low, high=sequence_mask_high
        )
        metrics.update(extra)
        weights = torch.where(m, weights, torch.zeros_like(weights))
    with torch.no_grad():
        metrics["masked_frac"] = masked_mean((~m).to(d.dtype), m0)
    return OffPolicyCorrection(weights=weights, loss_mask=m, metrics=metrics)
