"""REINFORCE-family estimators: REINFORCE++ (``reinforce_plus_plus_raw`` and
``reinforce_plus_plus = chain(reinforce_plus_plus_raw, whiten())``), REINFORCE++ with a group
baseline, ReMax.

Notation: ``B`` samples, ``T`` response tokens, ``P`` groups (prompts). ``m`` is the response mask.
"""

from __future__ import annotations

import math

import torch

from skyrl_fn.core import _alloc
from skyrl_fn.core.compose import Chain, chain
from skyrl_fn.estimators._groups import (
    accum_dtype,
    broadcast_to_tokens,
    group_count,
    group_mean,
    outcome_scores_and_lengths,
    row_blocks,
)
from skyrl_fn.estimators._whiten import masked_whiten_rows, whiten
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.requires import requires

__all__ = ["discounted_returns", "reinforce_plus_plus", "reinforce_plus_plus_raw", "reinforce_plus_plus_baseline", "remax"]

# Powers of gamma kept above this inside one chunk of the time axis, far from float64's
# underflow (~1e-308), so dividing by gamma^t loses no precision.
_MIN_POWER = 1e-150


def _chunk_length(gamma: float, t: int) -> int:
    """Longest stretch of time steps over which ``gamma ** length >= _MIN_POWER``."""
    if gamma >= 1.0:
        return t
    return max(1, min(t, int(math.log(_MIN_POWER) / math.log(gamma))))


