"""GDPO: several reward components, each normalised within its group, then summed with weights.

Notation: ``B`` samples, ``T`` response tokens, ``K`` reward components, ``P`` groups. Component
``k`` of sample ``i`` has the outcome score ``s^k_i``: ``extras[key_k][i]`` for a ``[B]`` component,
the masked sum ``sum_t extras[key_k][i, t] m_{i,t}`` for a ``[B, T]`` one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from skyrl_fn.core.compose import Chain, chain
from skyrl_fn.estimators._groups import (
    accum_dtype,
    broadcast_to_tokens,
    group_count,
    group_mean,
    group_std,
    outcome_scores,
)
from skyrl_fn.estimators._whiten import whiten
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.requires import requires

__all__ = ["gdpo", "gdpo_raw", "component_scores"]


def component_scores(batch: AdvantageInput, reward_keys: Sequence[str]) -> list[torch.Tensor]:
    """``K`` outcome scores ``[B]`` (accumulation dtype), one per key of ``batch.extras``;
    ``[batch's own outcome score]`` when ``reward_keys`` is empty.

    Raises:
        ValueError: a key not in ``batch.extras`` (listing the keys it holds).
        TypeError: a component that is not a real (floating, integer or bool) tensor.
    """
    mask, acc = batch.response_mask, accum_dtype(batch.token_level_rewards.dtype)
    if not reward_keys:
        return [outcome_scores(batch.token_level_rewards, mask)]
    out = []
    for key in reward_keys:
        if key not in batch.extras:
            raise ValueError(f"reward_keys: {key!r} is not a per-sample field of the batch; extras hold {sorted(batch.extras)}")
        x = batch.extras[key]
        if x.dtype.is_complex:
            raise TypeError(f"extras[{key!r}]: expected a real reward component, got {x.dtype}")
        x = x.to(acc)
        out.append(x if x.dim() == 1 else outcome_scores(x, mask))
    return out


def _weights(reward_keys: Sequence[str], reward_weights: Sequence[float] | None) -> list[float]:
    if isinstance(reward_keys, str):
        raise TypeError(f"reward_keys: expected a sequence of extras keys, got the string {reward_keys!r}")
    k = max(len(reward_keys), 1)
    if reward_weights is None:
        return [1.0] * k
    weights = [float(w) for w in reward_weights]
    if len(weights) != k:
        raise ValueError(f"reward_weights: expected {k} weights (one per reward key {list(reward_keys)}), got {len(weights)}")
    if not all(w == w and abs(w) != float("inf") for w in weights):
        raise ValueError(f"reward_weights: expected finite numbers, got {weights}")
    return weights


@requires(fields_from=("reward_keys",))
@torch.no_grad()
def gdpo_raw(
    batch: AdvantageInput,
    *,
    reward_keys: tuple[str, ...] = (),
    reward_weights: tuple[float, ...] | None = None,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
) -> AdvantageOutput:
    """GDPO before the batch whitening: the weighted sum of per-component GRPO advantages.

    Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for
    Multi-reward RL" (arXiv:2601.05242). With component scores ``s^k_i`` (module docstring) and
    weights ``w_k``::

        A^k_i     = (s^k_i - mean_g(s^k)) / (std_g(s^k) + epsilon)     (norm_by_std=False: no division)
        A_{i,t}   = sum_k w_k A^k_i * m_{i,t}

    ``std_g`` is unbiased; a size-1 group gets mean 0 and std 1 per component (as ``grpo``). The
    components are ``batch.extras[key]`` for each of ``reward_keys`` (verl's
    ``algorithm.gdpo_reward_keys``; ``[B]`` or ``[B, T]``); with no keys the one component is the
    batch's own token rewards (verl's fallback), and ``gdpo_raw`` equals ``grpo``. Weights default
    to 1 (verl's ``gdpo_reward_weights``). :data:`gdpo` whitens the result over the batch's tokens.

    Args:
        batch: ``token_level_rewards [B, T]``, ``response_mask [B, T]``, ``group_ids [B]``,
            ``extras[key]`` ``[B]`` or ``[B, T]`` for each reward key.
        reward_keys: the ``extras`` keys of the components (empty: the token rewards).
        reward_weights: one finite weight per key (None: all 1).
        epsilon: added to each group std.
        norm_by_std: divide by the group std (GDPO) or not.

    Returns:
        ``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor).

    Raises:
        ValueError: a key not in ``batch.extras``; a weight count that differs from the key count.
    """
    weights = _weights(reward_keys, reward_weights)
    ids, p = batch.group_ids, batch.num_groups
    total = None
    for w, scores in zip(weights, component_scores(batch, tuple(reward_keys))):
        count = group_count(ids, p, scores.dtype)
        singleton = count < 2
        mean = torch.where(singleton, 0.0, group_mean(scores, ids, p, count))
        adv = scores - mean[ids]
        if norm_by_std:
            std = torch.where(singleton, 1.0, group_std(scores, ids, p, mean, count))
            adv = adv / (std[ids] + epsilon)
        total = w * adv if total is None else total + w * adv
    dtype = batch.token_level_rewards.dtype
    out = broadcast_to_tokens(total, batch.response_mask, dtype)
    return AdvantageOutput(advantages=out, returns=out)


gdpo: Chain = chain(gdpo_raw, whiten())
"""GDPO advantage (arXiv:2601.05242), as verl's ``compute_gdpo_outcome_advantage``:
``chain(gdpo_raw, whiten())``::

    A_{i,t} = whiten(sum_k w_k A^k_i)_{i,t}        (A^k: per-component GRPO, see gdpo_raw)

whitened over the valid tokens of the batch (``skyrl_fn.estimators._whiten.masked_whiten``:
unbiased variance, ``eps = 1e-8``, as verl's ``masked_whiten``). Hyperparameters are
``gdpo_raw``'s (``reward_keys``, ``reward_weights``, ``epsilon``, ``norm_by_std``).

Deviation: a batch with fewer than 2 valid tokens gives zeros (verl's ``masked_whiten`` raises),
as ``reinforce++`` and ``gae``. Reward components are per-sample fields of the batch
(``AdvantageInput.extras``), not read from a trainer config: the run binds ``reward_keys``.

Shapes: ``AdvantageInput [B, T]`` -> ``AdvantageOutput [B, T]`` (returns = advantages).
"""
