"""Optimal token baseline (OTB): a per-timestep group baseline weighted by cumulative path variance.

Notation: ``B`` samples, ``T`` response tokens, ``P`` groups. ``G_{i,t} = sum_{u >= t} r_{i,u} m_{i,u}``
is the reward-to-go, ``pi_{i,t} = exp(old_log_probs_{i,t})`` the sampling policy's probability of
the sampled token, ``q_{i,t} = sum_v pi(v)^2`` the sum of squared probabilities over the
vocabulary at that step. The per-token variance proxy and its running sum are::

    w_{i,t} = 1 - 2 pi_{i,t} + q_{i,t}         (= ||e_token - pi||^2 >= 0)
    W_{i,t} = sum_{u <= t} w_{i,u} m_{i,u}

both read from the batch's per-sample fields: ``extras["old_log_probs"]`` and
``extras["sum_pi_squared"]`` (``[B, T]``; declared with ``requires``, so a run that does not produce
them fails when it is resolved). With ``extras["rollout_is_weights"]`` present (``[B, T]``
truncated importance weights ``rho``), ``w`` is multiplied by ``rho^2`` (verl's IS correction).
"""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import accum_dtype
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.requires import requires

__all__ = ["optimal_token_baseline", "tir_optimal_token_baseline"]

#: ``w`` lies in ``[0, 2]`` for any distribution (``pi <= 1``, ``pi^2 <= q <= 1``).
_W_MAX = 2.0


def _path_variance(batch: AdvantageInput, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G [B, T], W [B, T])`` in ``acc``, both zero off the mask."""
    m = batch.response_mask
    zero = torch.zeros((), dtype=acc, device=m.device)
    r = torch.where(m, batch.token_level_rewards.to(acc), zero)
    g = r.flip(-1).cumsum(-1).flip(-1)
    for key in ("old_log_probs", "sum_pi_squared"):
        x = batch.extras.get(key)
        if x is None:
            raise ValueError(f"extras[{key!r}]: expected a [B, T] per-sample field (the optimal token baseline reads it), got none")
        if x.dim() != 2:
            raise ValueError(f"extras[{key!r}]: expected shape [B, T], got {tuple(x.shape)}")
    lp = torch.where(m, batch.extras["old_log_probs"].to(acc), zero)
    q = torch.where(m, batch.extras["sum_pi_squared"].to(acc), zero)
    w = (1.0 - 2.0 * torch.exp(lp.clamp(max=0.0)) + q).clamp(0.0, _W_MAX)
    rho = batch.extras.get("rollout_is_weights")
    if rho is not None:
        if rho.dim() != 2:
            raise ValueError(f"extras['rollout_is_weights']: expected shape [B, T], got {tuple(rho.shape)}")
        w = w * torch.where(m, rho.to(acc), zero).square()
    big = torch.finfo(acc).max
    cum = torch.where(m, w, zero).cumsum(-1).clamp(max=big)
    return torch.where(m, g, zero), torch.where(m, cum, zero)


def _zero_tail(lengths: torch.Tensor, ids: torch.Tensor, p: int, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tail_row [B] bool, second [B])``: the row is its group's unique longest member (longer
    than every other) and its baseline is zeroed from index ``second`` (the group's second-longest
    length) on, as verl's ``handle_zero_tail``."""
    neg = torch.full((p,), -1, dtype=lengths.dtype, device=lengths.device)
    member_len = torch.where(members, lengths, -1)
    longest = neg.scatter_reduce(0, ids, member_len, "amax")
    at_max = members & (lengths == longest[ids])
    n_max = torch.zeros(p, dtype=torch.long, device=lengths.device).index_add_(0, ids, at_max.long())
    second = neg.scatter_reduce(0, ids, torch.where(at_max, -1, member_len), "amax")
    tail = at_max & (n_max[ids] == 1) & (second[ids] >= 0)
    return tail, second[ids]


def _finish(batch: AdvantageInput, g: torch.Tensor, base: torch.Tensor) -> AdvantageOutput:
    dtype, m = batch.token_level_rewards.dtype, batch.response_mask
    big = torch.finfo(dtype).max
    zero = torch.zeros((), dtype=dtype, device=m.device)
    adv = torch.where(m, (g - base).clamp(-big, big).to(dtype), zero)
    returns = torch.where(m, g.clamp(-big, big).to(dtype), zero)
    return AdvantageOutput(advantages=adv, returns=returns)


def _token_baseline(batch: AdvantageInput, *, epsilon: float, handle_zero_tail: bool, by_valid_token: bool) -> AdvantageOutput:
    """Both estimators: the baseline of slot ``(group, j)``, where ``j`` is the position ``t`` or
    (``by_valid_token``) the valid-token index ``k``; groups count every row, or only non-empty
    rows. One ``index_add`` over the ``P * T`` slots (masked tokens add zeros)."""
    acc = accum_dtype(batch.token_level_rewards.dtype)
    g, cum = _path_variance(batch, acc)
    m = batch.response_mask
    ids, p = batch.group_ids, batch.num_groups
    b, t = g.shape
    lengths = m.sum(-1)
    if by_valid_token:
        index, members = (m.long().cumsum(-1) - 1).clamp(min=0), lengths > 0
    else:
        index, members = torch.arange(t, device=g.device).expand(b, t), torch.ones_like(lengths, dtype=torch.bool)
    slot = (ids[:, None] * t + index).reshape(-1)
    num = torch.zeros(p * t, dtype=acc, device=g.device).index_add_(0, slot, (g * cum).reshape(-1))
    den = torch.zeros(p * t, dtype=acc, device=g.device).index_add_(0, slot, cum.reshape(-1)) + epsilon
    n = torch.zeros(p, dtype=torch.long, device=g.device).index_add_(0, ids, members.long())
    base = torch.where((n[ids] < 2)[:, None], 0.0, (num / den).reshape(p, t)[ids[:, None], index])
    if handle_zero_tail:
        tail, second = _zero_tail(lengths, ids, p, members)
        base = torch.where(tail[:, None] & (index >= second[:, None]), 0.0, base)
    return _finish(batch, g, base)


