"""Off-policy corrections as composable values: each a pure function of the batch that returns
per-token weights, a new loss mask and metrics (an ``OffPolicyCorrection``), chained with
:func:`compose_corrections` in the order given (as ``optax.chain``).

Kind ``off_policy_correction`` of the table: ``fn(batch: PolicyLossInput, **hyper) ->
OffPolicyCorrection``. ``batch.loss_mask`` is the mask left by the pieces before it; a piece
returns weights (detached, 0 off its mask) and a mask that is a subset of ``batch.loss_mask``.
``policy_objective(correction=...)`` multiplies the per-token policy loss by the weights and
aggregates with the mask (the KL and entropy terms keep the original mask, as SkyRL and TRL).

Notation: ``B`` sequences, ``T`` tokens, ``m`` the loss mask, ``q = rollout_log_probs`` (the
sampler's), ``sg[.]`` stop-gradient. Every piece measures the sampler against a *proximal* policy
``p`` chosen by ``against``:

- ``"old"``: ``p = old_log_probs``, the trainer's log-probs of the sampling weights (SkyRL's
  ``off_policy_correction``, verl's decoupled mode: three policies).
- ``"current"``: ``p = sg[log_probs]``, the policy being trained (verl's ``bypass_mode`` computes
  its IS weights and rejection masks this way, where ``old = q``; TRL's off-policy sequence mask).

``d_t = p_t - q_t``, ``rho_t = exp(clamp(d_t, -20, 20))``. The pieces: ``tis`` / ``tis_sequence``
(truncated IS, Yao et al. https://fengyao.notion.site/off-policy-rl), ``icepop`` (token mask,
arXiv:2510.18855), ``geo_mask`` / ``product_mask`` (sequence rejection, SkyRL and verl's
``rollout_rs`` ``seq_mean_k1`` / ``seq_sum_k1``), ``outlier_veto`` (a sequence with any token out of
bounds is dropped, SkyRL's ``outlier_token_is_threshold_*``), ``opsm`` (DeepSeek-V3.2's off-policy
sequence mask, arXiv:2512.02556 eq. 9, TRL's ``off_policy_mask_threshold``) and ``unbiased_kl``
(DeepSeek-V3.2's importance-weighted KL, TRL's ``use_bias_correction_kl``).
"""

from __future__ import annotations

from typing import Callable, Literal

import attrs
import torch

from skyrl_fn.losses._common import check_positive, masked_mean, masked_sum, safe_ratio
from skyrl_fn.losses.off_policy import OffPolicyCorrection, icepop_mask, mismatch_metrics, sequence_keep, tis_weights
from skyrl_fn.core.records import PolicyLossInput

__all__ = [
    "Against",
    "CorrectionChain",
    "compose_corrections",
    "tis",
    "tis_sequence",
    "icepop",
    "geo_mask",
    "product_mask",
    "outlier_veto",
    "opsm",
    "unbiased_kl",
]

Against = Literal["old", "current"]


def _proximal(batch: PolicyLossInput, against: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, q)``: the proximal and the sampler's log-probs ``[B, T]``, detached."""
    if not isinstance(batch, PolicyLossInput):
        raise TypeError(f"batch: expected a PolicyLossInput, got {type(batch).__name__}")
    if batch.rollout_log_probs is None:
        raise ValueError("rollout_log_probs: expected the [B, T] log-probs of the rollout engine for an off-policy correction, got None")
    if against == "old":
        p = batch.old_log_probs
    elif against == "current":
        p = batch.log_probs
    else:
        raise ValueError(f"against: expected 'old' or 'current', got {against!r}")
    return p.detach(), batch.rollout_log_probs.detach()


def _mask_only(batch: PolicyLossInput, keep: torch.Tensor, metrics: dict) -> OffPolicyCorrection:
    m = batch.loss_mask & keep
    return OffPolicyCorrection(weights=m.to(batch.log_probs.dtype), loss_mask=m, metrics=metrics)


