"""SkyRL 0.3.0 trainer helpers for the train-vs-rollout log-prob drift metric (``worker_utils`` /
``trainer_utils``), so code that reports it runs unchanged.

Per micro-batch the worker emits the first and second moments and the extremes of
``|log_probs - rollout_logprobs|`` over the loss mask; moments average exactly across equal-size
micro-batches, mini-batches and ranks (``reduce_metrics``), and the std is derived at the end
(``finalize_minibatch_rollout_logprob_diff_std``). Notation: ``B`` sequences, ``T`` tokens.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from skyrl_fn.compat._functional import masked_mean

__all__ = [
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY",
    "MEAN_LOSS_METRICS",
    "compute_minibatch_rollout_logprob_diff_metrics",
    "reduce_metrics",
    "finalize_minibatch_rollout_logprob_diff_std",
]

MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX = "minibatch_rollout_logprobs_abs_diff"
MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY = f"{MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX}_mean"
MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY = f"{MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX}_sq_mean"
MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY = f"{MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX}_max"
MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY = f"{MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX}_min"
MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY = f"{MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX}_std"
#: ``*_loss`` metrics that are per-token means (never summed by ``reduce_metrics``).
MEAN_LOSS_METRICS = frozenset({"mtp_loss", "draft_loss"})


@torch.no_grad()
def compute_minibatch_rollout_logprob_diff_metrics(
    action_log_probs: torch.Tensor, rollout_logprobs: torch.Tensor | None, loss_mask: torch.Tensor | None
) -> dict[str, float]:
    """``{mean, sq_mean, max, min}`` of ``|action_log_probs - rollout_logprobs|`` ``[B, T]``: the
    moments over the mask (``masked_mean``), the extremes of ``|d| * m`` over all entries (so a
    fully masked micro-batch reports 0.0 for all four). ``{}`` without rollout log-probs."""
    if rollout_logprobs is None:
        return {}
    abs_diff = (action_log_probs - rollout_logprobs).abs()
    weighted = abs_diff if loss_mask is None else abs_diff * loss_mask
    return {
        MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY: masked_mean(abs_diff, loss_mask).item(),
        MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY: masked_mean(abs_diff.square(), loss_mask).item(),
        MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY: weighted.max().item(),
        MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY: weighted.min().item(),
    }


def reduce_metrics(metrics: Mapping[str, Sequence[float]], sum_loss_metrics: bool = False) -> dict[str, float]:
    """One value per key: ``max`` for ``*_max``, ``min`` for ``*_min``, the sum for ``loss`` /
    ``*_loss`` when ``sum_loss_metrics`` (pre-scaled losses; not ``MEAN_LOSS_METRICS``), else the
    mean. Keys whose values are not all numbers are skipped.

    Raises:
        ValueError: a key with no values.
    """
    out: dict[str, float] = {}
    for key, values in metrics.items():
        if len(values) == 0:
            raise ValueError(f"metrics[{key!r}]: expected at least one value, got none")
        if not all(isinstance(x, (int, float)) for x in values):
            continue
        if key.endswith("_max"):
            out[key] = max(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif sum_loss_metrics and (key == "loss" or key.endswith("_loss")) and key not in MEAN_LOSS_METRICS:
            out[key] = sum(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def finalize_minibatch_rollout_logprob_diff_std(metrics: dict[str, float]) -> None:
    """In place: replace the second moment by ``std = sqrt(max(E[x^2] - E[x]^2, 0))``; no-op
    when either moment is absent."""
    if MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY not in metrics or MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY not in metrics:
        return
    mean = metrics[MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY]
    sq_mean = metrics.pop(MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY)
    metrics[MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY] = math.sqrt(max(0.0, sq_mean - mean**2))
