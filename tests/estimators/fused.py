"""The fused GAE and REINFORCE++ as they were before they became chains (commit 6cbd255).

Kept as the reference the chains ``gae = chain(gae_raw, whiten())`` and
``reinforce_plus_plus = chain(reinforce_plus_plus_raw, whiten())`` must equal bit for bit.
"""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import accum_dtype
from skyrl_fn.estimators._whiten import masked_whiten, whiten_stats
from skyrl_fn.estimators.reinforce import discounted_returns


def fused_gae(batch, *, gamma=1.0, lambd=1.0):
    dtype = batch.token_level_rewards.dtype
    acc = accum_dtype(dtype)
    mask = batch.response_mask
    b, t_len = mask.shape
    m = mask.T.contiguous()
    r = torch.empty(t_len, b, dtype=acc).copy_(batch.token_level_rewards.T)
    v = torch.empty(t_len, b, dtype=acc).copy_(batch.values.T)
    adv = torch.empty_like(r)
    next_value = torch.zeros(b, dtype=acc)
    last = torch.zeros(b, dtype=acc)
    for t in range(t_len - 1, -1, -1):
        delta = r[t] + gamma * next_value - v[t]
        last = torch.where(m[t], delta + (gamma * lambd) * last, last)
        next_value = torch.where(m[t], v[t], next_value)
        adv[t] = last
    mean, rstd = whiten_stats(adv, m)  # contiguous [T, B]: summed time-major
    zero = torch.zeros((), dtype=acc)
    adv = torch.empty(b, t_len, dtype=acc).copy_(adv.T)
    returns = torch.add(adv, batch.values.to(acc))
    torch.where(mask, returns, zero, out=returns)
    advantages = torch.where(mask, adv.sub_(mean).mul_(rstd), zero, out=adv)
    return advantages.to(dtype), returns.to(dtype)


def fused_reinforce_plus_plus(batch, *, gamma=1.0):
    dtype = batch.token_level_rewards.dtype
    returns = discounted_returns(batch.token_level_rewards, batch.response_mask, gamma=gamma)
    adv = masked_whiten(returns, batch.response_mask)
    return adv.to(dtype), returns.to(dtype)
