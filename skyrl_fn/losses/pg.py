"""Log-probability policy gradients: REINFORCE, GPG, CISPO, rollout-IS, importance sampling, and the
supervised cross-entropy term.

Notation: ``B`` sequences, ``T`` response tokens, ``lp = log_probs`` (carries the gradient), ``A``
the advantages, ``m`` the loss mask, ``sg[.]`` stop-gradient. These losses weight ``-A * lp`` by a
stop-gradient coefficient (or, for ``importance_sampling``, use the ratio itself); they return the
per-token loss ``[B, T]`` (zero where ``m`` is 0) and the standard ratio metrics.
"""

from __future__ import annotations

import torch

from skyrl_fn.losses._common import check_batch, check_nonnegative, clean, ratio_metrics, run, safe_ratio
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput

__all__ = ["reinforce", "gpg", "cispo", "rollout_is", "importance_sampling", "cross_entropy"]


def _vanilla(lp, old, adv, m):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    return clean(-adv * lp, m), ratio_metrics(lp - old, m)


def reinforce(batch: PolicyLossInput) -> PolicyLossOutput:
    """Plain REINFORCE (Williams 1992): ``loss_t = -A_t * log_probs_t * m_t``.

    No ratio, no clipping (the ``old_log_probs`` only feed the metrics). SkyRL-Train's example
    custom loss ``reinforce`` reduces this with a plain mean (use ``token_mean``). No
    hyperparameters.

    Returns:
        ``token_loss [B, T]``; ratio metrics (clip fractions are 0).
    """
    check_batch(batch)
    return run(_vanilla, batch)


def gpg(batch: PolicyLossInput) -> PolicyLossOutput:
    """GPG, group policy gradient (Chu et al. 2025, arXiv:2504.02546), as verl's ``gpg``:
    ``loss_t = -A_t * log_probs_t * m_t``.

    The same per-token loss as ``reinforce``; GPG's distinguishing parts (group-normalised
    advantages and the batch correction factor) live in the advantage estimator and the
    aggregation (verl default ``token_mean``). No hyperparameters.
    """
    check_batch(batch)
    return run(_vanilla, batch)


def cispo(
    batch: PolicyLossInput, *, cispo_eps_clip_low: float = 0.0, cispo_eps_clip_high: float = 5.0
) -> PolicyLossOutput:
    """CISPO, clipped IS-weight policy optimisation (MiniMax-M1, arXiv:2506.13585)::

        r_t = exp(clamp(log_probs_t - old_log_probs_t, -20, 20))
        loss_t = -A_t * sg[clip(r_t, 1 - cispo_eps_clip_low, 1 + cispo_eps_clip_high)] * log_probs_t * m_t

    Unlike PPO no token loses its gradient: the clipped ratio is only a weight. Defaults as
    SkyRL-Train (``cispo_eps_clip_low = 0.0``, ``cispo_eps_clip_high = 5.0``; note the lower bound
    is then 1). SkyRL mapping: ``algorithm.cispo.cispo_eps_clip_low -> cispo_eps_clip_low``,
    ``algorithm.cispo.cispo_eps_clip_high -> cispo_eps_clip_high``.

    Returns:
        ``token_loss [B, T]``; ratio metrics; ``clip_frac_low`` (r < 1 - low), ``clip_frac_high``
        (r > 1 + high), ``clip_ratio`` their sum (as SkyRL's).
    """
    check_batch(batch)
    check_nonnegative("cispo_eps_clip_low", cispo_eps_clip_low)
    check_nonnegative("cispo_eps_clip_high", cispo_eps_clip_high)
    return run(_cispo, batch, 1.0 - cispo_eps_clip_low, 1.0 + cispo_eps_clip_high)


def _cispo(lp, old, adv, m, lo: float, hi: float):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    with torch.no_grad():
        ratio = safe_ratio(log_ratio)
        weight = torch.clamp(ratio, lo, hi)
    metrics = ratio_metrics(log_ratio, m, clipped_low=ratio < lo, clipped_high=ratio > hi)
    return clean(-adv * weight * lp, m), metrics


