"""How one step's prompts and rollouts are laid out over the rollout actors.

``ray.rollout_workers`` picks the layout (see ``skyrl_fn.distributed.ray_workers``): 0 samples inside
the policy trainer; N >= 1 splits the prompts over N workers and joins their batches here
(:func:`sample_on`, used alike by the single policy actor's and the data-parallel ranks' runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import attrs
import torch

from skyrl_fn.models.model import load_tokenizer
from skyrl_fn.rollout.base import concat_rollouts  # re-exported: the join lives with the record
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.roles import Generated

__all__ = ["concat_rollouts", "split_prompts", "with_rollout_workers", "pad_id", "sample_on"]


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


def pad_id(run: ResolvedRun) -> int:
    """The pad token id of ``run``'s tokenizer, which :func:`sample_on` pads joined batches with
    (loaded once per run by the caller: a real model's tokenizer loads from disk)."""
    return int(load_tokenizer(run.config.model, alphabet=run.make_task().alphabet).pad_token_id)


def sample_on(rollout: Sequence[Any], examples: Sequence[Any], seed: int, *, pad: int | None, get: Callable) -> tuple[Any, Any]:
    """Sample ``examples`` on the rollout actors ``rollout`` (``RolloutWorker``): contiguous
    chunks (:func:`split_prompts`), worker ``i`` with seed ``seed + i``, so one worker samples
    exactly what a single trainer sampling itself would.

    Returns ``(reference of the Generated batch, reference of its sampling seconds)``: one
    worker's own results (the batch never passes through the driver), or, with several, the
    parts joined here (``get`` waits for them; padded with the pad id ``pad``, :func:`pad_id`,
    required then) and put back into the object store.
    """
    import ray

    chunks = split_prompts(examples, len(rollout))
    outs = [w.generate_split.options(num_returns=2).remote(c, seed + i) for i, (w, c) in enumerate(zip(rollout, chunks))]
    if len(outs) == 1:
        return outs[0][0], outs[0][1]
    if pad is None:
        raise ValueError(f"pad: expected the tokenizer's pad id to join the batches of {len(outs)} rollout workers, got None")
    parts = get([o[0] for o in outs])  # few workers: join the batches on the driver
    rollout_batch = concat_rollouts([p.rollout for p in parts], pad_id=pad)
    joined = Generated(rollout=rollout_batch, scores=torch.cat([p.scores for p in parts]), seconds=max(p.seconds for p in parts))
    return ray.put(joined), outs[0][1]
