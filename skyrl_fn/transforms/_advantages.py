"""Advantage transforms: pieces applied after the estimator,
``(AdvantageOutput, AdvantageInput) -> AdvantageOutput``.

``whiten`` is defined beside the whitening statistics in ``skyrl_fn.estimators._whiten`` (the
built-in ``gae`` and ``reinforce++`` chains use it) and re-exported here.

Each builder checks its hyperparameters now and returns an :class:`AdvantageTransform` around a
``functools.partial`` of a module-level function (picklable with plain ``pickle``). They change the
advantages only; ``returns`` pass through unchanged. Statistics are taken in float32 (float64 for
float64 advantages) and cast back. Output stays zero wherever the response mask is 0.

Notation: ``B`` sequences, ``T`` response tokens, ``A`` advantages ``[B, T]``, ``m`` the response
mask ``[B, T]``, ``L_i = sum_t m_{i,t}``.
"""

from __future__ import annotations

import functools

import torch

from skyrl_fn.core._checks import check_number
from skyrl_fn.core.compose import AdvantageTransform
from skyrl_fn.estimators import _groups
from skyrl_fn.estimators._whiten import whiten
from skyrl_fn.estimators._whiten import with_advantages as _with_advantages
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput

__all__ = ["whiten", "clip_advantages", "normalize_by_length", "group_normalize_std"]


def _clip(out: AdvantageOutput, batch: AdvantageInput, *, max_abs: float) -> AdvantageOutput:
    return _with_advantages(out, batch, out.advantages.clamp(min=-max_abs, max=max_abs))


def clip_advantages(max_abs: float) -> AdvantageTransform:
    """Clip every advantage to ``[-max_abs, max_abs]``: ``A' = clamp(A, -max_abs, max_abs) * m``.

    Args:
        max_abs: finite, ``> 0``.

    Raises:
        TypeError / ValueError: ``max_abs`` is not a finite number ``> 0``.
    """
    max_abs = check_number("max_abs", max_abs, low=0.0, low_open=True)
    return AdvantageTransform(functools.partial(_clip, max_abs=max_abs), name=f"clip_advantages({max_abs!r})")


def _by_length(out: AdvantageOutput, batch: AdvantageInput) -> AdvantageOutput:
    acc = _groups.accum_dtype(out.advantages.dtype)
    lengths = batch.response_mask.sum(dim=-1).to(acc).clamp(min=1)
    return _with_advantages(out, batch, out.advantages.to(acc) / lengths[:, None])


def normalize_by_length() -> AdvantageTransform:
    """Divide each row's advantages by its response length: ``A'_{i,t} = A_{i,t} / L_i * m_{i,t}``
    (a row with ``L_i = 0`` stays 0). Summing the token advantages of a row then gives its mean."""
    return AdvantageTransform(_by_length, name="normalize_by_length()")


def _group_std(out: AdvantageOutput, batch: AdvantageInput, *, epsilon: float) -> AdvantageOutput:
    scores = _groups.outcome_scores(batch.token_level_rewards, batch.response_mask)
    ids, p = batch.group_ids, batch.num_groups
    count = _groups.group_count(ids, p, scores.dtype)
    mean = _groups.group_mean(scores, ids, p, count)
    std = torch.where(count < 2, 1.0, _groups.group_std(scores, ids, p, mean, count))
    adv = out.advantages.to(scores.dtype) / (std[ids] + epsilon)[:, None]
    return _with_advantages(out, batch, adv)


def group_normalize_std(*, epsilon: float = 1e-6) -> AdvantageTransform:
    """Divide each sample's advantages by the std of its group's outcome scores::

        A'_{i,t} = A_{i,t} / (std_{g(i)}(s) + epsilon) * m_{i,t}

    with ``s_i = sum_t r_{i,t} m_{i,t}`` of the batch the estimator saw and the unbiased (n - 1)
    std; a size-1 group gets std 1, as GRPO. So
    ``chain(outcome_estimator(baseline=group_mean), group_normalize_std())`` is GRPO.

    Args:
        epsilon: ``> 0``, added to the group std (a constant group has std 0).

    Raises:
        TypeError / ValueError: ``epsilon`` is not a finite number ``> 0``.
    """
    epsilon = check_number("epsilon", epsilon, low=0.0, low_open=True)
    return AdvantageTransform(functools.partial(_group_std, epsilon=epsilon), name=f"group_normalize_std(epsilon={epsilon!r})")
