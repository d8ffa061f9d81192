"""How one step's prompts and rollouts are laid out over the rollout actors.

``ray.rollout_workers`` picks the layout (see ``skyrl_fn.distributed.ray_workers``): 0 samples inside
the policy trainer; N >= 1 splits the prompts over N workers and joins their batches here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import attrs

from skyrl_fn.rollout.base import concat_rollouts  # re-exported: the join lives with the record
from skyrl_fn.trainer.run import ResolvedRun

__all__ = ["concat_rollouts", "split_prompts", "with_rollout_workers"]


def with_rollout_workers(run: ResolvedRun, n: int | None) -> ResolvedRun:
    """``run`` with ``ray.rollout_workers = n`` (``run`` itself when ``n`` is None or already so)."""
    if n is None or n == run.config.ray.rollout_workers:
        return run
    if n < 0:
        raise ValueError(f"num_rollout_workers: expected >= 0, got {n!r}")
    cfg = run.config
    return attrs.evolve(run, config=dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, rollout_workers=n)))


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
