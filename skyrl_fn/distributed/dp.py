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
import os
import time
from typing import Any, Sequence

import attrs
import torch

from skyrl_fn.distributed.actors import _Ping, _start, release
from skyrl_fn.distributed.devices import to_device
from skyrl_fn.distributed.dp_roles import RankRoles, local_bytes, optimizer_bytes, share_rows
from skyrl_fn.distributed.dp_rollout import RankRollouts
from skyrl_fn.distributed.layout import concat_rollouts, split_prompts
from skyrl_fn.distributed.failures import NamedActors
from skyrl_fn.distributed.ray_workers import CPU_SHARES
from skyrl_fn.distributed.weights import PackedWeights, pack
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import shards
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.timing import UPDATE_TIMINGS, UpdateClock
from skyrl_fn.trainer.evaluate import evaluate, heldout_task
from skyrl_fn.trainer.forward import old_policy_pass
from skyrl_fn.trainer.learner import TrainState, experience_and_update, loss_kernel, make_train_state
from skyrl_fn.models.model import load_model, load_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.trainer.sharding import (
    Collectives, full_state_dict, gathered, init_process_group, reshard, shard_model,
)
from skyrl_fn.tasks.base import reward_function_name
from skyrl_fn.trainer.workers import Generated, RoleState, SavedShards, ShardWriter, WorkersState, load_role_state, score_rollout, trained_roles

__all__ = ["PolicyRank", "DPWorkers", "Held", "share_rows"]


@attrs.frozen
class Held:
    """The driver's handle of something every rank holds (a sampled or transformed batch, a
    role's scores): its ``key`` in the ranks' store and the Ray references of the calls that made
    it (waited for with the step, so a failure in any of them is reported)."""

    key: int
    refs: tuple[Any, ...]


