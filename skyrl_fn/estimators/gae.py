"""Generalized Advantage Estimation with a critic (PPO): ``gae_raw`` and ``gae = chain(gae_raw, whiten())``.

Notation: ``B`` samples, ``T`` response tokens, ``m`` the response mask, ``V`` the critic values.
"""

from __future__ import annotations

import torch

from skyrl_fn.core.compose import Chain, chain
from skyrl_fn.estimators._groups import accum_dtype
from skyrl_fn.estimators._whiten import whiten
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.requires import requires

__all__ = ["gae", "gae_raw"]


@requires("values")
@torch.no_grad()
def gae_raw(batch: AdvantageInput, *, gamma: float = 1.0, lambd: float = 1.0) -> AdvantageOutput:
    """GAE advantages and returns (Schulman et al. 2016, arXiv:1506.02438), not whitened.

    The masked recursion of verl's ``compute_gae_advantage_return``, backwards over time with
    ``nv = 0`` and ``L = 0`` after the last token::

        delta_t = r_t + gamma * nv - V_t
        L       = delta_t + gamma * lambd * L       if m_t else L    (masked tokens are skipped:
        nv      = V_t                               if m_t else nv    they neither bootstrap nor
        Ahat_t  = L                                                   accumulate)

        returns_t = (Ahat_t + V_t) * m_t
        A_t       = Ahat_t * m_t

    ``lambd = 1`` gives ``Ahat_t = (discounted return-to-go) - V_t``; ``lambd = 0`` gives the
    one-step TD error. The built-in ``gae`` (SkyRL-Train's and verl's GAE) is this estimator
    chained with ``whiten()``; the raw form is registered as ``gae_raw`` for losses or transforms
    that want the unnormalised advantages (rlax's and the paper's GAE), e.g.
    ``chain(gae_raw, clip_advantages(5.0))``. Needs critic values (declared with ``requires``, so
    every chain built on it reports that it needs a critic).

    SkyRL-Train's GAE runs the same recursion without skipping masked tokens
    (``nv = V_{t+1}`` always) and leaves padding unmasked. For right-padded responses whose
    values and rewards are 0 on the padding, the two agree on every response token (the padding
    then contributes ``delta = 0`` and carries ``L = 0``).

    Deviations: outputs are zeroed off the mask; rewards and values off the mask never reach the
    result (they may be NaN). The loop over ``T`` is vectorised over ``B`` (the recursion is
    sequential in time). The advantages come back as a ``[B, T]`` transposed view of the
    time-major buffer the recursion fills; ``whiten`` reads them in that order.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``values [B, T]``.
        gamma: discount.
        lambd: GAE trace-decay ``lambda``.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]``.

    Raises:
        ValueError: ``batch.values`` is missing.
    """
    if batch.values is None:
        raise ValueError(
            "values: gae needs critic values, expected a [B, T] tensor in AdvantageInput.values, got None"
        )
    dtype = batch.token_level_rewards.dtype
    acc = accum_dtype(dtype)
    mask = batch.response_mask
    b, t_len = mask.shape
    # Time-major [T, B] copies make each step read one contiguous row. Rewards and values off the
    # mask are read but never selected (torch.where), so NaN there cannot reach the result.
    m = mask.T.contiguous()
    r = torch.empty(t_len, b, dtype=acc, device=mask.device).copy_(batch.token_level_rewards.T)
    v = torch.empty(t_len, b, dtype=acc, device=mask.device).copy_(batch.values.T)
    adv = torch.empty_like(r)
    next_value = torch.zeros(b, dtype=acc, device=r.device)
    last = torch.zeros(b, dtype=acc, device=r.device)
    for t in range(t_len - 1, -1, -1):
        delta = r[t] + gamma * next_value - v[t]
        last = torch.where(m[t], delta + (gamma * lambd) * last, last)
        next_value = torch.where(m[t], v[t], next_value)
        adv[t] = last
    zero = torch.zeros((), dtype=acc, device=r.device)
    # Returns in [B, T] through one transposing copy (element-wise ops reading a transposed view
    # are several times slower than copy_'s transpose); the advantages stay time-major.
    returns = torch.empty(b, t_len, dtype=acc, device=r.device).copy_(adv.T)
    returns.add_(batch.values.to(acc))
    torch.where(mask, returns, zero, out=returns)
    torch.where(m, adv, zero, out=adv)
    return AdvantageOutput(advantages=adv.T.to(dtype), returns=returns.to(dtype))


gae: Chain = chain(gae_raw, whiten())
"""GAE whitened over the batch, as SkyRL-Train's and verl's GAE: ``chain(gae_raw, whiten())``::

    A_t = (Ahat_t - mean(Ahat)) / sqrt(var(Ahat) + 1e-8) * m_t

with ``Ahat`` from :func:`gae_raw` and ``mean``/``var`` (unbiased) over the valid tokens of the
whole batch; returns are ``gae_raw``'s. Call it as ``gae(batch, gamma=..., lambd=...)``.

Deviation: with fewer than 2 valid tokens the variance is taken as 0 (the peers raise). For
float32/float64 values this is bit for bit the fused GAE of earlier versions; with
half-precision values ``Ahat`` is rounded to that dtype before whitening (the fused form whitened
the float32 values).
"""
