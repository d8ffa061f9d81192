"""SkyRL 0.3.0's ``skyrl.backends.skyrl_train.utils.off_policy_correction_utils`` over the native
``skyrl_fn.losses.off_policy`` pieces.

The rollout engine samples with log-probs ``q`` (``rollout_logprobs``) that differ from the
trainer's ``p`` (``old_log_probs``); with ``d_t = p_t - q_t`` and ``rho_t = exp(clamp(d_t, -20,
20))`` these functions compute SkyRL's truncated importance weights and rejection masks, read from
an ``OffPolicyCorrectionConfig`` (``config.off_policy_correction``; any object with those
attributes, or a mapping). Metrics are Python floats under SkyRL's names. Masks are float
(``0``/``1``); a ``loss_mask`` may be soft (its non-zero entries count as valid tokens and its
values are kept when multiplied in). Notation: ``B`` sequences, ``T`` tokens.

Deviation: ``compute_tis_ratio(..., "token")`` is 0 at masked positions (SkyRL returns the ratio
there; every caller multiplies it into a masked sum, so no loss changes).
"""

from __future__ import annotations

from typing import Any

import torch

from skyrl_fn.compat._calls import caller_names, config_value
from skyrl_fn.compat._functional import masked_mean
from skyrl_fn.losses._common import safe_ratio
from skyrl_fn.losses.off_policy import icepop_mask, sequence_keep, tis_weights

__all__ = [
    "off_policy_correction_enabled",
    "compute_tis_ratio",
    "compute_outlier_token_mask",
    "compute_token_mask",
    "compute_sequence_mask",
    "compute_off_policy_correction",
    "apply_off_policy_correction",
]

_NAMES = {"rollout_log_probs": "rollout_logprobs"}
#: SkyRL's defaults of the fields read here (``OffPolicyCorrectionConfig``).
_DEFAULTS = {
    "token_tis_ratio_clip_high": 2.0,
    "sequence_tis_ratio_clip_high": 5.0,
    "geo_mask_high": 1.01,
    "geo_mask_low": 0.99,
    "product_mask_high": 2.0,
    "product_mask_low": 0.5,
}


def _get(cfg: Any, name: str) -> Any:
    value = config_value(cfg, (name,))
    return _DEFAULTS.get(name) if value is None else value


