"""Baselines and the estimator made from one: ``outcome_estimator(baseline=...)``.

A baseline is a pure function ``baseline(scores [B], group_ids [B], num_groups) -> [B]`` of the
outcome scores ``s_i = sum_t r_{i,t} m_{i,t}`` (in the accumulation dtype), the dense group ids
``0..P-1`` and ``P``. Every baseline here is vectorised (``index_add`` / sorting, no Python loop
over groups or samples).

Notation: ``B`` samples, ``T`` response tokens, ``P`` groups; group ``g(i)`` has ``n`` samples.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch

from skyrl_fn.core._checks import check_finite
from skyrl_fn.core.compose import piece_name
from skyrl_fn.estimators import _groups
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput

__all__ = ["group_mean", "leave_one_out", "batch_mean", "group_median", "OutcomeEstimator", "outcome_estimator"]

Baseline = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def group_mean(scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B]`` the mean score of each sample's group::

        b_i = mean_{j in g(i)} s_j          (n > 1)
        b_i = 0                             (n = 1, as GRPO in SkyRL-Train/verl)

    With :func:`outcome_estimator` this is Dr. GRPO (arXiv:2503.20783), the built-in ``dr_grpo``.
    A size-1 group has no peers to compare with, so its sample is scored by its raw reward.

    Args:
        scores: ``[B]`` floating outcome scores.
        group_ids: ``[B]`` int64 dense ids ``0..P-1``.
        num_groups: ``P``.
    """
    count = _groups.group_count(group_ids, num_groups, scores.dtype)
    mean = _groups.group_mean(scores, group_ids, num_groups, count)
    return torch.where(count < 2, 0.0, mean)[group_ids]


def leave_one_out(scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B]`` the mean score of the *other* samples of each sample's group::

        b_i = (sum_{j in g(i)} s_j - s_i) / (n - 1)      (n > 1)
        b_i = s_i                                       (n = 1: no other sample, so A = 0)

    With :func:`outcome_estimator` this is RLOO (Kool et al. 2019; Ahmadian et al. 2024,
    arXiv:2402.14740), the built-in ``rloo`` (equal up to rounding).

    Args:
        scores: ``[B]`` floating outcome scores.
        group_ids: ``[B]`` int64 dense ids ``0..P-1``.
        num_groups: ``P``.
    """
    count = _groups.group_count(group_ids, num_groups, scores.dtype)[group_ids]
    total = _groups.group_sum(scores, group_ids, num_groups)[group_ids]
    others = (total - scores) / (count - 1).clamp(min=1)
    return torch.where(count < 2, scores, others)


def batch_mean(scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B]`` the mean score of the whole batch, ``b_i = 1/B sum_j s_j`` (ignores the groups).

    Args:
        scores: ``[B]`` floating outcome scores.
        group_ids: ``[B]`` (unused).
        num_groups: ``P`` (unused).
    """
    return scores.mean().expand(scores.shape[0]).clone()


def group_median(scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B]`` the median score of each sample's group::

        b_i = median_{j in g(i)} s_j        (n > 1; the mean of the two middle values when n is even)
        b_i = 0                             (n = 1, as group_mean)

    Robust to a few outlier rewards. Vectorised: one stable sort by score, one by group, then the
    middle elements are gathered at each group's offset.

    Args:
        scores: ``[B]`` floating outcome scores.
        group_ids: ``[B]`` int64 dense ids ``0..P-1``.
        num_groups: ``P``.
    """
    b = scores.shape[0]
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(group_ids[order], stable=True)]  # by group, then by score
    ordered = scores[order]
    count = torch.bincount(group_ids, minlength=num_groups)
    start = torch.cumsum(count, 0) - count
    lo = ordered[(start + (count - 1).clamp(min=0) // 2).clamp(max=b - 1)]
    hi = ordered[(start + count // 2).clamp(max=b - 1)]
    median = (lo + hi) / 2
    return torch.where(count < 2, 0.0, median)[group_ids]


@attrs.frozen(eq=False)
class OutcomeEstimator:
    """The advantage estimator ``A_{i,t} = (s_i - b_i) m_{i,t}`` for a baseline ``b``; build it
    with :func:`outcome_estimator`.

    Attributes:
        baseline: ``baseline(scores [B], group_ids [B], num_groups) -> [B]``.
    """

    baseline: Baseline

    __skyrl_kind__ = "advantage_estimator"

    @torch.no_grad()
    def __call__(self, batch: AdvantageInput) -> AdvantageOutput:
        """``AdvantageOutput`` with ``advantages [B, T]`` and ``returns [B, T]`` (the same tensor)."""
        scores = _groups.outcome_scores(batch.token_level_rewards, batch.response_mask)
        base = self.baseline(scores, batch.group_ids, batch.num_groups)
        where = f"baseline {piece_name(self.baseline)}"
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"{where}: expected it to return a torch.Tensor [B], got {type(base).__name__}")
        if tuple(base.shape) != (batch.batch_size,):
            raise ValueError(f"{where}: expected it to return shape [B] = ({batch.batch_size},), got {tuple(base.shape)}")
        check_finite(where, base)
        adv = scores - base.to(scores.dtype)
        out = _groups.broadcast_to_tokens(adv, batch.response_mask, batch.token_level_rewards.dtype)
        return AdvantageOutput(advantages=out, returns=out)

    def __repr__(self) -> str:
        return f"outcome_estimator(baseline={piece_name(self.baseline)})"


def outcome_estimator(*, baseline: Baseline = group_mean) -> OutcomeEstimator:
    """Turn a baseline into an outcome advantage estimator::

        s_i     = sum_t r_{i,t} m_{i,t}
        A_{i,t} = (s_i - baseline(s, group_ids, P)_i) * m_{i,t}

    Returns equal the advantages. ``outcome_estimator(baseline=group_mean)`` is Dr. GRPO,
    ``baseline=leave_one_out`` is RLOO; add ``group_normalize_std()`` after it for GRPO.

    Args:
        baseline: ``(scores [B], group_ids [B], num_groups) -> [B]``, pure and vectorised
            (``group_mean``, ``leave_one_out``, ``batch_mean``, ``group_median`` or your own).

    Returns:
        A frozen, picklable :class:`OutcomeEstimator` (kind ``advantage_estimator``, no
        hyperparameters), usable alone or as the estimator of a ``chain``.

    Raises:
        TypeError: ``baseline`` is not callable.
    """
    if not callable(baseline):
        raise TypeError(f"baseline: expected a callable (scores [B], group_ids [B], num_groups) -> [B], got {type(baseline).__name__}")
    return OutcomeEstimator(baseline)
