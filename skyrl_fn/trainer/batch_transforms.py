"""Batch transforms in the training loop: from the sampled batches of one step to the batch the
update trains on, and the per-step counts of what was kept and dropped.

The transforms themselves are pure functions over ``skyrl_fn.transforms.SampleBatch`` (the table
kind ``batch_transform``); ``run.batch_transforms`` holds them bound in order. This module

* converts a sampled ``Generated`` batch to a ``SampleBatch`` and applies the result back
  (:func:`sample_batch_of`, :func:`apply_sample_batch`: rows kept or repeated, scores, loss mask);
* joins the transformed batches of several rollouts and keeps the first ``P`` groups
  (:func:`collect`, a pure function the workers run where the batches live);
* drives the refill (:func:`transform_step`, called once per step by the loop): while fewer than
  ``P`` prompt groups are kept and the transforms' budget (``SampleBatch.sample_batches``, raised by
  ``dynamic_sampling``) allows, sample further prompts.

When the budget runs out with fewer than ``P`` groups the step trains on the groups it has
(``batch_exhausted = 1``); with none at all the step is skipped (``skipped = 1`` and a reason;
``trainer.max_consecutive_skips`` in a row stop the run). DAPO (verl) and SkyRL raise an error
instead.

Metrics of each step (``batch_*``): ``sampled_batches``, ``sampled_groups``, ``kept_groups``,
``dropped_groups`` (removed by a transform), ``surplus_groups`` (kept but beyond ``P``),
``sequences`` (rows trained on), ``loss_masked`` (rows with tokens taken out of the loss),
``shaped`` (rows whose score a transform changed), ``score_shift`` (mean change of those scores),
``budget``, ``exhausted``, ``sampled_reward`` (mean score of every sampled row, before any
transform: what the policy scores, where ``reward`` is the mean of the batch trained on).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.rollout.base import concat_rollouts
from skyrl_fn.trainer.workers import Workers
from skyrl_fn.trainer.roles import Generated
from skyrl_fn.transforms import BatchPipeline, SampleBatch

__all__ = ["sample_batch_of", "apply_sample_batch", "collect", "refill_seed", "transform_step", "batch_totals"]

#: Per-step counts that add up over a run (``batch_totals``).
COUNTS = (
    "batch_sampled_batches", "batch_sampled_groups", "batch_kept_groups", "batch_dropped_groups", "batch_surplus_groups",
    "batch_sequences", "batch_loss_masked", "batch_shaped", "batch_exhausted",
)


def sample_batch_of(generated: Generated, *, max_new_tokens: int, seed: int) -> SampleBatch:
    """The ``SampleBatch`` of a sampled batch (``source`` = its rows in order).

    ``truncated`` is the rollout's (set by the backends); when a custom backend leaves it None a
    response is taken as truncated when its length is ``max_new_tokens``.
    """
    r = generated.rollout
    lengths = r.response_lengths()
    truncated = r.truncated if r.truncated is not None else lengths >= max_new_tokens
    return SampleBatch(
        scores=generated.scores, response_mask=r.response_mask, loss_mask=r.effective_loss_mask(), group_ids=r.group_ids,
        truncated=truncated, source=torch.arange(r.batch_size), max_response_length=int(max_new_tokens), seed=int(seed),
    )


def apply_sample_batch(generated: Generated, out: SampleBatch) -> Generated:
    """``generated`` with the rows of ``out`` (``out.source``), its scores and loss mask."""
    rollout = generated.rollout.select(out.source)
    rollout = attrs.evolve(rollout, loss_mask=rollout.response_mask & out.loss_mask)
    return Generated(rollout=rollout, scores=out.scores.to(generated.scores.dtype), seconds=generated.seconds)


def collect(
    parts: Sequence[Generated], *, pipeline: BatchPipeline, target_groups: int, group_size: int, max_new_tokens: int,
    seeds: Sequence[int], pad_id: int,
) -> tuple[Generated | None, dict[str, float]]:
    """Transform each sampled batch, join what they keep, keep the first ``P * G`` rows.

    Groups are counted in rows of ``G``: a group that ``dynamic_sampling(type="replace")`` copied
    shares its source's group id (one group of ``2G`` rows, as SkyRL) but fills two of the ``P``
    places. The first ``P * G`` rows are the first ``P`` groups (rows are prompt-major), as DAPO
    and SkyRL truncate.

    Args:
        parts: the step's sampled batches in order (``Generated``).
        pipeline: the run's bound transforms.
        target_groups: ``P``, groups the update wants.
        group_size: ``G``, rows per sampled group.
        max_new_tokens: ``L_max`` of the rollouts.
        seeds: the sampling seed of each part (given to the transforms as ``SampleBatch.seed``).
        pad_id: pad token id for joining batches of different widths.

    Returns:
        ``(batch or None when nothing is kept, metrics)``; see the module docstring for the
        metrics (``batch_budget`` is the most sampled batches any transform asked for).
    """
    kept, budget = [], 1
    sampled = dropped = masked = shaped = 0
    shift, reward = 0.0, []
    for gen, seed in zip(parts, seeds):
        before = sample_batch_of(gen, max_new_tokens=max_new_tokens, seed=seed)
        out = pipeline(before)
        reward.append(before.scores.double())
        budget = max(budget, out.sample_batches)
        sampled += before.num_groups()
        dropped += before.num_groups() - (out.num_groups() if out.batch_size else 0)
        if out.batch_size:
            src = out.source
            masked += int((out.loss_mask.sum(-1) < before.loss_mask[src].sum(-1)).sum())
            delta = out.scores.double() - before.scores[src].double()
            shaped += int((delta != 0).sum())
            shift += float(delta.sum())
            kept.append(apply_sample_batch(gen, out))
    metrics = {
        "batch_sampled_batches": float(len(parts)), "batch_sampled_groups": float(sampled),
        "batch_dropped_groups": float(dropped), "batch_loss_masked": float(masked), "batch_shaped": float(shaped),
        "batch_score_shift": shift / shaped if shaped else 0.0, "batch_budget": float(budget),
        "batch_sampled_reward": float(torch.cat(reward).mean()),
    }
    seconds = float(sum(g.seconds for g in parts))
    if not kept:
        metrics.update(batch_kept_groups=0.0, batch_surplus_groups=0.0, batch_sequences=0.0)
        return None, metrics
    rollout = concat_rollouts([g.rollout for g in kept], pad_id=pad_id)
    scores = torch.cat([g.scores for g in kept])
    rows, limit = rollout.batch_size, target_groups * group_size
    if rows > limit:
        keep = torch.arange(limit)
        rollout, scores = rollout.select(keep), scores[keep]
    metrics.update(
        batch_kept_groups=float(rollout.batch_size // group_size), batch_surplus_groups=float(max(0, rows - limit) // group_size),
        batch_sequences=float(rollout.batch_size),
    )
    return Generated(rollout=rollout, scores=scores, seconds=seconds), metrics


def refill_seed(seed: int, step: int, attempt: int) -> int:
    """The sampling seed of the ``attempt``-th extra batch (1-based) of ``step`` (pure, so a resumed
    run samples the same refills)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345 + attempt * 104_729_000_003) % (2**62)


