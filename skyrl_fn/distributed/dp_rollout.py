"""Separate rollout workers for the data-parallel ranks (``--trainer.workers W`` with
``--ray.rollout-workers N``): the driver's side, used by :class:`~skyrl_fn.distributed.dp.DPWorkers`.

The rollout workers are the same ``RolloutWorker`` actors as with the single policy actor
(:class:`~skyrl_fn.distributed.ray_workers.RayWorkers`): on CPU ``ray.rollout_workers`` of them on
CPU shares; with ``--rollout.backend vllm`` one per vLLM engine of the GPU plan
(``skyrl_fn.distributed.placement``), each on its planned bundle. Prompts are split over them by
:func:`~skyrl_fn.distributed.layout.sample_on`, and after each update they receive the policy's
weights as one :class:`~skyrl_fn.distributed.weights.PackedWeights` through
``RolloutWorker.sync_packed``, queued before their next ``generate`` and checked by a
:class:`~skyrl_fn.distributed.sync_check.SyncTracker`. What differs is where the weights come
from: the ranks gather the full state dict once per update (``PolicyRank.packed_weights``, a
collective; rank 0 holds it, packed) and rank 0's result goes to every rollout worker.

A sampled batch stays a Ray reference until a step first uses it; then every rank receives it
(``PolicyRank.hold``) under the driver's key. Asynchronous training
(``--trainer.max-staleness K``, ``skyrl_fn.trainer.async_loop``) samples K steps ahead: those
batches wait as references (never in the ranks' store, which each update clears), and
``fetch_generated`` of one in flight reads it from the object store for a checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from skyrl_fn.distributed.actors import RolloutWorker
from skyrl_fn.distributed.layout import pad_id, sample_on
from skyrl_fn.distributed.failures import WorkerDiedError
from skyrl_fn.distributed.placement import PlacementPlan, actor_options
from skyrl_fn.distributed.ray_workers import CPU_SHARES
from skyrl_fn.distributed.sync_check import SyncTracker
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.roles import Generated

__all__ = ["RankRollouts"]


class RankRollouts:
    """``N`` rollout actors serving ``W`` policy ranks: ``ray.rollout_workers`` on CPU, or one
    per vLLM engine of ``plan``.

    Args:
        run: the resolved run (``ray.rollout_workers >= 1``, or a GPU plan).
        names: the driver's actor-id -> name map (the rollout workers are added to it).
        get: ``get(refs, timeout=..., what=...)``, the driver's wait that names a dead actor.
        plan: the run's GPU plan (``skyrl_fn.distributed.devices.gpu_plan``), None on CPU.
        placement_group: the plan's placement group (with ``plan``).
    """

    def __init__(
        self, run: ResolvedRun, names: dict[str, str], get: Callable, *, plan: PlacementPlan | None = None, placement_group: Any = None,
    ) -> None:
        import ray

        cfg = run.config
        n = cfg.ray.rollout_workers if plan is None else plan.num_engines
        self.get = get
        self.pad = pad_id(run) if n > 1 else None  # joins the workers' batches (sample_on)
        self.workers: list[Any] = []
        for i in range(n):
            if plan is None:
                opts = dict(num_cpus=CPU_SHARES["rollout"] / n)
            else:  # engine i on its bundle(s); a tp > 1 engine's vLLM workers join the group
                opts = actor_options(plan.of("rollout")[i], placement_group)
            handle = ray.remote(max_restarts=0)(RolloutWorker).options(**opts).remote(run)
            names[handle._actor_id.hex()] = f"rollout worker {i} (RolloutWorker)"
            self.workers.append(handle)
        # Asynchronous training: K - 1 weight pushes may stay queued behind rollouts in flight.
        self.lag = max(0, cfg.trainer.max_staleness - 1)
        self.syncs = SyncTracker(
            lambda ref, timeout: get(ref, timeout=timeout), timeout_s=cfg.gpu.sync_timeout_s,
            names=[names[w._actor_id.hex()] for w in self.workers], passthrough=(WorkerDiedError,),
        )
        self.pending: dict[int, tuple[int | None, Any]] = {}  # key -> (step or None, Generated ref), not yet on the ranks
        self.placed_step: int | None = None

    def generate(self, examples: Sequence[Any], *, step: int, seed: int, key: int) -> Any:
        """Sample ``examples`` on the rollout workers (after the last step's weights reached
        them); the batch waits as ``key``. Returns the reference of its sampling seconds."""
        self.syncs.check(keep=self.lag)  # the last step's weights reached every worker, or stop here
        generated, seconds = sample_on(self.workers, examples, seed, pad=self.pad, get=self.get)
        self.pending[key] = (step, generated)
        return seconds

    def put(self, batch: Generated, key: int) -> Any:
        """A batch restored from a checkpoint waits as ``key``; returns its seconds' reference."""
        import ray

        self.pending[key] = (None, ray.put(batch))
        return ray.put(batch.seconds)

    def fetch(self, key: int) -> Generated:
        """The batch ``key`` (sampled or put, not yet used by a step)."""
        if key not in self.pending:
            raise RuntimeError(f"DPWorkers.fetch_generated: batch {key} was handed to the ranks already (only batches in flight can be fetched)")
        return self.get(self.pending[key][1])

    def place(self, ranks: Sequence[Any], key: int) -> list[Any]:
        """Hand the batch ``key`` to every rank (``PolicyRank.hold``) if it still waits; the
        first batch of a new step clears what the ranks held for the last. Returns the calls."""
        if key not in self.pending:
            return []
        step, generated = self.pending.pop(key)
        fresh = step is None or step != self.placed_step
        self.placed_step = step
        if step is not None:  # batches of earlier steps no step will use (dropped as too stale): free them
            for old in [k for k, (s, _) in self.pending.items() if s is not None and s < step]:
                del self.pending[old]
        return [r.hold.remote(generated, fresh, key) for r in ranks]

    def push(self, ranks: Sequence[Any], step: int) -> list[Any]:
        """Gather the ranks' full state dict once (``PolicyRank.packed_weights``, a collective)
        and queue rank 0's packed weights to every rollout worker. Returns the other ranks' calls
        (``None`` each): rank 0's result goes from the object store to the workers, never to the
        driver, and its failure shows in the sync's check."""
        packed = [r.packed_weights.remote() for r in ranks]
        self.syncs.record(step, [w.sync_packed.remote(packed[0]) for w in self.workers], keep=self.lag)
        return packed[1:]

    def flush(self) -> None:
        """Wait for the last weight push (raises if it failed or a rollout worker died)."""
        self.syncs.check()
