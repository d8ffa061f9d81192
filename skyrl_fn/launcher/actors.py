"""The Ray actors of a training run: plain classes, wrapped with ``ray.remote`` by the runner.

Each actor receives the one ``ResolvedRun`` (config + ``AlgorithmTable``) in its constructor and
builds its own model from it; algorithm pieces are looked up in ``run.table``, never in a global.
The same seeds as the in-process loop give the same initial weights in every actor.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import torch

from skyrl_fn.gpu.memory import release_cached_memory
from skyrl_fn.launcher.devices import actor_device, to_device
from skyrl_fn.launcher.weights import PackedWeights, pack, unpack
from skyrl_fn.train import checkpoint as ckpt
from skyrl_fn.train.config import ResolvedRun

__all__ = ["PolicyTrainer", "RolloutWorker", "ReferenceModel", "Critic", "hosts_rollout"]


def _torch_threads(run: ResolvedRun) -> int:
    """``trainer.torch_threads`` as the in-process loop uses it; 0 means every core of the node
    (Ray itself would set OMP_NUM_THREADS=1 for a fractional actor)."""
    n = int(getattr(run.config.trainer, "torch_threads", 0))
    return n if n > 0 else (os.cpu_count() or 1)


class _Base:
    def __init__(self, run: ResolvedRun) -> None:
        from skyrl_fn.train.loop import seed_everything
        from skyrl_fn.train.model import load_tokenizer
        from skyrl_fn.train.tasks import make_task

        torch.set_num_threads(_torch_threads(run))
        self.run = run
        cfg = run.config
        seed_everything(cfg.trainer.seed)
        self.task = make_task(cfg.data, seed=cfg.trainer.seed)
        self.tokenizer = load_tokenizer(cfg.model, alphabet=self.task.alphabet)
        # "cuda" only when Ray gave this actor a GPU (skyrl_fn.gpu placement); else "cpu".
        self.device = actor_device()
        # Colocated vLLM engines wake up after the trainer side's work: give cached memory back.
        self.shares_gpu = cfg.rollout.backend == "vllm" and cfg.gpu.colocate

    def ping(self) -> int:
        return os.getpid()

    def table_names(self, kind: str) -> tuple[str, ...]:
        """The names this actor's table holds (it is the driver's table)."""
        return self.run.table.names(kind)


def hosts_rollout(run: ResolvedRun) -> bool:
    """True when the policy trainer samples itself (``ray.rollout_workers == 0`` on the hf path)."""
    cfg = run.config
    return cfg.ray.rollout_workers == 0 and cfg.rollout.backend == "hf"


def _generate_and_score(backend, task, examples, seed: int):
    """``(rollout, scores [B], seconds)``: sample ``examples`` with ``backend``, score with ``task``."""
    from skyrl_fn.train.tasks import score

    t0 = time.perf_counter()
    rollout = backend.generate([e.prompt for e in examples], seed=seed)
    scores = torch.tensor(score(task, rollout.responses, examples, rollout.group_ids.tolist()), dtype=torch.float32)
    return rollout, scores, time.perf_counter() - t0


class PolicyTrainer(_Base):
    """The policy with its optimiser: old log-probs, experience, update, weights, state.

    With :func:`hosts_rollout` it also samples (``generate``) with its own model, as the
    in-process loop does: the rollout and scores stay in this actor for the ``update`` that
    follows, and no weights travel anywhere.
    """

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run)
        from skyrl_fn.train.learner import loss_kernel, make_train_state
        from skyrl_fn.train.model import load_model
        from skyrl_fn.train.rollout import make_backend

        cfg = run.config
        tr = cfg.trainer
        model = load_model(cfg.model, self.tokenizer, seed=tr.seed)
        if self.device != "cpu":
            model = model.to(self.device)
        self.state = make_train_state(model, lr=tr.lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)
        self.kernel = loss_kernel(run, device_type=torch.device(self.device).type)
        self.sender = None  # BroadcastSender when the engines have their own GPUs
        self.backend = make_backend(cfg.rollout, model, self.tokenizer) if hosts_rollout(run) else None
        self.kept: tuple[Any, Any] | None = None  # (rollout, scores) of the last local generate

    def generate(self, examples, seed: int, share: bool = False):
        """Sample and score here (hybrid layout); keeps ``(rollout, scores)`` for :meth:`update`.

        Returns ``(rollout or None, seconds)``: the rollout only when ``share`` (the reference
        model or critic needs it), so nothing is serialised otherwise.
        """
        if self.backend is None:
            raise RuntimeError("PolicyTrainer.generate: this run has separate rollout workers (ray.rollout_workers > 0)")
        self.state.model.eval()
        rollout, scores, seconds = _generate_and_score(self.backend, self.task, examples, seed)
        self.kept = (rollout, scores)
        return (rollout if share else None), seconds

    def generate_and_update(self, examples, seed: int, kl_coef: float = 0.0):
        """:meth:`generate` then :meth:`update` in one call (hybrid layout, no reference model or
        critic waiting for the rollout). Returns ``(metrics, sampling seconds)``."""
        _, seconds = self.generate(examples, seed)
        return self.update(kl_coef=kl_coef)[0], seconds

    def update(self, rollout=None, scores=None, ref_log_probs=None, values=None, kl_coef: float = 0.0):
        """Old log-probs, advantages (the run's estimator, from the shipped table), one update.

        ``rollout``/``scores`` None: those of the last :meth:`generate` here (hybrid layout).
        Returns ``(metrics, experience, weights)``: the experience feeds the critic (None without
        one), the new weights go straight to the rollout workers (None when there are none).
        """
        from skyrl_fn.train.learner import batched_log_probs, make_experience, policy_update

        t0 = time.perf_counter()
        cfg = self.run.config
        if rollout is None:
            if self.kept is None:
                raise RuntimeError("PolicyTrainer.update: no rollout given and none generated here")
            (rollout, scores), self.kept = self.kept, None
        if self.device != "cpu":
            rollout, scores, ref_log_probs, values = to_device((rollout, scores, ref_log_probs, values), self.device)
        model = self.state.model
        model.eval()
        old_lp = None  # as the in-process loop: taken from policy_update's first forward pass
        if getattr(cfg.algorithm, "recompute_old_log_probs", True):
            old_lp = batched_log_probs(model, rollout, micro_batch_size=cfg.trainer.micro_batch_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
        exp, metrics = make_experience(
            self.run, rollout, scores, old_log_probs=old_lp, ref_log_probs=ref_log_probs, values=values, kl_coef=kl_coef
        )
        metrics.update(policy_update(self.run, self.state, exp, kernel=self.kernel))
        metrics["update_seconds"] = time.perf_counter() - t0
        if values is not None and self.device != "cpu":
            exp = to_device(exp, "cpu")
        # Broadcast layout: weights travel over NCCL (broadcast()), not through the object store;
        # hybrid layout: they never leave this actor.
        push = self.sender is None and self.backend is None
        release_cached_memory(self.device, colocated=self.shares_gpu)
        return metrics, (exp if values is not None else None), (self.weights() if push else None)

    def weights(self) -> PackedWeights:
        """The current weights packed into one byte buffer (:mod:`skyrl_fn.launcher.weights`):
        Ray copies it into its object store once and the workers read it zero-copy."""
        return pack(self.state.model.state_dict())

    def get_state(self) -> dict[str, Any]:
        s = self.state
        weights = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        state = {"weights": weights, "optim": s.optimizer.state_dict(), "sched": s.scheduler.state_dict(), "rng": ckpt.capture_rng()}
        return to_device(state, "cpu") if self.device != "cpu" else state

    # -- broadcast weight sync (engines on their own GPUs; needs CUDA and vLLM) -------------
    def sync_address(self) -> tuple[str, int]:
        """``(host, port)`` of this node for the NCCL sync group's rendezvous."""
        import ray

        from skyrl_fn.gpu.weight_sync import free_port

        return ray.util.get_node_ip_address(), free_port()

    def init_broadcast(self, host: str, port: int, world_size: int):
        """Become rank 0 of the sync group (concurrently the engines join); returns the bucket plan."""
        from skyrl_fn.gpu.weight_sync import BroadcastSender

        self.sender = BroadcastSender(host, port, world_size, device=self.device)
        self.plan = self.sender.plan(self._hf_weights())
        return self.plan

    def broadcast(self) -> None:
        """Send the current weights to every engine (they call ``receive_broadcast`` concurrently)."""
        self.sender.send(self._hf_weights(), self.plan)

    def _hf_weights(self):
        from skyrl_fn.gpu.weight_sync import to_hf_names

        model = self.state.model
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        return to_hf_names({k: v.detach() for k, v in model.state_dict().items()}, tied_embeddings=tied)

    def set_state(self, weights, optim, sched, rng=None) -> None:
        self.state.model.load_state_dict(weights)
        self.state.optimizer.load_state_dict(optim)
        self.state.scheduler.load_state_dict(sched)
        if rng is not None:
            ckpt.restore_rng(rng)


class RolloutWorker(_Base):
    """Samples responses with its own copy of the policy and scores them with the task."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run)
        from skyrl_fn.train.model import load_model
        from skyrl_fn.train.rollout import make_backend

        cfg = run.config
        self.model = load_model(cfg.model, self.tokenizer, seed=cfg.trainer.seed).eval()
        if self.device != "cpu" and cfg.rollout.backend == "hf":  # vLLM loads its own copy
            self.model = self.model.to(self.device)
        self.backend = make_backend(cfg.rollout, self.model, self.tokenizer, seed=cfg.trainer.seed, colocated=cfg.gpu.colocate)

    def generate(self, examples, seed: int):
        """``(rollout, scores [B], seconds)`` for ``examples``."""
        return _generate_and_score(self.backend, self.task, examples, seed)

    def sync(self, weights: PackedWeights | Mapping[str, torch.Tensor]) -> None:
        """Load the policy's weights (``PolicyTrainer.weights()``, or a state dict of tensors)."""
        self.backend.sync_weights(unpack(weights) if isinstance(weights, PackedWeights) else dict(weights))

    def init_broadcast(self, host: str, port: int, rank_offset: int, world_size: int):
        """Join the policy's NCCL sync group (vLLM backend; ``weight_sync.broadcast_ranks``)."""
        return self.backend.init_broadcast(host, port, rank_offset, world_size)

    def receive_broadcast(self, plan) -> None:
        """Receive the policy's weights (run concurrently with ``PolicyTrainer.broadcast``)."""
        self.backend.receive_broadcast(plan)


class ReferenceModel(_Base):
    """The frozen initial policy: reference log-probs for the KL terms."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run)
        from skyrl_fn.train.model import load_model

        cfg = run.config
        self.model = load_model(cfg.model, self.tokenizer, seed=cfg.trainer.seed).eval()
        self.model.requires_grad_(False)
        if self.device != "cpu":
            self.model = self.model.to(self.device)

    def log_probs(self, rollout) -> torch.Tensor:
        from skyrl_fn.train.learner import batched_log_probs

        cfg = self.run.config
        if self.device != "cpu":
            lp = batched_log_probs(self.model, to_device(rollout, self.device), micro_batch_size=cfg.trainer.micro_batch_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
            release_cached_memory(self.device, colocated=self.shares_gpu)
            return lp.cpu()
        return batched_log_probs(self.model, rollout, micro_batch_size=cfg.trainer.micro_batch_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)


class Critic(_Base):
    """The value model with its optimiser (GAE)."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run)
        from skyrl_fn.train.learner import make_train_state
        from skyrl_fn.train.model import build_critic

        cfg = run.config
        tr = cfg.trainer
        critic = build_critic(cfg.model, self.tokenizer, seed=tr.seed)
        if self.device != "cpu":
            critic = critic.to(self.device)
        self.state = make_train_state(critic, lr=tr.critic_lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)

    def values(self, rollout) -> torch.Tensor:
        from skyrl_fn.train.learner import batched_values

        self.state.model.eval()
        if self.device != "cpu":
            values = batched_values(self.state.model, to_device(rollout, self.device), micro_batch_size=self.run.config.trainer.micro_batch_size).cpu()
            release_cached_memory(self.device, colocated=self.shares_gpu)
            return values
        return batched_values(self.state.model, rollout, micro_batch_size=self.run.config.trainer.micro_batch_size)

    def update(self, exp) -> dict[str, float]:
        from skyrl_fn.train.learner import critic_update

        metrics = critic_update(self.run, self.state, to_device(exp, self.device) if self.device != "cpu" else exp)
        release_cached_memory(self.device, colocated=self.shares_gpu)
        return metrics

    def get_state(self) -> dict[str, Any]:
        s = self.state
        state = {"weights": s.model.state_dict(), "optim": s.optimizer.state_dict(), "sched": s.scheduler.state_dict()}
        return to_device(state, "cpu") if self.device != "cpu" else state

    def set_state(self, weights, optim, sched) -> None:
        self.state.model.load_state_dict(weights)
        self.state.optimizer.load_state_dict(optim)
        self.state.scheduler.load_state_dict(sched)