def _valid(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask != 0


def off_policy_correction_enabled(off_policy_correction: Any) -> bool:
    """Whether any correction is on: TIS, a sequence mask, an outlier threshold, or both token-mask bounds."""
    c = off_policy_correction
    return (
        _get(c, "tis_ratio_type") is not None
        or _get(c, "sequence_mask_metric") is not None
        or _get(c, "outlier_token_is_threshold_low") is not None
        or _get(c, "outlier_token_is_threshold_high") is not None
        or (_get(c, "token_mask_is_threshold_low") is not None and _get(c, "token_mask_is_threshold_high") is not None)
    )


def compute_tis_ratio(
    old_log_probs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    tis_ratio_type: str,
    off_policy_correction: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights, detached (native ``tis_weights``)::

        "token":     min(rho_t, token_tis_ratio_clip_high)                       [B, T]
        "sequence":  min(exp(clamp(sum_t m d_t, -20, 20)), sequence_tis_ratio_clip_high)   [B, 1]

    Metrics: ``tis_token_clip_high_ratio`` (valid tokens capped) or ``tis_seq_clip_high_ratio``
    (rows capped, over all ``B`` rows).

    Raises:
        ValueError: ``tis_ratio_type`` not ``token`` / ``sequence`` ("Unknown tis_ratio_type").
    """
    m = _valid(loss_mask)
    if tis_ratio_type == "token":
        cap = _get(off_policy_correction, "token_tis_ratio_clip_high")
        with caller_names({**_NAMES, "cap": "token_tis_ratio_clip_high"}):
            w, metrics = tis_weights(old_log_probs, rollout_logprobs, m, level="token", cap=cap)
        return w, {"tis_token_clip_high_ratio": metrics["tis_capped_frac"].item()}
    if tis_ratio_type == "sequence":
        cap = _get(off_policy_correction, "sequence_tis_ratio_clip_high")
        with caller_names({**_NAMES, "cap": "sequence_tis_ratio_clip_high"}):
            w, metrics = tis_weights(old_log_probs, rollout_logprobs, m, level="sequence", cap=cap)
        # The native weight is the row's value on every valid token; a row without valid tokens
        # has the sequence ratio exp(0) = 1.
        row = torch.where(m.any(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True), torch.clamp(torch.ones_like(w[:, :1]), max=cap))
        return row, {"tis_seq_clip_high_ratio": metrics["tis_capped_frac"].item()}
    raise ValueError(f"Unknown tis_ratio_type: {tis_ratio_type!r}; expected 'token' or 'sequence'")


#: The config fields behind the native ``low`` / ``high`` of each sequence metric.
_BOUNDS = {
    "geometric": ("geo_mask_low", "geo_mask_high"),
    "product": ("product_mask_low", "product_mask_high"),
    "token": ("outlier_token_is_threshold_low", "outlier_token_is_threshold_high"),
}


def _sequence(old_log_probs, rollout_logprobs, loss_mask, metric, low, high, prefix):
    name_low, name_high = _BOUNDS[metric]
    with caller_names({**_NAMES, "low": name_low, "high": name_high}):
        keep, metrics = sequence_keep(old_log_probs, rollout_logprobs, _valid(loss_mask), metric=metric, low=low, high=high)
    out = {
        f"{prefix}masked_ratio": metrics["seq_masked_frac"].item(),
        f"{prefix}over_high_ratio": metrics["seq_over_high_frac"].item(),
        f"{prefix}under_low_ratio": metrics["seq_under_low_frac"].item(),
    }
    return keep[:, None].to(old_log_probs.dtype), out


def compute_outlier_token_mask(
    old_log_probs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor, off_policy_correction: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """``[B, 1]`` float: 0 for a row with any valid token's ``rho_t`` outside
    ``[outlier_token_is_threshold_low, outlier_token_is_threshold_high]`` (None disables a side).
    Native ``sequence_keep(metric="token")``. Metrics ``outlier_seq_{masked,over_high,under_low}_ratio``."""
    c = off_policy_correction
    return _sequence(
        old_log_probs, rollout_logprobs, loss_mask, "token",
        _get(c, "outlier_token_is_threshold_low"), _get(c, "outlier_token_is_threshold_high"), "outlier_seq_",
    )


def compute_token_mask(
    old_log_probs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor, off_policy_correction: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """``[B, T]`` float: 0 for a valid token with ``rho_t`` outside ``[token_mask_is_threshold_low,
    token_mask_is_threshold_high]`` (bounds inclusive), 1 elsewhere (also at masked positions).
    Native ``icepop_mask``. Metric ``token_mask_ratio``: valid tokens dropped."""
    c = off_policy_correction
    m = _valid(loss_mask)
    with caller_names({**_NAMES, "low": "token_mask_is_threshold_low", "high": "token_mask_is_threshold_high"}):
        kept, metrics = icepop_mask(
            old_log_probs, rollout_logprobs, m,
            low=_get(c, "token_mask_is_threshold_low"), high=_get(c, "token_mask_is_threshold_high"),
        )
    return (kept | ~m).to(old_log_probs.dtype), {"token_mask_ratio": metrics["icepop_masked_frac"].item()}


def compute_sequence_mask(
    old_log_probs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_mask_metric: str,
    off_policy_correction: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``[B, 1]`` float: 0 for a row whose geometric-mean ratio (``geo_mask_low/high``) or product
    ratio (``product_mask_low/high``) leaves the bounds. Native ``sequence_keep``. Metrics
    ``{geo,product}_sequence_mask_{masked,over_high,under_low}_ratio``.

    Raises:
        ValueError: ``sequence_mask_metric`` not ``geometric`` / ``product`` ("Unknown sequence_mask_metric").
    """
    c = off_policy_correction
    if sequence_mask_metric == "geometric":
        low, high, prefix = _get(c, "geo_mask_low"), _get(c, "geo_mask_high"), "geo_sequence_mask_"
    elif sequence_mask_metric == "product":
        low, high, prefix = _get(c, "product_mask_low"), _get(c, "product_mask_high"), "product_sequence_mask_"
    else:
        raise ValueError(f"Unknown sequence_mask_metric: {sequence_mask_metric!r}; expected 'geometric' or 'product'")
    return _sequence(old_log_probs, rollout_logprobs, loss_mask, sequence_mask_metric, low, high, prefix)


def compute_off_policy_correction(
    old_log_probs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor, off_policy_correction: Any
) -> tuple[torch.Tensor | None, dict[str, float], torch.Tensor]:
    """Every enabled correction in SkyRL's order: outlier mask, token mask, TIS weights (on the mask
    so far), sequence mask. Returns ``(tis_ratio or None, metrics, new loss_mask)``; with nothing
    enabled ``(None, {}, loss_mask)``. Metrics also hold SkyRL's ``is_ratio_mean`` (valid tokens),
    ``is_ratio_std`` / ``_max`` / ``_min`` (of ``rho * loss_mask`` over all ``B x T`` entries)."""
    c = off_policy_correction
    if not off_policy_correction_enabled(c):
        return None, {}, loss_mask
    with torch.no_grad():
        rho = safe_ratio(old_log_probs.detach() - rollout_logprobs.detach())
        weighted = rho * loss_mask
        metrics: dict[str, float] = {
            "is_ratio_mean": masked_mean(rho, loss_mask).item(),
            "is_ratio_std": weighted.std().item(),
            "is_ratio_max": weighted.max().item(),
            "is_ratio_min": weighted.min().item(),
        }
    if _get(c, "outlier_token_is_threshold_low") is not None or _get(c, "outlier_token_is_threshold_high") is not None:
        keep, extra = compute_outlier_token_mask(old_log_probs, rollout_logprobs, loss_mask, c)
        loss_mask = loss_mask * keep
        metrics.update(extra)
    if _get(c, "token_mask_is_threshold_low") is not None and _get(c, "token_mask_is_threshold_high") is not None:
        keep, extra = compute_token_mask(old_log_probs, rollout_logprobs, loss_mask, c)
        loss_mask = loss_mask * keep
        metrics.update(extra)
    tis_ratio = None
    if _get(c, "tis_ratio_type") is not None:
        tis_ratio, extra = compute_tis_ratio(old_log_probs, rollout_logprobs, loss_mask, _get(c, "tis_ratio_type"), c)
        metrics.update(extra)
    if _get(c, "sequence_mask_metric") is not None:
        keep, extra = compute_sequence_mask(old_log_probs, rollout_logprobs, loss_mask, _get(c, "sequence_mask_metric"), c)
        loss_mask = loss_mask * keep
        metrics.update(extra)
    return tis_ratio, metrics, loss_mask


def apply_off_policy_correction(
    loss: torch.Tensor,
    old_log_probs: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    loss_mask: torch.Tensor,
    off_policy_correction: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(loss * tis_ratio, new loss_mask, metrics)``; unchanged when ``rollout_logprobs`` is None
    or nothing is enabled (as SkyRL, which corrects only when the rollout log-probs are there)."""
    if rollout_logprobs is None or off_policy_correction is None:
        return loss, loss_mask, {}
    tis_ratio, metrics, loss_mask = compute_off_policy_correction(old_log_probs, rollout_logprobs, loss_mask, off_policy_correction)
    if tis_ratio is not None:
        loss = loss * tis_ratio
    return loss, loss_mask, metrics