@requires("extras.old_log_probs", "extras.sum_pi_squared")
@torch.no_grad()
def optimal_token_baseline(batch: AdvantageInput, *, epsilon: float = 1e-8, handle_zero_tail: bool = True) -> AdvantageOutput:
    """Optimal token baseline, aligned by position (verl's ``optimal_token_baseline``).

    For every group ``g`` of at least 2 samples and every position ``t`` (module notation)::

        b_{g,t}  = sum_{j in g} G_{j,t} W_{j,t} m_{j,t} / (sum_{j in g} W_{j,t} m_{j,t} + epsilon)
        A_{i,t}  = (G_{i,t} - b_{g(i),t}) * m_{i,t}

    the baseline that minimises the variance of the policy gradient when the per-token score norm
    is approximated by ``w`` (verl 0.9.1 ``compute_optimal_token_baseline_advantage``; the optimal
    baseline of Greensmith, Bartlett and Baxter 2004, "Variance Reduction Techniques for Gradient
    Estimates in Reinforcement Learning", https://www.jmlr.org/papers/v5/greensmith04a.html, made
    per-token). A size-1 group gets ``b = 0``
    (``A = G``). ``handle_zero_tail``: a group's unique longest sample gets ``b = 0`` from the
    second-longest length on (no other sample reaches those positions to form a baseline).

    Deviations: returns are zeroed off the mask (verl leaves the reward-to-go on masked positions
    inside a response). ``w`` is clamped to ``[0, 2]``, its range for any distribution, and
    ``old_log_probs`` to ``<= 0``, so invalid inputs cannot give a negative or infinite weight
    (verl: NaN/inf); on valid inputs the results are verl's. Statistics accumulate in float32
    (float64 for float64 rewards).

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``,
            ``extras["old_log_probs"] [B, T]``, ``extras["sum_pi_squared"] [B, T]``, optionally
            ``extras["rollout_is_weights"] [B, T]``.
        epsilon: added to the baseline's denominator.
        handle_zero_tail: zero the baseline past the second-longest sample of each group.

    Returns:
        ``AdvantageOutput``: ``advantages [B, T]`` and ``returns [B, T]`` (the reward-to-go ``G``).

    Raises:
        ValueError: a required field missing from ``batch.extras`` or not ``[B, T]``.
    """
    return _token_baseline(batch, epsilon=epsilon, handle_zero_tail=handle_zero_tail, by_valid_token=False)


@requires("extras.old_log_probs", "extras.sum_pi_squared")
@torch.no_grad()
def tir_optimal_token_baseline(batch: AdvantageInput, *, epsilon: float = 1e-8, handle_zero_tail: bool = True) -> AdvantageOutput:
    """Optimal token baseline aligned by the k-th response token (verl's
    ``tir_optimal_token_baseline``, for multi-turn / tool-integrated responses with masked holes).

    As :func:`optimal_token_baseline`, but samples are compared at their ``k``-th valid token
    (``k_{i,t} = sum_{u <= t} m_{i,u} - 1``) rather than at the same position ``t``, so tool
    outputs masked inside a response do not misalign them::

        b_{g,k}  = sum_{j in g} G_j[k] W_j[k] / (sum_{j in g} W_j[k] + epsilon)
        A_{i,t}  = (G_{i,t} - b_{g(i),k_{i,t}}) * m_{i,t}

    where ``X_j[k]`` is ``X`` at sample ``j``'s ``k``-th valid token (0 past its length). Samples
    without a valid token belong to no group; a group of one non-empty sample gets ``b = 0``.
    ``handle_zero_tail`` as in :func:`optimal_token_baseline`, over valid-token counts. On
    right-padded masks without holes the two estimators agree except for empty rows (which count
    as group members in the position-aligned form). The optimal baseline: Greensmith et al. 2004,
    https://www.jmlr.org/papers/v5/greensmith04a.html.

    Deviations: as :func:`optimal_token_baseline` (returns zeroed off the mask; ``w`` clamped to
    its valid range), and vectorised: one ``index_add`` over (group, k), no loop over samples.

    Args:
        batch: as :func:`optimal_token_baseline`.
        epsilon: added to the baseline's denominator.
        handle_zero_tail: zero the baseline past the second-longest sample of each group.

    Returns:
        ``AdvantageOutput``: ``advantages [B, T]`` and ``returns [B, T]`` (the reward-to-go ``G``).

    Raises:
        ValueError: a required field missing from ``batch.extras`` or not ``[B, T]``.
    """
    return _token_baseline(batch, epsilon=epsilon, handle_zero_tail=handle_zero_tail, by_valid_token=True)
