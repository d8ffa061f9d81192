"""Data-parallel policy on Ray: ``W`` rank actors forming one ``torch.distributed`` group, the
policy sharded with FSDP2, and :class:`DPWorkers`, the ``Workers`` protocol over them
(``--trainer.workers W``; the loop is ``skyrl_fn.trainer.loop.train`` unchanged).

One step (hybrid layout: every rank samples; no weights travel between actors):

1. every rank gathers its model's full parameters (``skyrl_fn.trainer.sharding.gathered``: one
   all-gather per FSDP module, then no collective while sampling), samples its contiguous share
   of the step's prompts with the per-prompt seeds of ``skyrl_fn.rollout.sampling.prompt_seed``
   and reshards;
2. the shares are all-gathered, so every rank holds the whole batch, in prompt order;
3. every rank makes the experience of the whole batch (identical everywhere), takes its share of
   whole prompt groups balanced by token count (``skyrl_fn.trainer.sharding.partition_groups``)
   and runs the update on it with the all-reduced normalisers (``policy_update(dp=...)``);
   FSDP2 reduce-scatters the summed gradients, each rank steps AdamW on its own shard.

So ``W`` changes where the work runs, not what is computed: the same run at W=1 and W=2 samples
the same responses and its metrics agree to float rounding (docs/distributed.md).

The reference model and the critic stay single actors that see the whole batch (rank 0 hands it
to them). Checkpoints: every rank writes its own shards of the policy's weights and AdamW state
with ``torch.distributed.checkpoint`` into the checkpoint being saved (``skyrl_fn.trainer.shards``),
and loads its slices of whatever ``W`` wrote them (DCP reshards); a single worker's (whole)
checkpoint loads too, so a run saved at any ``W`` resumes at any other ``W``.
"""

from __future__ import annotations

import os
import time
from typing import Any, NoReturn, Sequence

import attrs
import torch

from skyrl_fn.distributed.actors import Critic, ReferenceModel, _Ping, _start, release
from skyrl_fn.distributed.devices import to_device
from skyrl_fn.distributed.layout import concat_rollouts, split_prompts
from skyrl_fn.distributed.ray_workers import CPU_SHARES, WorkerDiedError
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import shards
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.evaluate import evaluate, heldout_task
from skyrl_fn.trainer.forward import old_policy_pass
from skyrl_fn.trainer.learner import experience_and_update, loss_kernel, make_train_state, set_hyperparameters
from skyrl_fn.models.model import load_model, load_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.trainer.sharding import (
    Collectives, gathered, init_process_group, load_full_state, partition_groups, shard_model,
)
from skyrl_fn.tasks.base import reward_function_name
from skyrl_fn.tasks.scoring import score_fields
from skyrl_fn.trainer.workers import Generated, RoleState, SavedShards, ShardWriter, WorkersState

__all__ = ["PolicyRank", "DPWorkers", "share_rows"]


def share_rows(rollout, world_size: int, rank: int) -> torch.Tensor:
    """``[B']`` int64 rows of ``rank``'s share: whole prompt groups balanced by their token
    counts (prompt + response, :func:`~skyrl_fn.trainer.sharding.partition_groups`), ascending."""
    tokens = (rollout.prompt_mask.sum(-1) + rollout.response_mask.sum(-1)).long()
    per_group = torch.zeros(rollout.num_prompts, dtype=torch.long).index_add_(0, rollout.group_ids, tokens)
    groups = torch.tensor(partition_groups(per_group.tolist(), world_size)[rank], dtype=torch.long)
    return torch.nonzero(torch.isin(rollout.group_ids, groups)).squeeze(-1)


