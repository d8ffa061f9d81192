"""Leave-one-out outcome estimator: RLOO.

Notation: ``B`` samples, ``T`` response tokens, ``P`` groups (prompts) of ``G_p`` samples each.
"""

from __future__ import annotations

import torch

from skyrl_fn.estimators._groups import broadcast_to_tokens, group_count, group_mean, outcome_scores
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput

__all__ = ["rloo"]


@torch.no_grad()
def rloo(batch: AdvantageInput) -> AdvantageOutput:
    """RLOO outcome advantage: the score minus the mean score of the *other* samples of its group.

    REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024, arXiv:2402.14740). With the outcome score ``s_i`` and its group ``g(i)``
    of ``n`` samples::

        A_{i,t} = (s_i - 1/(n-1) sum_{j in g, j != i} s_j) * m_{i,t}
                = (s_i - mean_g(s)) * n / (n - 1) * m_{i,t}            (n > 1)
        A_{i,t} = 0                                                    (n = 1)

    as SkyRL-Train's ``compute_rloo_outcome_advantage`` (a size-1 group has no other sample to
    form a baseline; SkyRL logs a warning, a pure function does not). Returns equal the advantages.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).
    """
    scores = outcome_scores(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = group_count(ids, p, scores.dtype)
    factor = torch.where(count < 2, 0.0, count / (count - 1).clamp(min=1))
    adv = (scores - group_mean(scores, ids, p, count)[ids]) * factor[ids]
    out = broadcast_to_tokens(adv, batch.response_mask, batch.token_level_rewards.dtype)
    return AdvantageOutput(advantages=out, returns=out)
