"""Clipped-ratio policy losses: PPO (``regular``), dual-clip PPO, GSPO, SAPO, GMPO (``geo_mean``), DPPO.

Notation: ``B`` sequences, ``T`` response tokens; ``r = pi_theta / pi_old = exp(log_probs -
old_log_probs)`` per token, ``A`` the advantages, ``m`` the loss mask. Every loss returns the
*per-token* loss ``[B, T]`` (zero where ``m`` is 0); the reduction to a scalar is a separate
aggregation (``skyrl_fn.losses.aggregation``), so any loss works with any reduction and with
micro-batching.

Hyperparameters carry SkyRL-Train's ``trainer.algorithm`` field names, flattened, so a SkyRL
``config`` maps onto them by name (mapping written in each docstring). Every loss reports the
standard metrics of ``skyrl_fn.losses._common.ratio_metrics``: ``ratio_mean/min/max``,
``approx_kl``, ``clip_frac_low``, ``clip_frac_high`` and ``clip_ratio`` (their sum).
"""

from __future__ import annotations

import torch

from skyrl_fn.losses._common import (
    check_batch,
    check_nonnegative,
    check_positive,
    clean,
    masked_mean,
    masked_sum,
    ratio_metrics,
    run,
    safe_ratio,
)
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput

__all__ = ["regular", "dual_clip", "gspo", "sapo", "geo_mean", "dppo", "dppo_mask"]


def _ppo_clip(lp, old, adv, m, eps_clip_low: float, eps_clip_high: float):
    """The clipped surrogate ``max(-r A, -clip(r, 1-lo, 1+hi) A)`` and its clip masks. [B, T]."""
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    ratio = safe_ratio(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - eps_clip_low, 1.0 + eps_clip_high)
    loss = torch.maximum(loss1, loss2)
    with torch.no_grad():
        clipped = loss2 > loss1
        high, low = clipped & (adv > 0), clipped & (adv < 0)
    return loss, log_ratio, adv, high, low


