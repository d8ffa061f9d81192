"""Group-relative outcome estimators: GRPO (and Dr. GRPO).

Notation: ``B`` samples, ``T`` response tokens, ``P`` groups (prompts) of ``G_p`` samples each.
"""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import (
    broadcast_to_tokens,
    group_count,
    group_mean,
    group_std,
    outcome_scores,
)
from skyrl_fn.records import AdvantageInput, AdvantageOutput

__all__ = ["grpo"]


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
