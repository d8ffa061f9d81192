"""Group-relative outcome estimators: GRPO (and Dr. GRPO), MaxRL, GPG, Pass@k GRPO, OPO.

Every estimator here reads the outcome score ``s_i = sum_t r_{i,t} m_{i,t}`` (the masked sum of
token rewards), compares it with statistics of its group, and writes the resulting scalar on every
response token of the sample. Returns equal the advantages (the same tensor).

Notation: ``B`` samples, ``T`` response tokens, ``P`` groups (prompts) of ``G_p`` samples each.
"""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import (
    broadcast_to_tokens,
    group_count,
    group_mean,
    group_std,
    group_sum,
    outcome_scores,
    outcome_scores_and_lengths,
)
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput

__all__ = ["grpo", "maxrl", "gpg", "grpo_passk", "opo"]


@torch.no_grad()
def grpo(batch: AdvantageInput, *, epsilon: float = 1e-6, norm_by_std: bool = True) -> AdvantageOutput:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

    With the outcome score ``s_i = sum_t r_{i,t} m_{i,t}`` and its group ``g(i)``::

        A_{i,t} = (s_i - mean_g(s)) / (std_g(s) + epsilon) * m_{i,t}     (norm_by_std=True)
        A_{i,t} = (s_i - mean_g(s)) * m_{i,t}                            (norm_by_std=False,
                                                                          Dr. GRPO, arXiv:2503.20783)

    ``std_g`` is the unbiased (n - 1) standard deviation, as ``torch.std`` and SkyRL-Train/verl.
    A size-1 group gets mean 0 and std 1 (as SkyRL-Train/verl), i.e. ``A = s / (1 + epsilon)``.
    A constant group gets ``A = 0``. Returns equal the advantages (the same tensor).

    Deviation: statistics accumulate in float32 for half-precision rewards (the peers accumulate in
    the input dtype); results for float32/float64 inputs are identical to the peers'.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.
        epsilon: added to the group std.
        norm_by_std: divide by the group std (GRPO) or not (Dr. GRPO).

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).
    """
    scores = outcome_scores(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = group_count(ids, p, scores.dtype)
    mean = group_mean(scores, ids, p, count)
    singleton = count < 2
    mean = torch.where(singleton, 0.0, mean)
    adv = scores - mean[ids]
    if norm_by_std:
        std = torch.where(singleton, 1.0, group_std(scores, ids, p, mean, count))
        adv = adv / (std[ids] + epsilon)
    out = broadcast_to_tokens(adv, batch.response_mask, batch.token_level_rewards.dtype)
    return AdvantageOutput(advantages=out, returns=out)


def _finite(adv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``adv`` clamped to the finite range of ``dtype`` (the output dtype), so the cast cannot overflow."""
    big = torch.finfo(dtype).max
    return adv.clamp(min=-big, max=big)