def regular(batch: PolicyLossInput, *, eps_clip_low: float = 0.2, eps_clip_high: float = 0.2) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), asymmetric clip (DAPO's
    clip-higher, arXiv:2503.14476)::

        r_t = exp(clamp(log_probs_t - old_log_probs_t, -20, 20))
        loss_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_clip_low, 1 + eps_clip_high)) * m_t

    Defaults as SkyRL-Train (``eps_clip_low = eps_clip_high = 0.2``). SkyRL config mapping:
    ``algorithm.eps_clip_low -> eps_clip_low``, ``algorithm.eps_clip_high -> eps_clip_high``.

    Args:
        batch: ``log_probs``, ``old_log_probs``, ``advantages``, ``loss_mask``, all ``[B, T]``.
        eps_clip_low: lower clip offset, >= 0.
        eps_clip_high: upper clip offset, >= 0.

    Returns:
        ``PolicyLossOutput``: ``token_loss [B, T]``; metrics ``clip_frac_high`` (A > 0 and
        r > 1 + eps_clip_high), ``clip_frac_low`` (A < 0 and r < 1 - eps_clip_low), ``clip_ratio``
        (their sum, SkyRL's metric), ``ratio_mean/min/max``, ``approx_kl``.

    Raises:
        ValueError: a negative ``eps_clip_low`` / ``eps_clip_high``.
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    return run(_regular, batch, float(eps_clip_low), float(eps_clip_high))


def _regular(lp, old, adv, m, eps_clip_low: float, eps_clip_high: float):
    loss, log_ratio, _, high, low = _ppo_clip(lp, old, adv, m, eps_clip_low, eps_clip_high)
    return clean(loss, m), ratio_metrics(log_ratio, m, clipped_low=low, clipped_high=high)


def dual_clip(
    batch: PolicyLossInput, *, eps_clip_low: float = 0.2, eps_clip_high: float = 0.2, clip_ratio_c: float = 3.0
) -> PolicyLossOutput:
    """Dual-clip PPO (Ye et al. 2020, arXiv:1912.09729): PPO whose loss is also bounded by
    ``clip_ratio_c`` where the advantage is negative::

        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_clip_low, 1 + eps_clip_high))   (as ``regular``)
        loss_t = min(l_t, -clip_ratio_c A_t)   if A_t < 0,   else l_t

    Defaults as SkyRL-Train (``clip_ratio_c = 3.0``). SkyRL mapping: ``eps_clip_low``,
    ``eps_clip_high``, ``clip_ratio_c`` by the same names.

    Returns:
        As ``regular``, plus ``clip_frac_dual``: fraction of tokens bounded by ``clip_ratio_c``.

    Raises:
        ValueError: ``clip_ratio_c <= 1`` (as verl) or negative clip offsets.
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    if not isinstance(clip_ratio_c, (int, float)) or not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: expected a number > 1, got {clip_ratio_c!r}")
    return run(_dual_clip, batch, float(eps_clip_low), float(eps_clip_high), float(clip_ratio_c))


def _dual_clip(lp, old, adv, m, eps_clip_low: float, eps_clip_high: float, clip_ratio_c: float):
    loss, log_ratio, adv, high, low = _ppo_clip(lp, old, adv, m, eps_clip_low, eps_clip_high)
    bound = -adv * clip_ratio_c
    neg = adv < 0
    out = torch.where(neg, torch.minimum(loss, bound), loss)
    metrics = ratio_metrics(log_ratio, m, clipped_low=low, clipped_high=high)
    with torch.no_grad():
        metrics["clip_frac_dual"] = masked_mean((neg & (loss > bound)).to(loss.dtype), m)
    return clean(out, m), metrics


def gspo(batch: PolicyLossInput, *, eps_clip_low: float = 0.2, eps_clip_high: float = 0.2) -> PolicyLossOutput:
    """GSPO-token (Zheng et al. 2025, arXiv:2507.18071, eqs. 14-15): PPO clipping on the
    *sequence*-level ratio, written per token so the gradient flows through each token::

        log s_i = sum_t m_it (log_probs_it - old_log_probs_it) / max(sum_t m_it, 1)
        s_it = exp(min(sg[log s_i] + log_probs_it - sg[log_probs_it], 10))
        loss_it = max(-A_it s_it, -A_it clip(s_it, 1 - eps_clip_low, 1 + eps_clip_high)) * m_it

    ``s_it`` equals ``s_i`` in value; its gradient is ``s_i * d log_probs_it``. The paper uses
    sequence-mean reduction (``seq_mean_token_mean``, SkyRL's ``sequence_mean``) and clip offsets
    around 3e-4 / 4e-4; the defaults here are SkyRL-Train's shared ``eps_clip_low/high = 0.2``.
    SkyRL mapping: ``eps_clip_low``, ``eps_clip_high`` by name.

    Returns:
        As ``regular``; the clip fractions and ratio statistics refer to the sequence ratio ``s``,
        ``approx_kl`` to the token ratio.
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    return run(_gspo, batch, float(eps_clip_low), float(eps_clip_high))


def _gspo(lp, old, adv, m, eps_clip_low: float, eps_clip_high: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    seq_log = masked_mean(log_ratio, m, dim=-1)[:, None]  # [B, 1]
    log_s = torch.clamp(lp - lp.detach() + seq_log.detach(), max=10.0)
    s = torch.exp(log_s)
    loss1 = -adv * s
    loss2 = -adv * torch.clamp(s, 1.0 - eps_clip_low, 1.0 + eps_clip_high)
    loss = torch.maximum(loss1, loss2)
    metrics = ratio_metrics(log_s, m, clipped_low=(loss2 > loss1) & (adv < 0), clipped_high=(loss2 > loss1) & (adv > 0))
    metrics["approx_kl"] = masked_mean(-log_ratio.detach(), m)
    return clean(loss, m), metrics


def sapo(batch: PolicyLossInput, *, tau_pos: float = 1.0, tau_neg: float = 1.05) -> PolicyLossOutput:
    """SAPO, soft adaptive policy optimisation (Gao et al. 2025, arXiv:2511.20347): a smooth,
    temperature-gated replacement of the hard clip::

        r_t = exp(clamp(log_probs_t - old_log_probs_t, -20, 20))
        tau_t = tau_pos if A_t > 0 else tau_neg
        loss_t = -A_t * sigmoid(tau_t (r_t - 1)) * 4 / tau_t * m_t

    At ``r = 1`` the gradient equals plain PPO's (``d loss / d log p = -A``); it decays smoothly as
    ``r`` leaves 1, faster for the larger temperature. Defaults as SkyRL-Train / verl
    (``tau_pos = 1.0``, ``tau_neg = 1.05``); the paper reduces with ``sequence_mean``. SkyRL
    mapping: ``algorithm.sapo.tau_pos -> tau_pos``, ``algorithm.sapo.tau_neg -> tau_neg``.

    Returns:
        ``token_loss [B, T]``; ratio metrics; clip fractions are 0 (nothing is hard-clipped).

    Raises:
        ValueError: a temperature that is not > 0.
    """
    check_batch(batch)
    check_positive("tau_pos", tau_pos)
    check_positive("tau_neg", tau_neg)
    return run(_sapo, batch, float(tau_pos), float(tau_neg))


def _sapo(lp, old, adv, m, tau_pos: float, tau_neg: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    ratio = safe_ratio(log_ratio)
    pos = adv > 0
    tau = torch.where(pos, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return clean(-adv * gate, m), ratio_metrics(log_ratio, m)


def geo_mean(batch: PolicyLossInput, *, eps_clip_low: float = 0.2, eps_clip_high: float = 0.2) -> PolicyLossOutput:
    """GMPO, geometric-mean policy optimisation (Zhao et al. 2025, arXiv:2507.20673), as verl's
    ``geo_mean``: the sequence ratio is the geometric mean of token-clipped ratios::

        d_it = log_probs_it - old_log_probs_it
        c_it = sgn(A_it) * min(sgn(A_it) d_it, sgn(A_it) clamp(d_it, -eps_clip_low, eps_clip_high))
        R_i = exp(sum_t m_it c_it / n_i),   Abar_i = sum_t m_it A_it / n_i,   n_i = max(sum_t m_it, 1)
        loss_it = -Abar_i R_i * m_it        (the sequence loss on every valid token of row i)

    The loss is sequence-level: with ``seq_mean_token_mean`` aggregation (SkyRL's
    ``sequence_mean``) and ``global_seqs = B`` the result is exactly verl's ``mean_i(-Abar_i R_i)``.
    The clip is in log space (the paper's ``(e^-eps, e^eps)``; it recommends ``eps = 0.4``); the
    defaults here are SkyRL-Train's shared ``eps_clip_low/high = 0.2`` (verl's ``clip_ratio``).
    SkyRL mapping: ``eps_clip_low``, ``eps_clip_high`` by name.

    Returns:
        ``token_loss [B, T]``; ratio metrics; ``clip_frac_high`` / ``clip_frac_low``: tokens whose
        log-ratio was clamped, with A > 0 / A < 0.
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    return run(_geo_mean, batch, float(eps_clip_low), float(eps_clip_high))


def _geo_mean(lp, old, adv, m, eps_clip_low: float, eps_clip_high: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    d = lp - old
    d_clamped = torch.clamp(d, -eps_clip_low, eps_clip_high)
    sgn = torch.sign(adv)
    c = sgn * torch.minimum(sgn * d, sgn * d_clamped)
    n = m.sum(dim=-1).clamp(min=1).to(lp.dtype)
    seq_ratio = torch.exp(masked_sum(c, m, dim=-1) / n)  # [B]
    seq_adv = masked_sum(adv, m, dim=-1) / n  # [B]
    loss = (-seq_adv * seq_ratio)[:, None].expand_as(lp)
    with torch.no_grad():
        clipped = d != d_clamped
    metrics = ratio_metrics(d, m, clipped_low=clipped & (adv < 0), clipped_high=clipped & (adv > 0))
    return clean(loss, m), metrics


def dppo(
    batch: PolicyLossInput,
    *,
    eps_clip_low: float = 0.2,
    eps_clip_high: float = 0.2,
    dppo_divergence: str = "tv",
    dppo_ratio_cap: float = 20.0,
) -> PolicyLossOutput:
    """DPPO-Binary, divergence-constrained policy gradient (arXiv:2602.04879), as verl's
    ``dppo_tv`` / ``dppo_kl``: a token whose probability moved too far from the old policy, in the
    direction its advantage pushes it, is dropped instead of ratio-clipped::

        p = exp(log_probs), p_old = exp(old_log_probs), w_t = sg[min(r_t, dppo_ratio_cap)]
        tv:  valid_t = (p - p_old <= eps_clip_high)         if A_t > 0
                       (p - p_old >= -eps_clip_low)         otherwise
        kl:  D_t = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))
             valid_t = (D_t <= eps_clip_high) or (p <= p_old)   if A_t > 0
                       (D_t <= eps_clip_low) or (p >= p_old)    otherwise
        loss_t = -A_t * w_t * log_probs_t * sg[valid_t] * m_t

    The thresholds are divergence bounds, not ratio offsets (verl reuses ``clip_ratio_low/high``
    for them, default 0.2; here SkyRL's ``eps_clip_low/high``). ``dppo_ratio_cap`` is verl's
    ``clip_ratio_c`` for this loss (default 20), renamed so SkyRL's dual-clip ``clip_ratio_c``
    (default 3) does not leak in. SkyRL mapping: ``eps_clip_low``, ``eps_clip_high`` by name.

    Returns:
        ``token_loss [B, T]``; ratio metrics; ``clip_frac_high`` / ``clip_frac_low``: dropped tokens
        with A > 0 / A <= 0; ``ratio_cap_frac``: kept tokens whose ratio hit ``dppo_ratio_cap``.

    Raises:
        ValueError: ``dppo_divergence`` not ``"tv"`` or ``"kl"``; bad thresholds or cap.
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    check_positive("dppo_ratio_cap", dppo_ratio_cap)
    if dppo_divergence not in ("tv", "kl"):
        raise ValueError(f"dppo_divergence: expected 'tv' or 'kl', got {dppo_divergence!r}")
    return run(_dppo, batch, float(eps_clip_low), float(eps_clip_high), dppo_divergence, float(dppo_ratio_cap))


def _dppo_in_trust_region(lp, old, divergence: str, delta_low: float, delta_high: float):
    """``(ok_pos, ok_neg)`` [B, T] bool: the token may move (A > 0 / A < 0) under DPPO-Binary."""
    p, p_old = torch.exp(lp), torch.exp(old)
    if divergence == "tv":
        return (p - p_old) <= delta_high, (p - p_old) >= -delta_low
    div = p_old * (old - lp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
    return (div <= delta_high) | (p <= p_old), (div <= delta_low) | (p >= p_old)


@torch.no_grad()
def dppo_mask(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    divergence: str = "tv",
    delta_low: float = 0.2,
    delta_high: float = 0.2,
) -> torch.Tensor:
    """``[B, T]`` bool DPPO-Binary keep mask (arXiv:2602.04879, eqs. 13-14): False where a token
    moved too far from the behaviour policy ``mu`` in the direction its advantage pushes it::

        p = exp(log_probs), q = exp(behaviour_log_probs)
        tv:  drop if A > 0 and p - q > delta_high,  or A < 0 and q - p > delta_low
        kl:  D = q log(q / p) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8))
             drop if A > 0 and p > q and D > delta_high,  or A < 0 and p < q and D > delta_low

    Tokens with ``A = 0`` are always kept. This is the mask of ``dppo`` (which also drops nothing
    where ``A = 0`` contributes, since its loss there is 0) and of SkyRL-Train's ``dppo_policy_loss``
    (``dppo.dppo_type`` ``binary_tv`` / ``binary_kl``, ``dppo.delta_low/high``; ``mu`` = the rollout
    log-probs when given, else the old log-probs). Detached.

    Raises:
        ValueError: ``divergence`` not ``"tv"`` or ``"kl"``; a negative threshold.
    """
    if divergence not in ("tv", "kl"):
        raise ValueError(f"divergence: expected 'tv' or 'kl', got {divergence!r}")
    check_nonnegative("delta_low", delta_low)
    check_nonnegative("delta_high", delta_high)
    ok_pos, ok_neg = _dppo_in_trust_region(log_probs.detach(), behaviour_log_probs.detach(), divergence, delta_low, delta_high)
    return torch.where(advantages > 0, ok_pos, torch.where(advantages < 0, ok_neg, torch.ones_like(ok_pos)))


def _dppo(lp, old, adv, m, eps_clip_low: float, eps_clip_high: float, dppo_divergence: str, dppo_ratio_cap: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    with torch.no_grad():
        ratio = safe_ratio(log_ratio)
        w = torch.clamp(ratio, max=dppo_ratio_cap)
        ok_pos, ok_neg = _dppo_in_trust_region(lp, old, dppo_divergence, eps_clip_low, eps_clip_high)
        pos = adv > 0
        valid = torch.where(pos, ok_pos, ok_neg)
    loss = -adv * (w * valid.to(w.dtype)) * lp
    metrics = ratio_metrics(log_ratio, m, clipped_low=~valid & ~pos, clipped_high=~valid & pos)
    metrics["ratio_cap_frac"] = masked_mean(((ratio > dppo_ratio_cap) & valid).to(w.dtype), m)
    return clean(loss, m), metrics

