"""How one step's prompts and rollouts are laid out over the rollout actors.

``ray.rollout_workers`` picks the layout (see ``skyrl_fn.distributed.ray_workers``): 0 samples inside
the policy trainer; N >= 1 splits the prompts over N workers and joins their batches here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import attrs
import torch

from skyrl_fn.trainer.config import ResolvedRun
from skyrl_fn.rollout.base import RolloutBatch

__all__ = ["concat_rollouts", "split_prompts", "with_rollout_workers"]


def with_rollout_workers(run: ResolvedRun, n: int | None) -> ResolvedRun:
    """``run`` with ``ray.rollout_workers = n`` (``run`` itself when ``n`` is None or already so)."""
    if n is None or n == run.config.ray.rollout_workers:
        return run
    if n < 0:
        raise ValueError(f"num_rollout_workers: expected >= 0, got {n!r}")
    cfg = run.config
    return attrs.evolve(run, config=dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, rollout_workers=n)))


def concat_rollouts(parts: Sequence[Any], pad_id: int):
    """One ``RolloutBatch`` from per-worker batches (prompts left-padded, responses right-padded
    to the longest; group ids offset so prompt ``p`` of part ``k`` keeps its rows)."""

    if len(parts) == 1:
        return parts[0]
    lp = max(p.prompt_ids.shape[1] for p in parts)
    t = max(p.response_ids.shape[1] for p in parts)

    def left(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += p.num_prompts
    return RolloutBatch(
        prompt_ids=torch.cat([left(p.prompt_ids, lp, pad_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, lp, False) for p in parts]),
        response_ids=torch.cat([right(p.response_ids, t, pad_id) for p in parts]),
        response_mask=torch.cat([right(p.response_mask, t, False) for p in parts]),
        rollout_log_probs=torch.cat([right(p.rollout_log_probs, t, 0.0) for p in parts]),
        group_ids=torch.cat([p.group_ids + o for p, o in zip(parts, offsets)]),
        prompts=[s for p in parts for s in p.prompts],
        responses=[s for p in parts for s in p.responses],
    )


def split_prompts(items: Sequence[Any], n: int) -> list[list[Any]]:
    """``items`` in ``min(n, len(items))`` contiguous chunks whose sizes differ by at most one."""
    n = max(1, min(n, len(items)))
    k, r = divmod(len(items), n)
    out, i = [], 0
    for j in range(n):
        size = k + (1 if j < r else 0)
        out.append(list(items[i : i + size]))
        i += size
    return out