@torch.no_grad()
def maxrl(batch: AdvantageInput, *, epsilon: float = 1e-6) -> AdvantageOutput:
    """MaxRL outcome advantage (Tajwar et al. 2026, "Maximum Likelihood RL", arXiv:2602.02710).

    With the outcome score ``s_i`` and its group ``g(i)`` of ``n`` samples::

        A_{i,t} = (s_i - mean_g(s)) / (mean_g(s) + epsilon) * m_{i,t}       (n > 1)
        A_{i,t} = s_i * m_{i,t}                                             (n = 1: mean 0, no division)

    as SkyRL-Train's ``maxrl``: the group-centred score relative to the group mean. For 0/1
    rewards this divides the centred score by the group's pass rate, so rare successes get large
    advantages; an all-fail group gets 0. The paper assumes binary rewards.

    Deviation (negative rewards): ``mean_g + epsilon`` can be 0 or negative. A group whose
    denominator is exactly 0 (mean ``= -epsilon``) gets ``A = 0`` (the peers would give inf/NaN);
    a negative denominator is used as is (the sign of the advantages flips, as in the peers). Tiny
    denominators give large but finite advantages: results are clamped to the finite range of the
    output dtype, so half-precision outputs never overflow to inf.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.
        epsilon: added to the group mean in the denominator.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).
    """
    scores = outcome_scores(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = group_count(ids, p, scores.dtype)
    singleton = count < 2
    mean = torch.where(singleton, 0.0, group_mean(scores, ids, p, count))
    denom = torch.where(singleton, 1.0, mean + epsilon)
    zero = denom == 0
    ratio = (scores - mean[ids]) / torch.where(zero, 1.0, denom)[ids]
    adv = torch.where(zero[ids], 0.0, ratio)
    dtype = batch.token_level_rewards.dtype
    out = broadcast_to_tokens(_finite(adv, dtype), batch.response_mask, dtype)
    return AdvantageOutput(advantages=out, returns=out)


@torch.no_grad()
def gpg(batch: AdvantageInput, *, f_norm: float = 1.0) -> AdvantageOutput:
    """GPG outcome advantage (Chu et al. 2025, "GPG: A Simple and Strong RL Baseline", arXiv:2504.02546).

    With the outcome score ``s_i``, its group ``g(i)`` and the batch-wide correction ``alpha``::

        alpha    = B / max(#{i : s_i != 0}, 1)
        A_{i,t}  = alpha * (s_i - mean_g(s)) / f_norm * m_{i,t}

    as verl's ``compute_gpg_outcome_advantage``. A size-1 group gets mean 0 (``A = alpha s /
    f_norm``). ``alpha`` is taken over the whole batch, so GPG is not group-local: changing one
    group's scores can change every advantage.

    Deviation: the score is the *masked* sum of token rewards (verl sums every position); the two
    agree whenever rewards are 0 off the mask.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.
        f_norm: positive normaliser the centred score is divided by.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).

    Raises:
        ValueError: ``f_norm`` is not positive.
    """
    if not f_norm > 0:
        raise ValueError(f"f_norm: expected a positive number, got {f_norm!r}")
    scores = outcome_scores(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = group_count(ids, p, scores.dtype)
    mean = torch.where(count < 2, 0.0, group_mean(scores, ids, p, count))
    alpha = batch.batch_size / torch.count_nonzero(scores).clamp(min=1).to(scores.dtype)
    adv = alpha * (scores - mean[ids]) / f_norm
    dtype = batch.token_level_rewards.dtype
    out = broadcast_to_tokens(_finite(adv, dtype), batch.response_mask, dtype)
    return AdvantageOutput(advantages=out, returns=out)


@torch.no_grad()
def grpo_passk(batch: AdvantageInput, *, epsilon: float = 1e-6, norm_by_std: bool = True) -> AdvantageOutput:
    """Pass@k GRPO outcome advantage: only each group's best sample gets a non-zero advantage.

    Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and Exploitation" (as
    verl's ``compute_grpo_passk_outcome_advantage``, which cites arXiv:2503.19595). With the outcome
    score ``s_i``, its group's best score ``r_max`` at row ``i*`` and second-best ``r_2nd``::

        A_{i*,t} = (r_max - r_2nd) / (std_g(s) + epsilon) * m_{i*,t}     (norm_by_std=True)
        A_{i*,t} = (r_max - r_2nd) * m_{i*,t}                            (norm_by_std=False)
        A_{i,t}  = 0                                                      (every other i)

    ``std_g`` is unbiased (n - 1). Ties: ``i*`` is the first row (lowest index) holding ``r_max``
    (deterministic; verl's ``torch.topk`` leaves it unspecified). When the best score is tied,
    ``r_2nd = r_max`` and every advantage of the group is 0, so the tie-break never changes a value.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.
        epsilon: added to the group std.
        norm_by_std: divide the gap by the group std.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).

    Raises:
        ValueError: a group has fewer than 2 samples (as verl), naming the group and its row.
    """
    scores = outcome_scores(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = group_count(ids, p, scores.dtype)
    small = count < 2
    if bool(small.any()):
        g = int(torch.nonzero(small)[0, 0])
        row = int(torch.nonzero(ids == g)[0, 0])
        raise ValueError(
            f"grpo_passk: expected at least 2 samples in every group, got 1 in group {g} "
            f"(dense group id; row {row})"
        )
    b = batch.batch_size
    rows = torch.arange(b, device=scores.device)
    lowest = torch.full((p,), float("-inf"), dtype=scores.dtype, device=scores.device)
    r_max = lowest.scatter_reduce(0, ids, scores, "amax")
    first_max = torch.where(scores == r_max[ids], rows, b)
    i_max = torch.full((p,), b, device=scores.device).scatter_reduce(0, ids, first_max, "amin")
    best = rows == i_max[ids]
    r_2nd = lowest.scatter_reduce(0, ids, torch.where(best, float("-inf"), scores), "amax")
    gap = r_max - r_2nd
    if norm_by_std:
        gap = gap / (group_std(scores, ids, p, group_mean(scores, ids, p, count), count) + epsilon)
    adv = torch.where(best, gap[ids], 0.0)
    dtype = batch.token_level_rewards.dtype
    out = broadcast_to_tokens(_finite(adv, dtype), batch.response_mask, dtype)
    return AdvantageOutput(advantages=out, returns=out)


@torch.no_grad()
def opo(batch: AdvantageInput) -> AdvantageOutput:
    """OPO outcome advantage: score minus the length-weighted group baseline.

    Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline" (arXiv:2505.23585), as verl's
    ``compute_opo_outcome_advantage``. With the outcome score ``s_i`` and the response length
    ``len_i = sum_t m_{i,t}``::

        b_g     = sum_{i in g} len_i s_i / sum_{i in g} len_i
        A_{i,t} = (s_i - b_g) * m_{i,t}

    A size-1 group gets ``b = 0`` (as verl). Deviation: a group whose total length is 0 (every row
    fully masked) gets ``b = 0`` (verl divides 0 by 0 and gives NaN); its advantages are 0 anyway,
    since no token is on the mask.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).
    """
    scores, lengths = outcome_scores_and_lengths(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    total = group_sum(lengths, ids, p)
    empty = (group_count(ids, p, scores.dtype) < 2) | (total == 0)
    base = torch.where(empty, 0.0, group_sum(lengths * scores, ids, p) / torch.where(empty, 1.0, total))
    adv = scores - base[ids]
    dtype = batch.token_level_rewards.dtype
    out = broadcast_to_tokens(_finite(adv, dtype), batch.response_mask, dtype)
    return AdvantageOutput(advantages=out, returns=out)
