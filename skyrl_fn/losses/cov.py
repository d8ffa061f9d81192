"""Covariance-selected regularisation: Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism
of Reinforcement Learning for Reasoning Language Models", arXiv:2505.22617).

Both rank tokens by the covariance between advantage and log-probability,
``cov_t = (A_t - mean(A)) * (log_probs_t - mean(log_probs))`` (means over valid tokens), and treat
the high-covariance tokens specially, to keep entropy from collapsing.

Token selection is done with tensors only (no ``.item()``, no data-dependent shapes): counts are
tensors and ranks come from a stable ``argsort``, so the losses never force a device sync.
"""

from __future__ import annotations

import torch

from skyrl_fn.losses._common import check_batch, check_nonnegative, clean, masked_mean, ratio_metrics, run, safe_ratio
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput

__all__ = ["clip_cov", "kl_cov"]


def _covariance(adv: torch.Tensor, lp: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` ``(A - mean_m(A)) * (lp - mean_m(lp))``, detached."""
    adv, lp = adv.detach(), lp.detach()
    return (adv - masked_mean(adv, m)) * (lp - masked_mean(lp, m))


def _rank_desc(keys: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` rank of every entry of ``keys`` in descending order (0 = largest), ties by position."""
    flat = keys.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    return rank.reshape(keys.shape)


def _count(fraction: float, m: torch.Tensor) -> torch.Tensor:
    """``max(floor(fraction * sum(m)), 1)`` as a 0-dim int64 tensor (SkyRL/verl's count)."""
    n = m.sum().to(torch.float64)
    return torch.floor(fraction * n).to(torch.int64).clamp(min=1)


def clip_cov(
    batch: PolicyLossInput,
    *,
    eps_clip_low: float = 0.2,
    eps_clip_high: float = 0.2,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    clip_cov_seed: int = 0,
) -> PolicyLossOutput:
    """Clip-Cov: PPO whose gradient is also detached on a few random high-covariance tokens::

        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_clip_low, 1 + eps_clip_high))   (PPO, r unclamped
              beyond +-20)
        candidates: valid tokens not already clipped by PPO with clip_cov_lb < cov_t < clip_cov_ub
        S: max(floor(clip_cov_ratio * #valid), 1) candidates drawn uniformly at random
        loss_t = l_t * (0 if t in S else 1) * m_t

    Randomness: SkyRL-Train and verl draw ``S`` with the global RNG (``torch.randperm``); here the
    draw uses a private ``torch.Generator`` seeded with ``clip_cov_seed`` on the input's device,
    so the loss is a deterministic function of its inputs. Pass a different seed per step (e.g.
    the global step) for fresh draws.

    Defaults as SkyRL-Train (``clip_ratio = 0.0002``, ``clip_cov_lb = 1.0``, ``clip_cov_ub =
    5.0``). SkyRL mapping: ``algorithm.clip_cov.clip_ratio -> clip_cov_ratio``,
    ``algorithm.clip_cov.clip_cov_lb -> clip_cov_lb``, ``algorithm.clip_cov.clip_cov_ub ->
    clip_cov_ub``, ``eps_clip_low`` / ``eps_clip_high`` by name; ``clip_cov_seed`` has no SkyRL
    counterpart.

    Returns:
        ``token_loss [B, T]``; ratio metrics with PPO's clip fractions; ``cov_clip_frac`` (fraction
        of valid tokens in ``S``) and ``clip_ratio`` set to it (SkyRL's metric for this loss).
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    if not isinstance(clip_cov_ratio, (int, float)) or not 0 < clip_cov_ratio <= 1:
        raise ValueError(f"clip_cov_ratio: expected a fraction in (0, 1], got {clip_cov_ratio!r}")
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"clip_cov_lb, clip_cov_ub: expected clip_cov_lb < clip_cov_ub, got {clip_cov_lb!r}, {clip_cov_ub!r}")
    if not isinstance(clip_cov_seed, int) or isinstance(clip_cov_seed, bool):
        raise TypeError(f"clip_cov_seed: expected an int, got {type(clip_cov_seed).__name__}")
    lp = batch.log_probs
    gen = torch.Generator(device=lp.device)
    gen.manual_seed(clip_cov_seed)
    keys = torch.rand(lp.shape, generator=gen, device=lp.device, dtype=torch.float32)
    hyper = (float(eps_clip_low), float(eps_clip_high), float(clip_cov_ratio), float(clip_cov_lb), float(clip_cov_ub))
    return run(_clip_cov, batch, keys, *hyper)


def _clip_cov(lp, old, adv, m, keys, eps_clip_low: float, eps_clip_high: float, clip_cov_ratio: float,
              clip_cov_lb: float, clip_cov_ub: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    ratio = safe_ratio(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - eps_clip_low, 1.0 + eps_clip_high)
    with torch.no_grad():
        clipped = loss2 > loss1
        cov = _covariance(adv, lp, m)
        cand = m & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        keys = torch.where(cand, keys, torch.full_like(keys, -1.0))
        selected = cand & (_rank_desc(keys) < _count(clip_cov_ratio, m))
    loss = torch.where(selected, torch.zeros_like(loss1), torch.maximum(loss1, loss2))
    metrics = ratio_metrics(log_ratio, m, clipped_low=clipped & (adv < 0), clipped_high=clipped & (adv > 0))
    metrics["cov_clip_frac"] = masked_mean(selected.to(lp.dtype), m)
    metrics["clip_ratio"] = metrics["cov_clip_frac"]
    return clean(loss, m), metrics


def kl_cov(batch: PolicyLossInput, *, kl_cov_frac: float = 0.2, ppo_kl_coef: float = 1.0) -> PolicyLossOutput:
    """KL-Cov: the unclipped policy gradient with an ``|log r|`` penalty on the top-covariance tokens::

        l_t = -A_t r_t
        S: the max(floor(kl_cov_frac * #valid), 1) valid tokens with the largest cov_t
        loss_t = (l_t + ppo_kl_coef * |log_probs_t - old_log_probs_t|  if t in S  else  l_t) * m_t

    Ties in ``cov`` go to the earlier (row-major) token. Defaults as SkyRL-Train
    (``kl_cov_frac = 0.2``, ``ppo_kl_coef = 1.0``; verl's ``kl_cov_ratio`` defaults to 0.0002).
    SkyRL mapping: ``algorithm.kl_cov.kl_cov_frac -> kl_cov_frac``,
    ``algorithm.kl_cov.ppo_kl_coef -> ppo_kl_coef``.

    Returns:
        ``token_loss [B, T]``; ratio metrics (clip fractions 0, ``clip_ratio`` 0 as SkyRL's);
        ``kl_cov_selected_frac``; ``approx_kl_abs`` (mean ``|log r|``, verl's ``ppo_kl`` here).
    """
    check_batch(batch)
    if not isinstance(kl_cov_frac, (int, float)) or not 0 < kl_cov_frac <= 1:
        raise ValueError(f"kl_cov_frac: expected a fraction in (0, 1], got {kl_cov_frac!r}")
    check_nonnegative("ppo_kl_coef", ppo_kl_coef)
    return run(_kl_cov, batch, float(kl_cov_frac), float(ppo_kl_coef))


def _kl_cov(lp, old, adv, m, kl_cov_frac: float, ppo_kl_coef: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    loss1 = -adv * safe_ratio(log_ratio)
    abs_kl = log_ratio.abs()
    with torch.no_grad():
        cov = _covariance(adv, lp, m)
        keys = torch.where(m, cov, torch.full_like(cov, float("-inf")))
        selected = m & (_rank_desc(keys) < _count(kl_cov_frac, m))
    loss = torch.where(selected, loss1 + ppo_kl_coef * abs_kl, loss1)
    metrics = ratio_metrics(log_ratio, m)
    metrics["kl_cov_selected_frac"] = masked_mean(selected.to(lp.dtype), m)
    metrics["approx_kl_abs"] = masked_mean(abs_kl.detach(), m)
    return clean(loss, m), metrics
