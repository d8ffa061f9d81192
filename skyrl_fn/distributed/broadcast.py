"""The driver's side of the NCCL weight broadcast to vLLM engines on their own GPUs
(``--gpu.no-colocate``; the wire format and both ends are ``skyrl_fn.rollout.weight_sync``).

The trainer side is one or more actors called together, rank 0 first: the single policy actor
(``PolicyTrainer``), or the ``W`` data-parallel ranks (``PolicyRank``), which gather the full
weights (a collective) and of which rank 0 sends. Every engine's tensor-parallel workers join
the group after the trainer (``weight_sync.broadcast_ranks``). Both sides of each call are
started together and waited for with ``--gpu.sync-timeout-s``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from skyrl_fn.rollout.weight_sync import broadcast_ranks

__all__ = ["form_group", "broadcast"]


def form_group(get: Callable, trainers: Sequence[Any], engines: Sequence[Any], *, tensor_parallel_size: int, timeout_s: float):
    """Form the sync group: ``trainers[0]`` names the rendezvous (``sync_address``), every
    trainer actor calls ``init_broadcast(host, port, world)`` (rank 0 becomes the group's rank 0)
    while every engine joins (``init_broadcast(host, port, offset, world)``). Returns the bucket
    plan rank 0 made (the engines receive it with each broadcast)."""
    host, port = get(trainers[0].sync_address.remote())
    world, offsets = broadcast_ranks(len(engines), tensor_parallel_size)
    refs = [t.init_broadcast.remote(host, port, world) for t in trainers]
    refs += [e.init_broadcast.remote(host, port, off, world) for e, off in zip(engines, offsets)]
    return get(refs, timeout=timeout_s, what="forming the NCCL weight-sync group")[0]


def broadcast(get: Callable, trainers: Sequence[Any], engines: Sequence[Any], plan: Any, *, timeout_s: float) -> None:
    """Send the trainer's current weights to every engine over NCCL; waits for both sides."""
    refs = [t.broadcast.remote() for t in trainers] + [e.receive_broadcast.remote(plan) for e in engines]
    get(refs, timeout=timeout_s, what="the NCCL weight broadcast")