class PolicyRank(_Ping):
    """Rank ``rank`` of ``world_size`` of the data-parallel policy (a Ray actor). Call
    :meth:`join` on every rank at once (with rank 0's :meth:`address`) before anything else."""

    def __init__(self, run: ResolvedRun, rank: int, world_size: int) -> None:
        self.device = _start(run)
        self.run, self.rank, self.world_size = run, rank, world_size
        cfg = run.config
        self.task = run.make_task()
        self.tokenizer = load_tokenizer(cfg.model, alphabet=self.task.alphabet)
        self.held: dict[int, Any] = {}  # batches and scores by the driver's keys (Held)
        self.exp = None  # the last update's (experience of the whole batch, this rank's rows), for the critic
        self._heldout = None

    def address(self) -> tuple[str, int]:
        """``(node ip, free port)`` for the group's rendezvous (asked of rank 0)."""
        import ray

        from skyrl_fn.rollout.weight_sync import free_port

        return ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        """The Ray node this rank runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def join(self, host: str, port: int) -> int:
        """Join the process group, build the policy (same seed on every rank), shard it with
        FSDP2, build the optimiser over the shards. Returns this process's pid."""
        cfg, tr = self.run.config, self.run.config.trainer
        init_process_group(rank=self.rank, world_size=self.world_size, host=host, port=port, device=self.device, timeout_s=tr.dist_timeout_s)
        model = load_model(cfg.model, self.tokenizer, seed=tr.seed).to(self.device)
        model = shard_model(model, device=self.device, mixed_precision=tr.bf16_mixed_precision)
        self.backend = HFBackend(model, self.tokenizer, cfg.rollout)
        self.train_state = make_train_state(model, lr=tr.lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)
        self.kernel = loss_kernel(self.run, device_type=torch.device(self.device).type)
        self.dp = Collectives(self.device)
        self.roles = RankRoles(self.run, self.tokenizer, device=self.device)
        return os.getpid()

    # -- the step --------------------------------------------------------------------------
    def generate_share(self, examples: Sequence[Any], seed: int, fresh: bool, key: int) -> float:
        """Sample this rank's share of ``examples``, all-gather the whole batch and hold it as
        ``key`` (``fresh``: a new step; what the last one held is dropped). Returns the slowest
        rank's sampling seconds."""
        if fresh:
            self.held.clear()
        t0 = time.perf_counter()
        chunks = split_prompts(list(examples), self.world_size)
        first = sum(len(c) for c in chunks[: self.rank])
        mine = chunks[self.rank] if self.rank < len(chunks) else []
        model = self.train_state.model.eval()
        # keep: the weights do not change before the update, whose forward passes then gather
        # nothing (one all-gather per FSDP module per step, not two); the update reshards.
        with gathered(model, keep=True):
            rollout = self.backend.generate([e.prompt for e in mine], seed=seed, first_prompt=first)
        rollout, scores = score_rollout(self.task, rollout, mine, fields=self.run.task_fields)
        parts = self.dp.all_gather_object((rollout, scores, time.perf_counter() - t0))
        whole = concat_rollouts([p[0] for p in parts], pad_id=int(self.tokenizer.pad_token_id))
        self.held[key] = Generated(rollout=whole, scores=torch.cat([p[1] for p in parts]), seconds=max(p[2] for p in parts))
        return self.held[key].seconds

    def hold(self, generated: Generated, fresh: bool, key: int) -> None:
        """Hold a batch sampled by the rollout workers as ``key`` (``fresh``: a new step; what
        the last one held is dropped)."""
        if fresh:
            self.held.clear()
        self.held[key] = generated

    def packed_weights(self) -> PackedWeights | None:
        """The full weights, packed, on rank 0 (None on the others), for the rollout workers. A
        collective: one gather of the state dict per call."""
        weights = full_state_dict(self.train_state.model, rank0_only=True)
        return pack(weights) if self.rank == 0 else None

    def transform_held(self, fn, keys: Sequence[int], key: int) -> dict[str, float]:
        """``fn([held batches], pad_id=...) -> (batch or None, metrics)`` (the batch transforms,
        the teacher's log-probs joined to the batch): on every rank on the same whole batches, so
        with the same result; hold the batch as ``key``. Returns the metrics."""
        out, metrics = fn([self.held[k] for k in keys], pad_id=int(self.tokenizer.pad_token_id))
        if out is None:  # nothing to train on: the step ends without an update
            reshard(self.train_state.model)
        self.held[key] = out
        return metrics

    def score_held(self, role: str, batch: int, key: int) -> None:
        """``role``'s (``reference``, ``teacher``: log-probs; ``critic``: values) ``[B, T]`` of the
        held batch ``batch``, computed on this rank's share and all-gathered; held as ``key``."""
        rollout = to_device(self.held[batch].rollout, self.device)
        rows = share_rows(rollout, self.world_size, self.rank).to(self.device)
        if role == "critic":
            self.held[key] = self.roles.values(rollout, rows, self.dp)
        else:
            self.held[key] = self.roles.log_probs(role, rollout, rows, self.dp)

    def update_share(self, batch: int, ref: int | None, values: int | None, kl_coef: float) -> tuple[dict[str, float], float]:
        """The experience of the held batch ``batch`` (with the held reference log-probs ``ref``
        and critic ``values``) and the policy update on this rank's share. Returns ``(metrics,
        sampling seconds of the batch)``."""
        generated = self.held[batch]
        ref_log_probs, values = (None if k is None else self.held[k] for k in (ref, values))
        self.held.clear()
        cfg = self.run.config
        rollout, scores, ref_log_probs, values = to_device((generated.rollout, generated.scores, ref_log_probs, values), self.device)
        old_lp, computed = None, {}
        if cfg.algorithm.recompute_old_log_probs or self.run.computed_fields:  # of the whole batch, with the full parameters
            with gathered(self.train_state.model.eval(), keep=True) as model:  # kept for the update
                old_lp, computed = old_policy_pass(self.run, model, rollout)
        clock = UpdateClock()
        rows = share_rows(rollout, self.world_size, self.rank).to(self.device)
        metrics, exp = experience_and_update(
            self.run, self.train_state, rollout, scores, reward_function=reward_function_name(self.task), old_log_probs=old_lp,
            ref_log_probs=ref_log_probs, values=values, kl_coef=kl_coef, kernel=self.kernel, fields=computed, rank_rows=rows,
            dp=self.dp,
        )
        metrics.update(clock.timings())
        reshard(self.train_state.model)  # a step skipped before its backward kept the sampling's gather
        self.exp = (exp, rows) if values is not None else None
        return metrics, generated.seconds

    def update_critic_share(self) -> dict[str, float]:
        """The critic update on this rank's share of the last :meth:`update_share`'s experience."""
        exp, rows = self.exp
        self.exp = None
        return self.roles.update_critic(exp, rows, self.dp)

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        """Greedy pass@1 on held-out ``examples`` with the full weights (rank 0 scores; the
        others return ``{}``)."""
        cfg = self.run.config
        with gathered(self.train_state.model.eval()) as model:
            if self.rank != 0:
                return {}
            if self._heldout is None:
                self._heldout = heldout_task(self.task, cfg.eval)
            return evaluate(
                model, self.tokenizer, self._heldout, examples,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, batch_size=cfg.eval.batch_size,
            )

    # -- state -----------------------------------------------------------------------------
    def _trained(self, role: str) -> tuple[TrainState, float]:
        """``role``'s (``"policy"``, ``"critic"``) train state and this run's learning rate for it."""
        tr = self.run.config.trainer
        return {"policy": (self.train_state, tr.lr), "critic": (self.roles.critic, tr.critic_lr)}[role]

    def small_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``({role: LR schedule state}, this rank's RNG states)`` of the roles it trains; their
        weights and optimiser state go to disk with :meth:`write_shards`."""
        return {role: self._trained(role)[0].scheduler.state_dict() for role in trained_roles(self.run)}, ckpt.capture_rng()

    def write_shards(self, directory: str, role: str = "policy") -> None:
        """Write this rank's shards of ``role``'s weights and AdamW state into ``directory``
        (``skyrl_fn.trainer.shards.write``). A collective."""
        ts = self._trained(role)[0]
        shards.write(ts.model, ts.optimizer, directory)

    def set_state(self, saved: RoleState | SavedShards, rng: Any = None, role: str = "policy") -> None:
        """Load ``role``'s shards written at any ``W`` (DCP reshards), or a single worker's whole
        state; every rank keeps its own slices; this run's learning rate and weight decay apply.
        A collective."""
        ts, lr = self._trained(role)
        load_role_state(ts, saved, lr=lr, weight_decay=self.run.config.trainer.weight_decay)
        if rng is not None:
            ckpt.restore_rng(rng, rank=self.rank)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of this rank's resident storage (its shards): the policy's parameters
        (``params``) and optimiser state (``optim``), and those of the other roles it holds
        (``RankRoles.resident_bytes``)."""
        ts = self.train_state
        return {"params": local_bytes(ts.model), "optim": optimizer_bytes(ts.optimizer), **self.roles.resident_bytes()}


class DPWorkers(NamedActors):
    """``W = trainer.workers`` :class:`PolicyRank` actors in a placement group (one bundle per
    rank, ``strategy`` ``SPREAD``: over the nodes of a cluster when it can, ``STRICT_SPREAD``:
    one rank per node). The ranks also hold the run's reference model, teacher and critic,
    sharded over the same ``W`` (``skyrl_fn.distributed.dp_roles``).

    Args:
        run: the resolved run (``trainer.workers >= 1``).
        strategy: the placement group's strategy.
    """

    def __init__(self, run: ResolvedRun, *, strategy: str = "SPREAD") -> None:
        from ray.util.placement_group import placement_group

        self.run, cfg = run, run.config
        w = cfg.trainer.workers
        self.names: dict[str, str] = {}
        self.step_index, self.saved = -1, bool(cfg.trainer.resume)
        self.keys, self.sampled_step = 0, -1
        share_cpu = CPU_SHARES["policy"]
        self.pg = placement_group([{"CPU": share_cpu}] * w, strategy=strategy)
        self.ranks: list[Any] = []
        self.rollout: RankRollouts | None = None  # separate rollout workers (ray.rollout_workers >= 1)
        self.holding: list[Any] = []  # the ranks' hold calls of this step's batches
        try:
            self._start(run, w, share_cpu)
        except BaseException:
            self.close()  # the loop closes only workers that started
            raise
        self.step_index = 0

    def _start(self, run: ResolvedRun, w: int, share_cpu: float) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        what = f"the placement group of the {w} policy ranks ({share_cpu:g} CPU each; enough CPUs and nodes?)"
        self.get(self.pg.ready(), what=what, timeout=run.config.trainer.dist_timeout_s)
        for r in range(w):
            opts = dict(num_cpus=share_cpu, max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r))
            handle = ray.remote(PolicyRank).options(**opts).remote(run, r, w)
            self.names[handle._actor_id.hex()] = f"policy rank {r} of {w} (PolicyRank)"
            self.ranks.append(handle)
        host, port = self.get(self.ranks[0].address.remote())
        pids = self.get([a.join.remote(host, port) for a in self.ranks])
        for a, pid in zip(self.ranks, pids):
            name = self.names[a._actor_id.hex()].rstrip(")")
            self.names[a._actor_id.hex()] = f"{name}, pid {pid})"
        if run.config.ray.rollout_workers:
            self.rollout = RankRollouts(run, self.names, self.get)
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
        if self.rollout is not None:  # the new weights, gathered once, queued to every rollout worker
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
        if self.rollout is not None:  # what the ranks loaded (whole or from shards): they run their calls in order
            refs += self.rollout.push(self.ranks, self.step_index)
        self.get(refs)

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