def _check_bound(name: str, value, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    check_positive(name, value)


def tis(batch: PolicyLossInput, *, cap: float = 2.0, against: Against = "old") -> OffPolicyCorrection:
    """Token-level truncated importance sampling: ``w_t = min(rho_t, cap)`` on the mask.

    SkyRL's ``tis_ratio_type: token`` (``token_tis_ratio_clip_high``, default 2.0); verl's
    ``rollout_is: token`` with a single ``rollout_is_threshold`` (default 2.0).

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), mask.
        cap: the truncation, > 0.
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection``: weights ``[B, T]``, the mask unchanged; ``tis_capped_frac``
        (valid tokens at the cap).
    """
    check_positive("cap", cap)
    p, q = _proximal(batch, against)
    w, metrics = tis_weights(p, q, batch.loss_mask, level="token", cap=float(cap))
    return OffPolicyCorrection(weights=w, loss_mask=batch.loss_mask, metrics=metrics)


def tis_sequence(batch: PolicyLossInput, *, cap: float = 5.0, against: Against = "old") -> OffPolicyCorrection:
    """Sequence-level truncated importance sampling: every valid token of row ``i`` gets
    ``w_i = min(exp(clamp(sum_t m_it d_it, -20, 20)), cap)`` (the product of the token ratios).

    SkyRL's ``tis_ratio_type: sequence`` (``sequence_tis_ratio_clip_high``, default 5.0); verl's
    ``rollout_is: sequence`` (its default threshold is 2.0: pass ``cap=2.0``). The sum runs over the
    mask this piece receives: after a token mask (SkyRL's order) or before any (verl's, which
    computes IS and rejection independently on the response mask).

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), mask.
        cap: the truncation of the sequence weight, > 0.
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection``; ``tis_seq_capped_frac`` (rows at the cap, of all ``B``).
    """
    check_positive("cap", cap)
    p, q = _proximal(batch, against)
    w, metrics = tis_weights(p, q, batch.loss_mask, level="sequence", cap=float(cap))
    return OffPolicyCorrection(weights=w, loss_mask=batch.loss_mask, metrics={"tis_seq_capped_frac": metrics["tis_capped_frac"]})


def icepop(batch: PolicyLossInput, *, low: float = 0.5, high: float = 5.0, against: Against = "old") -> OffPolicyCorrection:
    """IcePop token mask (Ring-1T, arXiv:2510.18855): keep token ``t`` only if
    ``low <= rho_t <= high``. SkyRL's ``token_mask_is_threshold_low/high``; verl's IcePop form of
    ``rollout_is_threshold: "low_high"`` (there as zero weights, here as a smaller mask).

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), mask.
        low: smallest kept token ratio, > 0.
        high: largest kept token ratio, > 0.
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection`` (weights 1 on the new mask); ``icepop_masked_frac``.
    """
    _check_bound("low", low, allow_none=False)
    _check_bound("high", high, allow_none=False)
    p, q = _proximal(batch, against)
    m, metrics = icepop_mask(p, q, batch.loss_mask, low=float(low), high=float(high))
    return OffPolicyCorrection(weights=m.to(batch.log_probs.dtype), loss_mask=m, metrics=metrics)


def _seq_piece(batch, prefix: str, metric: str, low, high, against) -> OffPolicyCorrection:
    p, q = _proximal(batch, against)
    keep, metrics = sequence_keep(p, q, batch.loss_mask, metric=metric, low=low, high=high)
    renamed = {f"{prefix}_{k.removeprefix('seq_')}": v for k, v in metrics.items()}
    return _mask_only(batch, keep[:, None], renamed)


def geo_mask(batch: PolicyLossInput, *, low: float = 0.99, high: float = 1.01, against: Against = "old") -> OffPolicyCorrection:
    """Geometric sequence masking: drop row ``i`` unless ``low <= exp(sum_t m d / max(n_i, 1)) <=
    high`` (the geometric mean of its token ratios).

    SkyRL's ``sequence_mask_metric: geometric`` (``geo_mask_low/high``, defaults 0.99 / 1.01);
    verl's ``rollout_rs: seq_mean_k1`` with ``rollout_rs_threshold: "1/high_high"`` (verl compares
    ``-mean d`` with ``[log lower, log upper]``, so its asymmetric bounds act mirrored; they agree
    when ``low = 1 / high``).

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), mask.
        low: smallest kept geometric-mean ratio of a row, > 0.
        high: largest kept geometric-mean ratio of a row, > 0.
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection``; ``geo_mask_masked_frac``, ``geo_mask_over_high_frac``,
        ``geo_mask_under_low_frac`` (of all ``B`` rows).
    """
    _check_bound("low", low, allow_none=False)
    _check_bound("high", high, allow_none=False)
    return _seq_piece(batch, "geo_mask", "geometric", float(low), float(high), against)


def product_mask(batch: PolicyLossInput, *, low: float = 0.5, high: float = 2.0, against: Against = "old") -> OffPolicyCorrection:
    """Product sequence masking: drop row ``i`` unless ``low <= exp(clamp(sum_t m d, -20, 20)) <=
    high``. SkyRL's ``sequence_mask_metric: product`` (``product_mask_low/high``, 0.5 / 2.0).

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), mask.
        low: smallest kept product ratio of a row, > 0.
        high: largest kept product ratio of a row, > 0.
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection``; ``product_mask_masked_frac``, ``..._over_high_frac``,
        ``..._under_low_frac``.
    """
    _check_bound("low", low, allow_none=False)
    _check_bound("high", high, allow_none=False)
    return _seq_piece(batch, "product_mask", "product", float(low), float(high), against)


def outlier_veto(
    batch: PolicyLossInput, *, low: float | None = 1e-4, high: float | None = 100.0, against: Against = "old"
) -> OffPolicyCorrection:
    """Outlier-token veto: drop every token of a row in which any valid token has ``rho_t < low``
    or ``rho_t > high`` (None disables a side).

    SkyRL's ``outlier_token_is_threshold_low/high`` (suggested 1e-4 / 100; SkyRL applies it first,
    before every other correction); verl's earlier ``rollout_token_veto_threshold``.

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), mask.
        low: a token ratio below it vetoes its row, > 0; None: no lower bound.
        high: a token ratio above it vetoes its row, > 0; None: no upper bound.
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection``; ``outlier_masked_frac``, ``outlier_over_high_frac``,
        ``outlier_under_low_frac`` (of all ``B`` rows).

    Raises:
        ValueError: both bounds None (the piece would do nothing), a bound <= 0, ``low > high``.
    """
    if low is None and high is None:
        raise ValueError("low, high: expected at least one bound for the outlier veto, got None for both")
    _check_bound("low", low, allow_none=True)
    _check_bound("high", high, allow_none=True)
    return _seq_piece(batch, "outlier", "token", low, high, against)


def opsm(batch: PolicyLossInput, *, delta: float = 0.5, against: Against = "current") -> OffPolicyCorrection:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv:2512.02556, eq. 9), as TRL's
    ``off_policy_mask_threshold``: a token with a negative advantage is dropped when its
    sequence's mean log-ratio of sampler to policy exceeds ``delta``::

        kl_i = sum_t m_it (q_it - p_it) / max(n_i, 1)
        keep_it = (A_it >= 0) or (kl_i <= delta)

    With outcome advantages (constant along a row) this drops whole negative-advantage sequences
    that drifted off-policy, TRL's ``(B, 1)`` mask. ``p`` is the policy being trained by default
    (TRL's ``per_token_logps.detach()``), ``q`` the sampler's (TRL's ``sampling_per_token_logps``).
    TRL has no default; ``delta = 0.5`` is its documented example. Tested equal to TRL 1.16's own
    ``GRPOTrainer.get_off_policy_mask``. Deviation: a non-finite log-prob on a valid token is not
    read as 0 (TRL's ``nan_to_num``); records reject it.

    Args:
        batch: ``[B, T]`` log-probs (``rollout_log_probs`` required), advantages, mask.
        delta: the largest mean log-ratio (sampler over policy) a negative-advantage row may
            have, > 0 (TRL's ``off_policy_mask_threshold``, the paper's delta).
        against: "old" measures the sampler against old_log_probs (SkyRL, verl's decoupled mode);
            "current" against sg[log_probs] (verl's bypass mode, TRL's sequence mask).

    Returns:
        ``OffPolicyCorrection`` (weights 1 on the new mask); ``opsm_masked_frac`` (valid tokens
        dropped), ``opsm_seq_kl_mean`` (mean of ``kl_i`` over rows with a valid token).
    """
    check_positive("delta", delta)
    p, q = _proximal(batch, against)
    m = batch.loss_mask
    n = m.sum(dim=-1)
    kl = masked_sum(q - p, m, dim=-1) / n.clamp(min=1).to(p.dtype)  # [B]
    with torch.no_grad():
        keep = (batch.advantages >= 0) | (kl <= delta)[:, None]
        has = n > 0
        metrics = {
            "opsm_masked_frac": masked_mean((~keep).to(p.dtype), m),
            "opsm_seq_kl_mean": masked_sum(kl, has) / has.sum().clamp(min=1).to(p.dtype),
        }
    return _mask_only(batch, keep, metrics)


def unbiased_kl(batch: PolicyLossInput) -> OffPolicyCorrection:
    """DeepSeek-V3.2's unbiased KL estimate (arXiv:2512.02556, sec. 3.1), as TRL's
    ``use_bias_correction_kl``: the per-token KL-to-reference term is multiplied by the importance
    ratio ``r_t = exp(log_probs_t - old_log_probs_t)`` *with* its gradient, so the KL gradient is the
    unbiased reverse-KL gradient when samples come from the old policy::

        kl_weights_t = exp(clamp(log_probs_t - old_log_probs_t, -20, 20))

    The policy-loss weights and the mask are unchanged (1 and ``m``). Only a KL loss term
    (``use_kl_loss``) reads ``kl_weights``; the run is refused without one. No hyperparameters;
    the ratio is token-level (TRL's ``importance_sampling_level: token``, where the property holds).

    Returns:
        ``OffPolicyCorrection`` with ``kl_weights [B, T]`` (differentiable, 0 off the mask);
        ``kl_is_weight_mean`` (detached mean over valid tokens).
    """
    if not isinstance(batch, PolicyLossInput):
        raise TypeError(f"batch: expected a PolicyLossInput, got {type(batch).__name__}")
    m = batch.loss_mask
    zero = torch.zeros((), dtype=batch.log_probs.dtype, device=batch.log_probs.device)
    d = torch.where(m, batch.log_probs - batch.old_log_probs.detach().to(batch.log_probs.dtype), zero)
    r = torch.where(m, safe_ratio(d), zero)
    return OffPolicyCorrection(
        weights=m.to(batch.log_probs.dtype), loss_mask=m, kl_weights=r,
        metrics={"kl_is_weight_mean": masked_mean(r.detach(), m)},
    )


@attrs.frozen(eq=False)
class CorrectionChain:
    """Corrections applied one after the other (:func:`compose_corrections`); itself a correction
    ``fn(batch: PolicyLossInput) -> OffPolicyCorrection``.

    Attributes:
        pieces: the corrections, hyperparameters bound, in order.
    """

    pieces: tuple[Callable[[PolicyLossInput], OffPolicyCorrection], ...]

    def __call__(self, batch: PolicyLossInput) -> OffPolicyCorrection:
        """Run every piece on the mask the previous ones left; multiply the weights (and the
        ``kl_weights``), intersect the masks, merge the metrics (a name reported twice is an
        error); add the mismatch metrics (``mismatch_metrics`` of old vs rollout on the input
        mask) and ``masked_frac`` (valid tokens dropped by the chain)."""
        if not isinstance(batch, PolicyLossInput):
            raise TypeError(f"batch: expected a PolicyLossInput, got {type(batch).__name__}")
        if batch.rollout_log_probs is None:
            raise ValueError("rollout_log_probs: expected the [B, T] log-probs of the rollout engine for an off-policy correction, got None")
        m0 = batch.loss_mask
        shape = tuple(m0.shape)
        dtype = batch.log_probs.dtype
        m, w, kl_w = m0, m0.to(dtype), None
        metrics = dict(mismatch_metrics(batch.old_log_probs, batch.rollout_log_probs, m0))
        for piece in self.pieces:
            sub = batch if m is m0 else PolicyLossInput.unchecked(
                log_probs=batch.log_probs, old_log_probs=batch.old_log_probs, advantages=batch.advantages,
                loss_mask=m, ref_log_probs=batch.ref_log_probs, rollout_log_probs=batch.rollout_log_probs,
            )
            c = piece(sub)
            if not isinstance(c, OffPolicyCorrection):
                raise TypeError(f"correction {piece!r}: expected it to return an OffPolicyCorrection, got {type(c).__name__}")
            for field in ("weights", "loss_mask"):
                if tuple(getattr(c, field).shape) != shape:
                    raise ValueError(f"correction {piece!r}: {field} expected shape [B, T] = {shape}, got {tuple(getattr(c, field).shape)}")
            twice = sorted(set(c.metrics) & set(metrics))
            if twice:
                raise ValueError(f"compose_corrections: metrics {twice} are reported by two pieces; compose each correction once")
            metrics.update(c.metrics)
            m = m & c.loss_mask
            w = w * c.weights.to(dtype)
            if c.kl_weights is not None:
                kl_w = c.kl_weights if kl_w is None else kl_w * c.kl_weights
        w = torch.where(m, w, torch.zeros((), dtype=dtype, device=w.device))
        with torch.no_grad():
            metrics["masked_frac"] = masked_mean((~m).to(dtype), m0)
        return OffPolicyCorrection(weights=w, loss_mask=m, metrics=metrics, kl_weights=kl_w)


def compose_corrections(*pieces: Callable[[PolicyLossInput], OffPolicyCorrection]) -> CorrectionChain:
    """One correction that runs ``pieces`` in order (each sees the mask the earlier ones left).

    Weights multiply and masks intersect, so masks commute with each other and with token TIS;
    the order matters for sequence TIS (its sum runs over the mask it receives) and for which
    piece's metrics count the dropped tokens. SkyRL's order is ``outlier_veto, icepop, tis,
    geo_mask``; verl's (IS and rejection on the same response mask) puts the TIS first. Nested
    chains are flattened.

    Raises:
        ValueError: no pieces.
        TypeError: a piece that is not callable.
    """
    if not pieces:
        raise ValueError("pieces: expected at least one correction, got none")
    flat: list = []
    for p in pieces:
        if not callable(p):
            raise TypeError(f"pieces: expected callables fn(batch: PolicyLossInput) -> OffPolicyCorrection, got {type(p).__name__}")
        flat.extend(p.pieces if isinstance(p, CorrectionChain) else (p,))
    return CorrectionChain(tuple(flat))