def rollout_is(batch: PolicyLossInput, *, eps_clip_low: float = 0.2, eps_clip_high: float = 0.2) -> PolicyLossOutput:
    """Rollout importance-weighted policy gradient, as SkyRL-Train's ``rollout_is`` (for async
    training where the trainer's old log-probs are unavailable)::

        r_t = exp(clamp(log_probs_t - rollout_log_probs_t, -20, 20))
        f_t = r_t if 1 - eps_clip_low < r_t < 1 + eps_clip_high else 0
        loss_t = -sg[f_t] * A_t * log_probs_t * m_t

    Like CISPO against the rollout policy, with a hard zero outside the trust interval. Defaults
    as SkyRL-Train (``eps_clip_low = eps_clip_high = 0.2``; mapping by name).

    Returns:
        ``token_loss [B, T]``; ratio metrics of ``r`` (against the rollout policy);
        ``clip_frac_low`` / ``clip_frac_high``: tokens zeroed below / above the interval;
        ``approx_kl`` against ``old_log_probs``.

    Without ``batch.rollout_log_probs`` (SkyRL asserts they are there) the old policy is taken as
    the sampling policy: synchronous training, where the two coincide up to kernel numerics.
    """
    check_batch(batch)
    check_nonnegative("eps_clip_low", eps_clip_low)
    check_nonnegative("eps_clip_high", eps_clip_high)
    roll = batch.rollout_log_probs if batch.rollout_log_probs is not None else batch.old_log_probs
    return run(_rollout_is, batch, roll, float(eps_clip_low), float(eps_clip_high))


def _rollout_is(lp, old, adv, m, roll, eps_clip_low: float, eps_clip_high: float):
    lp, old, adv, roll = clean(lp, m), clean(old, m), clean(adv, m), clean(roll, m)
    log_ratio = lp - roll
    with torch.no_grad():
        ratio = safe_ratio(log_ratio)
        low, high = ratio <= 1.0 - eps_clip_low, ratio >= 1.0 + eps_clip_high
        weight = torch.where(low | high, torch.zeros_like(ratio), ratio)
    metrics = ratio_metrics(log_ratio, m, clipped_low=low, clipped_high=high)
    metrics["approx_kl"] = ratio_metrics(lp - old, m)["approx_kl"]
    return clean(-weight * adv * lp, m), metrics


def importance_sampling(batch: PolicyLossInput) -> PolicyLossOutput:
    """Importance-sampled policy gradient, as SkyRL-Train's / Tinker's ``importance_sampling``::

        loss_t = -exp(clamp(log_probs_t - old_log_probs_t, -20, 20)) * A_t * m_t

    SkyRL reduces it with a plain sum (``token_sum``). Deviation: the log-ratio is clamped to
    +-20 before ``exp`` (SkyRL exponentiates unclamped), which only matters past ``e^20``.
    No hyperparameters.

    Returns:
        ``token_loss [B, T]``; ratio metrics, plus ``importance_ratio`` (= ``ratio_mean``).
    """
    check_batch(batch)
    return run(_importance_sampling, batch)


def _importance_sampling(lp, old, adv, m):
    lp, old, adv = clean(lp, m), clean(old, m), clean(adv, m)
    log_ratio = lp - old
    metrics = ratio_metrics(log_ratio, m)
    metrics["importance_ratio"] = metrics["ratio_mean"]
    return clean(-safe_ratio(log_ratio) * adv, m), metrics


def cross_entropy(batch: PolicyLossInput) -> PolicyLossOutput:
    """Supervised cross-entropy (negative log-likelihood) of the sampled tokens, as SkyRL-Train's
    ``cross_entropy``: ``loss_t = -log_probs_t * m_t``.

    ``old_log_probs`` and ``advantages`` are ignored (metrics only). SkyRL reduces it with a plain
    sum (``token_sum``); ``token_mean`` gives the usual per-token NLL. No hyperparameters.

    Returns:
        ``token_loss [B, T]``; ratio metrics; ``nll`` (mean over valid tokens).
    """
    check_batch(batch)
    return run(_cross_entropy, batch)


def _cross_entropy(lp, old, adv, m):
    lp, old = clean(lp, m), clean(old, m)
    metrics = ratio_metrics(lp - old, m)
    metrics["nll"] = -(lp.detach().sum() / m.sum().clamp(min=1).to(lp.dtype))
    return clean(-lp, m), metrics