def transform_step(
    run: ResolvedRun,
    workers: Workers,
    generated: Any,
    *,
    step: int,
    seed: int,
    refill: Callable[[int], Sequence[Any]],
) -> tuple[Any, dict[str, float]]:
    """Apply ``run.batch_transforms`` to the step's batch, sampling more prompts while fewer than
    ``P`` groups are kept and the budget allows (``Workers.transform`` runs :func:`collect` where
    the batches live).

    Args:
        run: the resolved run (``run.batch_transforms`` not None).
        workers: the run's workers.
        generated: the handle of the step's first sampled batch.
        step: 0-based step.
        seed: the sampling seed of the first batch.
        refill: ``refill(n)`` -> the next ``n`` prompts of the data stream.

    Returns:
        ``(handle of the batch to train on, or None when nothing was kept; metrics)``; the
        metrics include ``batch_exhausted`` (1: fewer than ``P`` groups when the budget ran out).
    """
    cfg = run.config
    target = cfg.trainer.prompts_per_step
    parts, seeds = [generated], [seed]
    while True:
        fn = functools.partial(
            collect, pipeline=run.batch_transforms, target_groups=target, group_size=cfg.rollout.samples_per_prompt,
            max_new_tokens=cfg.rollout.max_new_tokens, seeds=tuple(seeds),
        )
        handle, metrics = workers.transform(fn, *parts)
        if metrics["batch_kept_groups"] >= target or len(parts) >= metrics["batch_budget"]:
            break
        attempt = len(parts)
        seeds.append(refill_seed(cfg.trainer.seed, step, attempt))
        parts.append(workers.generate(refill(target), step=step, seed=seeds[-1]))
    metrics["batch_exhausted"] = float(metrics["batch_kept_groups"] < target)
    return (handle if metrics["batch_kept_groups"] > 0 else None), metrics


def batch_totals(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The per-step counts (:data:`COUNTS`) summed over ``history``, without the ``batch_``
    prefix (``exhausted``: steps that ran out of budget); empty when no step has them."""
    rows = [h for h in history if "batch_sampled_batches" in h]
    return {k.removeprefix("batch_"): float(sum(h.get(k, 0.0) for h in rows)) for k in COUNTS} if rows else {}
