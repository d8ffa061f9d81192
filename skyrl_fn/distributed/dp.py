"""Data-parallel policy on Ray: ``W`` rank actors forming one ``torch.distributed`` group, the
policy sharded with FSDP2, and :class:`DPWorkers`, the ``Workers`` protocol over them
(``--trainer.workers W``; the loop is ``skyrl_fn.trainer.loop.train`` unchanged).

One step (hybrid layout: every rank samples; no weights travel between actors). The driver
names each batch a rank holds by a key (:class:`Held`); every call goes to every rank, in the
same order, so the ranks make the same collectives:

1. every rank gathers its model's full parameters (``skyrl_fn.trainer.sharding.gathered``: one
   all-gather per FSDP module, then no collective while sampling), samples its contiguous share
   of the step's prompts with the per-prompt seeds of ``skyrl_fn.rollout.sampling.prompt_seed``
   and reshards;
2. the shares are all-gathered, so every rank holds the whole batch, in prompt order;
3. batch transforms (``Workers.transform``) run on every rank on the whole batches it holds
   (pure functions: the same result everywhere, and the same as one worker's); more prompts for
   a refill are sampled as in 1-2;
4. the reference model, the teacher and the critic, sharded over the same ranks
   (``skyrl_fn.distributed.dp_roles``), score each rank's share of rows; the scores are
   all-gathered;
5. every rank makes the experience of the whole batch (identical everywhere), takes its share of
   whole prompt groups balanced by token count (``skyrl_fn.trainer.sharding.partition_groups``)
   and runs the update on it with the all-reduced normalisers (``policy_update(dp=...)``);
   FSDP2 reduce-scatters the summed gradients, each rank steps AdamW on its own shard; then the
   critic likewise.

With separate rollout workers (``--ray.rollout-workers N``, :mod:`skyrl_fn.distributed.dp_rollout`)
steps 1-2 happen on them instead: the ranks receive the sampled batch whole, and after each
update they gather the full state dict once (rank 0 holds it) for the rollout workers' weight
push, as the single policy actor's weights are pushed; this also allows asynchronous training.

On GPUs (``--rollout.backend vllm``) the actors follow the run's GPU plan
(``skyrl_fn.distributed.devices.gpu_plan``: ``plan_placement`` with ``trainer_workers=W``), in
one placement group of single-GPU bundles: rank ``r`` on bundle ``r`` with its GPU share (so
``actor_device()`` is ``cuda``, the process group NCCL and the device mesh the ``W`` ranks' GPUs)
and one ``RolloutWorker`` per vLLM engine on the engine's bundles. Sampling is then the rollout
workers' (as above). The weights reach colocated engines by the packed-weights push above; with
engines on their own GPUs (``--gpu.no-colocate``) by the NCCL broadcast of the single policy actor
(``skyrl_fn.distributed.broadcast``), sent by rank 0 after the ranks gather the full weights.

So ``W`` changes where the work runs, not what is computed: the same run at W=1 and W=2 samples
the same responses and its metrics agree to float rounding (docs/distributed.md).

The reference model, a teacher and the critic are sharded on the same ranks
(:mod:`skyrl_fn.distributed.dp_roles`): each rank scores its share of the rows and the parts are
all-gathered. Checkpoints: every rank writes its own shards of the policy's weights and AdamW
state with ``torch.distributed.checkpoint`` into the checkpoint being saved
(``skyrl_fn.trainer.shards``), and loads its slices of whatever ``W`` wrote them (DCP reshards); a
single worker's (whole) checkpoint loads too, so a run saved at any ``W`` resumes at any other
``W``. The critic's weights and AdamW state are saved the same way (its own ``critic/``
directory, by the same rank methods).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import attrs

from skyrl_fn.distributed.actors import release
from skyrl_fn.distributed.dp_rank import PolicyRank
from skyrl_fn.distributed.dp_roles import share_rows
from skyrl_fn.distributed.dp_rollout import RankRollouts
from skyrl_fn.distributed.broadcast import broadcast, form_group
from skyrl_fn.distributed.devices import gpu_plan
from skyrl_fn.distributed.failures import NamedActors
from skyrl_fn.distributed.placement import actor_options, create_placement_group
from skyrl_fn.distributed.ray_workers import CPU_SHARES
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import shards
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.timing import UPDATE_TIMINGS
from skyrl_fn.trainer.workers import trained_roles
from skyrl_fn.trainer.roles import Generated, ShardWriter, WorkersState

__all__ = ["PolicyRank", "DPWorkers", "Held", "share_rows"]


@attrs.frozen
class Held:
    """The driver's handle of something every rank holds (a sampled or transformed batch, a
    role's scores): its ``key`` in the ranks' store and the Ray references of the calls that made
    it (waited for with the step, so a failure in any of them is reported)."""

    key: int
    refs: tuple[Any, ...]


class DPWorkers(NamedActors):
    """``W = trainer.workers`` :class:`PolicyRank` actors in a placement group. On CPU one bundle
    per rank, ``strategy`` ``SPREAD`` (over the nodes of a cluster when it can) or
    ``STRICT_SPREAD`` (one rank per node); on GPUs (``--rollout.backend vllm``) the GPU plan's
    bundles and strategy, with the vLLM engines' rollout workers in the same group. The ranks
    also hold the run's reference model, teacher and critic, sharded over the same ``W``
    (``skyrl_fn.distributed.dp_roles``).

    Args:
        run: the resolved run (``trainer.workers >= 1``).
        strategy: the CPU placement group's strategy (the GPU plan has its own).
    """

    def __init__(self, run: ResolvedRun, *, strategy: str = "SPREAD") -> None:
        from ray.util.placement_group import placement_group

        self.run, cfg = run, run.config
        w = cfg.trainer.workers
        self.names: dict[str, str] = {}
        self.step_index, self.saved = -1, bool(cfg.trainer.resume)
        self.keys, self.sampled_step = 0, -1
        share_cpu = CPU_SHARES["policy"]
        self.plan = gpu_plan(run)  # None on CPU
        self.pg = placement_group([{"CPU": share_cpu}] * w, strategy=strategy) if self.plan is None else None
        self.ranks: list[Any] = []
        self.rollout: RankRollouts | None = None  # separate rollout workers (ray.rollout_workers >= 1)
        self.holding: list[Any] = []  # the ranks' hold calls of this step's batches
        self.sync_plan = None  # bucket plan of the NCCL weight broadcast (--gpu.no-colocate)
        try:
            self._start(run, w, share_cpu)
        except BaseException:
            self.close()  # the loop closes only workers that started
            raise
        self.step_index = 0

    def _start(self, run: ResolvedRun, w: int, share_cpu: float) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        timeout = run.config.trainer.dist_timeout_s
        if self.plan is None:
            what = f"the placement group of the {w} policy ranks ({share_cpu:g} CPU each; enough CPUs and nodes?)"
            self.get(self.pg.ready(), what=what, timeout=timeout)
            options = [dict(num_cpus=share_cpu, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)) for r in range(w)]
        else:
            self.pg = create_placement_group(self.plan, timeout_s=timeout)
            options = [actor_options(slot, self.pg) for slot in self.plan.of("policy")]
            # Colocated engines first (as RayWorkers): vLLM takes its share of the free GPU memory
            # at start-up, then sleeps, and the ranks load into what it leaves.
            self._start_rollout(run)
        for r in range(w):
            handle = ray.remote(PolicyRank).options(max_restarts=0, **options[r]).remote(run, r, w)
            self.names[handle._actor_id.hex()] = f"policy rank {r} of {w} (PolicyRank)"
            self.ranks.append(handle)
        host, port = self.get(self.ranks[0].address.remote())
        pids = self.get([a.join.remote(host, port) for a in self.ranks])
        for a, pid in zip(self.ranks, pids):
            name = self.names[a._actor_id.hex()].rstrip(")")
            self.names[a._actor_id.hex()] = f"{name}, pid {pid})"
        if self.rollout is None and run.config.ray.rollout_workers:
            self._start_rollout(run)
        if self.plan is not None and not self.plan.colocate:  # engines on their own GPUs: NCCL from rank 0
            self.sync_plan = form_group(
                self.get, self.ranks, self.rollout.workers, tensor_parallel_size=run.config.rollout.tensor_parallel_size,
                timeout_s=run.config.gpu.sync_timeout_s,
            )

    def _start_rollout(self, run: ResolvedRun) -> None:
        """The rollout workers (the GPU plan's engines, or ``ray.rollout_workers`` on CPU), started."""
        self.rollout = RankRollouts(run, self.names, self.get, plan=self.plan, placement_group=self.pg)
        self.get([w.ping.remote() for w in self.rollout.workers])

    # -- the protocol ------------------------------------------------------------------------
    def _key(self) -> int:
        self.keys += 1
        return self.keys

    def _each(self, method: str, *args) -> Held:
        """``method(*args, key)`` on every rank; the handle of what they hold as ``key``."""
        key = self._key()
        return Held(key, tuple(getattr(a, method).remote(*args, key) for a in self.ranks))  # rank 0's first

    def generate(self, examples: Sequence[Any], *, step: int, seed: int) -> Held:
        # Asynchronous training samples step + K while step trains: errors name the step training.
        self.step_index = max(0, step - self.run.config.trainer.max_staleness)
        if self.rollout is not None:  # on the rollout workers; the ranks get the batch at its first use
            key = self._key()
            return Held(key, (self.rollout.generate(list(examples), step=step, seed=seed, key=key),))
        fresh, self.sampled_step = step != self.sampled_step, step
        return self._each("generate_share", list(examples), seed, fresh)

    def _place(self, *generated: Held) -> None:
        """Hand batches still waiting on the rollout side to every rank (in call order)."""
        if self.rollout is not None:
            for g in generated:
                self.holding += self.rollout.place(self.ranks, g.key)

    def transform(self, fn, *generated: Held) -> tuple[Held, dict[str, float]]:
        self._place(*generated)
        held = self._each("transform_held", fn, [g.key for g in generated])
        metrics = self.get(list(held.refs))[0]  # the same on every rank
        return Held(held.key, held.refs + sum((g.refs for g in generated), ())), metrics

    def reference_log_probs(self, generated: Held) -> Held:
        self._place(generated)
        return self._each("score_held", "reference", generated.key)

    def teacher_log_probs(self, generated: Held) -> Held:
        self._place(generated)
        return self._each("score_held", "teacher", generated.key)

    def values(self, generated: Held) -> Held:
        self._place(generated)
        return self._each("score_held", "critic", generated.key)

    def update_policy(self, generated: Held, ref_log_probs: Held | None, values: Held | None, kl_coef: float) -> Held:
        self._place(generated)
        keys = [None if h is None else h.key for h in (ref_log_probs, values)]
        before = sum((h.refs for h in (generated, ref_log_probs, values) if h is not None), tuple(self.holding))
        self.holding = []
        refs = tuple(a.update_share.remote(generated.key, *keys, kl_coef) for a in self.ranks)
        if self.sync_plan is not None:  # the new weights, gathered once, broadcast by rank 0 (waited for)
            self._broadcast()
        elif self.rollout is not None:  # the new weights, gathered once, queued to every rollout worker
            before += tuple(self.rollout.push(self.ranks, self.step_index))
        return Held(-1, refs + before)  # rank 0's (metrics, seconds) first

    def update_critic(self, updated: Held) -> Held:
        return Held(-1, tuple(a.update_critic_share.remote() for a in self.ranks))

    def wait(self, generated: Held, updated: Held, critic: Held | None) -> tuple[dict[str, float], float]:
        # updated.refs: the ranks' update calls (rank 0's first), then every call they depend on
        # (the sampling among them)
        w = len(self.ranks)
        critic_refs = critic.refs if critic is not None else ()
        rest = [r for r in dict.fromkeys(updated.refs[w:] + generated.refs) if r not in critic_refs]
        got = self.get([*updated.refs[:w], *critic_refs, *rest])
        metrics, seconds = got[0]  # every rank reports the same (all-reduced) metrics
        metrics = dict(metrics)
        # the timings are each rank's own: those of the rank that computed or queued longest
        # (the others waited for it), with the longest wall time
        slowest = max((m for m, _ in got[:w]), key=lambda m: m.get("update_cpu_seconds", 0.0) + m.get("update_queue_seconds", 0.0))
        metrics.update({k: slowest[k] for k in UPDATE_TIMINGS if k in slowest})
        metrics["update_seconds"] = max(m["update_seconds"] for m, _ in got[:w])
        if critic is not None:
            metrics.update(got[w])
        return metrics, float(seconds)

    def fetch_generated(self, generated: Held) -> Generated:
        if self.rollout is None:  # _check_async refuses asynchronous training without rollout workers
            raise RuntimeError("DPWorkers.fetch_generated: the hybrid layout keeps its batches in the ranks")
        return self.rollout.fetch(generated.key)

    def put_generated(self, batch: Generated) -> Held:
        if self.rollout is None:
            raise RuntimeError("DPWorkers.put_generated: the hybrid layout keeps its batches in the ranks")
        key = self._key()
        return Held(key, (self.rollout.put(batch, key),))

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        return self.get([a.evaluate.remote(list(examples)) for a in self.ranks])[0]

    def state(self) -> WorkersState:
        """The policy and the critic as :class:`ShardWriter` s (each rank writes its own shards of
        each when the checkpoint is saved), every rank's RNG states (``{"ranks": [...]}``)."""
        if self.rollout is not None:
            self.rollout.flush()
        got = self.get([a.small_state.remote() for a in self.ranks])
        scheds = got[0][0]  # the same on every rank
        roles = {role: ShardWriter(write=functools.partial(self._write_shards, role), sched=sched) for role, sched in scheds.items()}
        self.saved = True
        return WorkersState(roles=roles, rng={"ranks": [g[1] for g in got]})

    def _write_shards(self, role: str, directory: str) -> None:
        self.get([a.write_shards.remote(directory, role) for a in self.ranks])
        missing = shards.missing_files(directory)
        if missing:  # a rank wrote where this process does not see it
            raise ckpt.CheckpointWriteError(
                f"checkpoint {directory}: {missing} missing after every rank wrote its shards "
                "(on a cluster, trainer.ckpt_dir must be a filesystem every node shares)"
            )

    def load_state(self, saved: WorkersState) -> None:
        import ray

        rng, refs = ray.put(saved.rng), []
        for role in trained_roles(self.run):
            state = ray.put(saved.roles[role])
            refs += [a.set_state.remote(state, rng if role == "policy" else None, role) for a in self.ranks]
        if self.rollout is not None and self.sync_plan is None:  # what the ranks loaded (whole or from shards): they run their calls in order
            refs += self.rollout.push(self.ranks, self.step_index)
        self.get(refs)
        if self.sync_plan is not None:
            self._broadcast()

    def _broadcast(self) -> None:
        broadcast(self.get, self.ranks, self.rollout.workers, self.sync_plan, timeout_s=self.run.config.gpu.sync_timeout_s)

    def resident_bytes(self) -> list[dict[str, int]]:
        """Per rank: bytes of resident parameter and optimiser-state shards."""
        return self.get([a.resident_bytes.remote() for a in self.ranks])

    def close(self) -> None:
        release(self.actors(), self.pg)
        self.pg = None

    # -- failures --------------------------------------------------------------------------
    def actors(self) -> list[Any]:
        return list(self.ranks) + (list(self.rollout.workers) if self.rollout is not None else [])

    def get(self, refs, *, timeout: float | None = None, what: str | None = None):
        return self.get_each(refs, timeout=timeout, what=what)
