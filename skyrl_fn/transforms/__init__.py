"""Pieces for :func:`skyrl_fn.core.compose.chain`.

* reward transforms (before the estimator): ``scale_rewards``, ``shape_rewards``,
  ``weighted_sum``, ``length_penalty``;
* baselines ``(scores [B], group_ids [B], num_groups) -> [B]``: ``group_mean``, ``leave_one_out``,
  ``batch_mean``, ``group_median``, turned into an estimator by ``outcome_estimator(baseline=...)``;
* advantage transforms (after the estimator): ``whiten``, ``clip_advantages``,
  ``normalize_by_length``, ``group_normalize_std``.
"""

from skyrl_fn.transforms._advantages import clip_advantages, group_normalize_std, normalize_by_length, whiten
from skyrl_fn.transforms._baselines import (
    OutcomeEstimator,
    batch_mean,
    group_mean,
    group_median,
    leave_one_out,
    outcome_estimator,
)
from skyrl_fn.transforms._rewards import last_token, length_penalty, scale_rewards, shape_rewards, weighted_sum

__all__ = [
    "scale_rewards",
    "shape_rewards",
    "weighted_sum",
    "length_penalty",
    "last_token",
    "outcome_estimator",
    "OutcomeEstimator",
    "group_mean",
    "leave_one_out",
    "batch_mean",
    "group_median",
    "whiten",
    "clip_advantages",
    "normalize_by_length",
    "group_normalize_std",
]