def discounted_returns(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """``[B, T]`` discounted reward-to-go that restarts at every masked token, vectorised over time.

    SkyRL-Train's / verl's REINFORCE++ loop (``running = r_t + gamma running; x_t = running;
    running *= m_t``) computes::

        x_t = r_t + gamma * m_{t+1} * x_{t+1},        x_T = 0

    so the sum runs over the contiguous stretch of response tokens that starts at ``t``. With
    ``P_t = gamma^t``, ``C_t = sum_{s >= t} P_s r_s`` and ``z(t)`` the first ``u > t`` with
    ``m_u = 0`` (or ``T``), this is the closed form ``x_t = (C_t - C_{z(t)}) / P_t``, evaluated in
    float64 over chunks of the time axis short enough that ``gamma^chunk`` stays far from
    underflow (a carry links the chunks; one chunk for ``gamma >= 0.92`` up to ``T = 2048``).
    ``P`` falls with ``s``, so ``C_t`` carries no larger terms than ``P_t r`` and the difference
    loses no precision. Rows are processed in blocks (see ``row_blocks``) to keep temporaries small.

    Rewards off the mask are read as 0 and the result is 0 off the mask (on response tokens this
    equals the loop, which reads them but never carries them into a response token).

    Args:
        token_level_rewards: ``[B, T]`` floating.
        response_mask: ``[B, T]`` bool.
        gamma: discount in ``[0, 1]``.

    Returns:
        ``[B, T]`` in the accumulation dtype (float32, or float64 for float64 rewards).

    Raises:
        ValueError: ``gamma`` outside ``[0, 1]``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: expected a discount in [0, 1], got {gamma!r}")
    acc = accum_dtype(token_level_rewards.dtype)
    if gamma == 0.0:
        return torch.where(response_mask, token_level_rewards, 0).to(acc)
    b, t = token_level_rewards.shape
    out = _alloc.empty((b, t), acc, token_level_rewards.device)
    chunk = _chunk_length(gamma, t)
    power = gamma ** torch.arange(chunk + 1, dtype=torch.float64, device=out.device)  # P relative to a chunk start
    blocks = row_blocks(token_level_rewards)
    for start in blocks:
        rows = slice(start, start + blocks.step)
        out[rows] = _returns_block(token_level_rewards[rows], response_mask[rows], chunk, power)
    return out


def _returns_block(rewards: torch.Tensor, mask: torch.Tensor, chunk: int, power: torch.Tensor) -> torch.Tensor:
    """:func:`discounted_returns` of a block of rows, in float64, over time chunks from the end."""
    r = torch.where(mask, rewards, 0).to(torch.float64)
    b, t = r.shape
    steps = torch.arange(t, device=r.device)
    # first_zero[:, s] = first u >= s with m_u = 0 (or T); next_zero is the same for u > s.
    first_zero = torch.where(mask, t, steps).flip(-1).cummin(-1).values.flip(-1)
    next_zero = torch.cat([first_zero[:, 1:], torch.full((b, 1), t, device=r.device)], dim=1)
    out = torch.empty_like(r)
    carry = torch.zeros(b, dtype=r.dtype, device=r.device)  # m_end * x_end at the chunk's end
    for end in range(t, 0, -chunk):
        start = max(0, end - chunk)
        n = end - start
        c = (r[:, start:end] * power[:n]).flip(-1).cumsum(-1).flip(-1)
        c = torch.cat([c, torch.zeros(b, 1, dtype=c.dtype, device=c.device)], dim=1)  # C at the chunk end = 0
        z = (next_zero[:, start:end] - start).clamp(max=n)
        x = (c[:, :n] - c.gather(1, z)) / power[:n]
        # A stretch that runs to the chunk's end continues into the next chunk through the carry.
        x = x + torch.where(z == n, (power[n] / power[:n]) * carry[:, None], 0.0)
        out[:, start:end] = x
        carry = torch.where(mask[:, start], x[:, 0], 0.0)
    return torch.where(mask, out, 0.0)


@torch.no_grad()
def reinforce_plus_plus_raw(batch: AdvantageInput, *, gamma: float = 1.0) -> AdvantageOutput:
    """REINFORCE++ before whitening: the discounted reward-to-go as the advantage (Hu 2025,
    arXiv:2501.03262).

    With the discounted reward-to-go ``x`` (see :func:`discounted_returns`)::

        x_{i,t} = r_{i,t} + gamma * m_{i,t+1} * x_{i,t+1}
        A_{i,t} = x_{i,t} * m_{i,t}

    i.e. REINFORCE with reward-to-go and no baseline. The built-in ``reinforce++`` is this
    estimator chained with ``whiten()`` (:data:`reinforce_plus_plus`); the raw form is registered
    as ``reinforce++_raw`` so the whitening is a visible, replaceable piece (e.g.
    ``chain(reinforce_plus_plus_raw, clip_advantages(3.0))``) rather than a flag.

    Deviations: returns are zeroed off the mask (the peers leave the loop's values there). The
    return-to-go is computed without a loop over time and in float64 (see
    :func:`discounted_returns`), so it matches the loop to rounding.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``.
        gamma: discount in ``[0, 1]``.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).

    Raises:
        ValueError: ``gamma`` outside ``[0, 1]``.
    """
    returns = discounted_returns(batch.token_level_rewards, batch.response_mask, gamma=gamma)
    returns = returns.to(batch.token_level_rewards.dtype)
    return AdvantageOutput(advantages=returns, returns=returns)


reinforce_plus_plus: Chain = chain(reinforce_plus_plus_raw, whiten())
"""REINFORCE++ advantage: whitened discounted returns (Hu 2025, arXiv:2501.03262), as
SkyRL-Train's ``compute_reinforce_plus_plus_outcome_advantage``:
``chain(reinforce_plus_plus_raw, whiten())``::

    A_{i,t} = (x_{i,t} - mean(x)) / sqrt(var(x) + 1e-8) * m_{i,t}

with ``mean``/``var`` (unbiased) over the valid tokens of the whole batch; returns are ``x * m``.
Call it as ``reinforce_plus_plus(batch, gamma=...)``.

Deviation: with fewer than 2 valid tokens the variance is taken as 0 (the peers raise), so one
valid token gets ``A = 0`` and an all-masked batch gives zeros. For float32/float64 rewards this
is bit for bit the fused REINFORCE++ of earlier versions; with half-precision rewards ``x`` is
rounded to that dtype before whitening (the fused form whitened the float32 values).
"""


@torch.no_grad()
def reinforce_plus_plus_baseline(batch: AdvantageInput) -> AdvantageOutput:
    """REINFORCE++ with a group-mean baseline, whitened over the batch (arXiv:2501.03262).

    As verl's ``compute_reinforce_plus_plus_baseline_outcome_advantage``. With the outcome score
    ``s_i`` and its group ``g(i)``::

        a_i     = s_i - mean_g(s)                         (size-1 group: mean 0, a_i = s_i)
        A_{i,t} = (a_i - mean(a)) / sqrt(var(a) + 1e-8) * m_{i,t}

    where ``mean``/``var`` (unbiased) run over the valid *tokens* of the whole batch, so a sample
    weighs as many times as it has response tokens. Returns equal the advantages.

    Deviation: with fewer than 2 valid tokens the variance is taken as 0 (verl raises). The token
    statistics are computed from per-sample values and lengths (no ``[B, T]`` pass), equal to
    verl's up to rounding.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).
    """
    scores, lengths = outcome_scores_and_lengths(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = group_count(ids, p, scores.dtype)
    mean = torch.where(count < 2, 0.0, group_mean(scores, ids, p, count))
    adv = masked_whiten_rows(scores - mean[ids], lengths)
    out = broadcast_to_tokens(adv, batch.response_mask, batch.token_level_rewards.dtype)
    return AdvantageOutput(advantages=out, returns=out)


@requires("reward_baselines")
@torch.no_grad()
def remax(batch: AdvantageInput) -> AdvantageOutput:
    """ReMax advantage: reward-to-go minus the greedy rollout's reward (Li et al. 2023, arXiv:2310.10505).

    As verl's ``compute_remax_outcome_advantage``. With the per-sample baseline ``b_i`` (the
    reward of the greedy response, ``batch.reward_baselines``)::

        G_{i,t} = sum_{s >= t} r_{i,s} m_{i,s}           (returns)
        A_{i,t} = (G_{i,t} - b_i) * m_{i,t}

    Deviation: returns are zeroed off the mask too (verl leaves the reward-to-go at masked positions
    that precede response tokens); the two agree on every response token.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``reward_baselines [B]``.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]``.

    Raises:
        ValueError: ``batch.reward_baselines`` is missing.
    """
    if batch.reward_baselines is None:
        raise ValueError(
            "reward_baselines: remax needs the greedy rollout's reward per sample, "
            "expected a [B] tensor in AdvantageInput.reward_baselines, got None"
        )
    rewards, mask = batch.token_level_rewards, batch.response_mask
    dtype, acc = rewards.dtype, accum_dtype(rewards.dtype)
    baselines = batch.reward_baselines.to(acc)
    returns = _alloc.empty(tuple(rewards.shape), acc, rewards.device)
    advantages = _alloc.empty(tuple(rewards.shape), acc, rewards.device)
    zero = torch.zeros((), dtype=acc, device=rewards.device)
    # Row blocks keep the reward-to-go temporaries small (see ``row_blocks``).
    blocks = row_blocks(rewards)
    for start in blocks:
        rows = slice(start, start + blocks.step)
        m = mask[rows]
        to_go = torch.where(m, rewards[rows].to(acc), zero).flip(-1).cumsum(-1).flip(-1)
        torch.where(m, to_go, zero, out=returns[rows])
        torch.where(m, to_go - baselines[rows, None], zero, out=advantages[rows])
    return AdvantageOutput(advantages=advantages.to(dtype), returns=returns.to(dtype))