class PolicyRank(_Ping):
    """Rank ``rank`` of ``world_size`` of the data-parallel policy (a Ray actor). Call
    :meth:`join` on every rank at once (with rank 0's :meth:`address`) before anything else."""

    def __init__(self, run: ResolvedRun, rank: int, world_size: int) -> None:
        self.device = _start(run)
        self.run, self.rank, self.world_size = run, rank, world_size
        cfg = run.config
        self.task = run.make_task()
        self.tokenizer = load_tokenizer(cfg.model, alphabet=self.task.alphabet)
        self.kept: Generated | None = None
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
        return os.getpid()

    # -- the step --------------------------------------------------------------------------
    def generate_share(self, examples: Sequence[Any], seed: int, share: bool):
        """Sample this rank's share of ``examples``, then all-gather the whole batch (kept here
        for :meth:`update_share`). Returns ``(whole batch if share and rank 0 else None, seconds)``."""
        t0 = time.perf_counter()
        chunks = split_prompts(list(examples), self.world_size)
        first = sum(len(c) for c in chunks[: self.rank])
        mine = chunks[self.rank]
        model = self.train_state.model.eval()
        with gathered(model):
            rollout = self.backend.generate([e.prompt for e in mine], seed=seed, first_prompt=first)
        scores, extras = score_fields(self.task, rollout.responses, mine, rollout.group_ids.tolist(), fields=self.run.task_fields)
        if extras:
            rollout = attrs.evolve(rollout, extras=extras)
        parts = self.dp.all_gather_object((rollout, scores, time.perf_counter() - t0))
        whole = concat_rollouts([p[0] for p in parts], pad_id=int(self.tokenizer.pad_token_id))
        self.kept = Generated(rollout=whole, scores=torch.cat([p[1] for p in parts]), seconds=max(p[2] for p in parts))
        return (self.kept if share and self.rank == 0 else None), self.kept.seconds

    def update_share(self, generated: Generated | None, ref_log_probs, values, kl_coef: float):
        """The experience of the whole batch and the update on this rank's share. Returns
        ``(metrics, experience of the whole batch for the critic (rank 0, with a critic) or None)``."""
        if generated is None:
            generated, self.kept = self.kept, None
        cfg = self.run.config
        rollout, scores, ref_log_probs, values = to_device((generated.rollout, generated.scores, ref_log_probs, values), self.device)
        old_lp, computed = None, {}
        if cfg.algorithm.recompute_old_log_probs or self.run.computed_fields:  # of the whole batch, with the full parameters
            with gathered(self.train_state.model.eval()) as model:
                old_lp, computed = old_policy_pass(self.run, model, rollout)
        t0 = time.perf_counter()
        metrics, exp = experience_and_update(
            self.run, self.train_state, rollout, scores, reward_function=reward_function_name(self.task), old_log_probs=old_lp,
            ref_log_probs=ref_log_probs, values=values, kl_coef=kl_coef, kernel=self.kernel, fields=computed,
            rank_rows=share_rows(rollout, self.world_size, self.rank).to(self.device), dp=self.dp,
        )
        metrics["update_seconds"] = time.perf_counter() - t0
        keep = values is not None and self.rank == 0
        return metrics, (to_device(exp, "cpu") if keep else None)

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
    def small_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(LR schedule state, this rank's RNG states)``; the weights and optimiser state go
        to disk with :meth:`write_shards`."""
        return self.train_state.scheduler.state_dict(), ckpt.capture_rng()

    def write_shards(self, directory: str) -> None:
        """Write this rank's shards of the weights and AdamW state into ``directory``
        (``skyrl_fn.trainer.shards.write``). A collective."""
        shards.write(self.train_state.model, self.train_state.optimizer, directory)

    def set_state(self, saved: RoleState | SavedShards, rng: Any = None) -> None:
        """Load shards written at any ``W`` (DCP reshards), or a single worker's whole state;
        every rank keeps its own slices. A collective."""
        ts, tr = self.train_state, self.run.config.trainer
        if isinstance(saved, SavedShards):
            shards.load(ts.model, ts.optimizer, saved.path)
        else:
            load_full_state(ts.model, ts.optimizer, saved.weights, saved.optim)
        ts.scheduler.load_state_dict(saved.sched)
        set_hyperparameters(ts, lr=tr.lr, weight_decay=tr.weight_decay)
        if rng is not None:
            ckpt.restore_rng(rng, rank=self.rank)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of this rank's resident parameter and optimiser-state storage (its shards)."""
        ts = self.train_state
        local = [getattr(p, "_local_tensor", p) for p in ts.model.parameters()]
        params = sum(t.numel() * t.element_size() for t in local)
        optim = 0
        for st in ts.optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v = getattr(v, "_local_tensor", v)
                    optim += v.numel() * v.element_size()
        return {"params": params, "optim": optim}


class DPWorkers:
    """``W = trainer.workers`` :class:`PolicyRank` actors in a placement group (one bundle per
    rank, ``strategy`` ``SPREAD``: over the nodes of a cluster when it can, ``STRICT_SPREAD``:
    one rank per node), plus the single reference and critic actors when used.

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
        self.share = run.uses_reference or run.uses_critic
        share_cpu = CPU_SHARES["policy"]
        self.pg = placement_group([{"CPU": share_cpu}] * w, strategy=strategy)
        self.ranks, self.reference, self.critic = [], None, None
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
        if run.uses_reference:
            self.reference = ray.remote(num_cpus=CPU_SHARES["reference"], max_restarts=0)(ReferenceModel).remote(run)
            self.names[self.reference._actor_id.hex()] = "reference model (ReferenceModel)"
        if run.uses_critic:
            self.critic = ray.remote(num_cpus=CPU_SHARES["critic"], max_restarts=0)(Critic).remote(run)
            self.names[self.critic._actor_id.hex()] = "critic (Critic)"
        host, port = self.get(self.ranks[0].address.remote())
        pids = self.get([a.join.remote(host, port) for a in self.ranks] + [a.ping.remote() for a in self.actors()[w:]])
        for a, pid in zip(self.actors(), pids):
            name = self.names[a._actor_id.hex()].rstrip(")")
            self.names[a._actor_id.hex()] = f"{name}, pid {pid})"

    # -- the protocol ------------------------------------------------------------------------
    def generate(self, examples: Sequence[Any], *, step: int, seed: int):
        self.step_index = step
        outs = [a.generate_share.options(num_returns=2).remote(list(examples), seed, self.share) for a in self.ranks]
        return outs  # [(whole batch of rank 0 or None, seconds)] per rank

    def reference_log_probs(self, generated):
        return self.reference.log_probs_of.remote(generated[0][0])

    def values(self, generated):
        return self.critic.values_of.remote(generated[0][0])

    def update_policy(self, generated, ref_log_probs, values, kl_coef: float):
        return [a.update_share.options(num_returns=2).remote(None, ref_log_probs, values, kl_coef) for a in self.ranks]

    def update_critic(self, updated):
        return self.critic.update_on.remote(updated[0][1])

    def wait(self, generated, updated, critic) -> tuple[dict[str, float], float]:
        refs = [u[0] for u in updated] + [generated[0][1]] + ([critic] if critic is not None else [])
        got = self.get(refs)
        w = len(self.ranks)
        metrics = dict(got[0])  # every rank reports the same (all-reduced) metrics
        if critic is not None:
            metrics.update(got[w + 1])
        return metrics, float(got[w])

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        return self.get([a.evaluate.remote(list(examples)) for a in self.ranks])[0]

    def state(self) -> WorkersState:
        """The policy as a :class:`ShardWriter` (each rank writes its own shards when the
        checkpoint is saved), the critic whole, every rank's RNG states (``{"ranks": [...]}``)."""
        got = self.get([a.small_state.remote() for a in self.ranks] + ([self.critic.get_state.remote()] if self.critic is not None else []))
        w = len(self.ranks)
        roles: dict[str, Any] = {"policy": ShardWriter(write=self._write_shards, sched=got[0][0])}
        if self.critic is not None:
            roles["critic"] = got[-1]
        self.saved = True
        return WorkersState(roles=roles, rng={"ranks": [g[1] for g in got[:w]]})

    def _write_shards(self, directory: str) -> None:
        self.get([a.write_shards.remote(directory) for a in self.ranks])
        missing = shards.missing_files(directory)
        if missing:  # a rank wrote where this process does not see it
            raise ckpt.CheckpointWriteError(
                f"checkpoint {directory}: {missing} missing after every rank wrote its shards "
                "(on a cluster, trainer.ckpt_dir must be a filesystem every node shares)"
            )

    def load_state(self, saved: WorkersState) -> None:
        import ray

        policy, rng = ray.put(saved.roles["policy"]), ray.put(saved.rng)
        refs = [a.set_state.remote(policy, rng) for a in self.ranks]
        if self.critic is not None:
            refs.append(self.critic.set_state.remote(saved.roles["critic"]))
        self.get(refs)

    def resident_bytes(self) -> list[dict[str, int]]:
        """Per rank: bytes of resident parameter and optimiser-state shards."""
        return self.get([a.resident_bytes.remote() for a in self.ranks])

    def close(self) -> None:
        release(self.actors(), self.pg)
        self.pg = None

    # -- failures --------------------------------------------------------------------------
    def actors(self) -> list[Any]:
        return [a for a in [*self.ranks, self.reference, self.critic] if a is not None]

    def get(self, refs, *, timeout: float | None = None, what: str | None = None):
        """``ray.get`` that fails as soon as ANY of ``refs`` fails (a rank blocked in a
        collective with a dead peer never hides the peer's death), naming a dead actor
        (:class:`WorkerDiedError`); with ``timeout`` a :class:`TimeoutError` naming ``what``."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        many = isinstance(refs, list)
        pending = list(refs) if many else [refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"{what} did not finish within {timeout:g} s")
            try:
                ray.get(ready)
            except RayActorError as err:
                self._died(err)
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, RayActorError):
                    self._died(cause)
                dead = self._dead_actor()  # a collective failing because a peer died
                if dead is not None:
                    self._died(err, who=dead)
                raise err.as_instanceof_cause() from None
        return ray.get(refs)

    def _dead_actor(self) -> str | None:
        import ray

        for a in self.actors():
            try:
                ray.get(a.ping.remote(), timeout=10)
            except Exception:
                return self.names[a._actor_id.hex()]
        return None

    def _died(self, err, *, who: str | None = None) -> NoReturn:
        actor_id = getattr(err, "actor_id", None)
        who = who or self.names.get(actor_id) or self._dead_actor() or "a Ray worker"
        last = ckpt.latest_checkpoint(self.run.config.ckpt_dir) if self.saved else None
        where = f"the last checkpoint is {last} (intact; rerun with --trainer.resume to continue)" if last else "no checkpoint was written yet"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        when = "while starting" if self.step_index < 0 else f"during step {self.step_index + 1}"
        raise WorkerDiedError(f"Ray worker {who} died {when}: {detail}. {where}.") from None
