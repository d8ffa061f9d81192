"""One rank of the data-parallel policy (a Ray actor): its FSDP2-sharded policy, its share of
each step's sampling, scoring and update, and its shards of the state. :class:`~skyrl_fn.distributed.dp.DPWorkers`
drives ``W`` of them; the step is described there.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from skyrl_fn.ops.memory import release_cached_memory
from skyrl_fn.distributed.actors import WeightSender, _Ping, _shares_gpu, _start
from skyrl_fn.distributed.devices import to_device
from skyrl_fn.distributed.dp_roles import RankRoles, local_bytes, optimizer_bytes, share_forward, share_rows
from skyrl_fn.distributed.layout import concat_rollouts, split_prompts
from skyrl_fn.distributed.weights import PackedWeights, pack
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import shards
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.timing import UpdateClock
from skyrl_fn.trainer.evaluate import evaluate, heldout_task
from skyrl_fn.trainer.forward import old_policy_pass
from skyrl_fn.trainer.learner import TrainState, experience_and_update, loss_kernel, make_train_state
from skyrl_fn.models.model import load_model, load_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.rollout.buckets import ties_embeddings, to_hf_names
from skyrl_fn.trainer.sharding import (
    Collectives, full_state_dict, gathered, init_process_group, reshard, shard_model,
)
from skyrl_fn.tasks.base import reward_function_name
from skyrl_fn.trainer.workers import trained_roles
from skyrl_fn.trainer.roles import Generated, RoleState, SavedShards, load_role_state, score_rollout

__all__ = ["PolicyRank"]


class PolicyRank(WeightSender, _Ping):
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
        return self.sync_address()

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
        packed = pack(weights) if self.rank == 0 else None
        # colocated vLLM engines wake up next, into what the rank gives back (as PolicyTrainer)
        release_cached_memory(self.device, colocated=_shares_gpu(self.run))
        return packed

    # -- NCCL weight broadcast (vLLM engines on their own GPUs): WeightSender, rank 0 sends --
    @property
    def _sends(self) -> bool:
        return self.rank == 0

    def _hf_weights(self) -> dict[str, torch.Tensor]:
        """The full weights under Hugging Face names on rank 0 (on the CPU; empty elsewhere). A
        collective: every rank calls it."""
        model = self.train_state.model
        weights = full_state_dict(model, rank0_only=True)
        return to_hf_names(weights, tied_embeddings=ties_embeddings(model)) if self.rank == 0 else {}

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
        clock = UpdateClock()  # from here, as the single policy worker's update (its old-policy pass included)
        rows = share_rows(rollout, self.world_size, self.rank).to(self.device)
        old_lp, computed = None, {}
        if cfg.algorithm.recompute_old_log_probs or self.run.computed_fields:
            old_lp, computed = self._old_policy_pass(rollout, rows)
        metrics, exp = experience_and_update(
            self.run, self.train_state, rollout, scores, reward_function=reward_function_name(self.task), old_log_probs=old_lp,
            ref_log_probs=ref_log_probs, values=values, kl_coef=kl_coef, kernel=self.kernel, fields=computed, rank_rows=rows,
            dp=self.dp,
        )
        metrics.update(clock.timings())
        reshard(self.train_state.model)  # a step skipped before its backward kept the sampling's gather
        self.exp = (exp, rows) if values is not None else None
        return metrics, generated.seconds

    def _old_policy_pass(self, rollout, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``old_policy_pass`` of the whole batch: each rank computes its ``rows`` with the full
        parameters (kept gathered for the update) and one all-gather joins the log-probs and the
        computed fields, so no rank runs the whole batch's forward."""
        names = sorted(self.run.computed_fields)
        t = rollout.response_ids.shape[1]

        def fn(model, share) -> torch.Tensor:
            lp, fields = old_policy_pass(self.run, model, share)
            return torch.cat([lp, *(fields[k] for k in names)], dim=-1)

        whole = share_forward(self.train_state.model, rollout, rows, self.dp, fn, keep=True).to(self.device).split(t, dim=-1)
        return whole[0], dict(zip(names, whole[1:]))

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
