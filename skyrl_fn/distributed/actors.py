"""The Ray actors of a training run: the role workers of ``skyrl_fn.trainer.workers`` with what a
Ray actor adds (its device, batches moved onto it, the weight push, the NCCL broadcast).

Each actor receives the one ``ResolvedRun`` (config + bound ``Algorithm``) in its constructor
and builds only its own role, with the same seeds as the in-process workers, so every copy of the
policy starts with the same weights. The step's work is the role workers' own methods: the
actors call exactly what :class:`~skyrl_fn.trainer.workers.LocalWorkers` calls.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Mapping, Sequence

import torch

from skyrl_fn.ops.memory import release_cached_memory
from skyrl_fn.rollout.buckets import ties_embeddings, to_hf_names
from skyrl_fn.rollout.weight_sync import BroadcastSender, free_port
from skyrl_fn.distributed.devices import actor_device, to_device
from skyrl_fn.distributed.weights import PackedWeights, pack, unpack
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import roles
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.loop import seed_everything
from skyrl_fn.trainer.teacher import TeacherWorker

__all__ = ["PolicyTrainer", "RolloutWorker", "ReferenceModel", "TeacherModel", "Critic", "hosts_rollout", "release"]


def _start(run: ResolvedRun) -> str:
    """Threads and seeds of this actor process; returns its device."""
    n = int(run.config.trainer.torch_threads)
    # 0 means every core of the node (Ray itself would set OMP_NUM_THREADS=1 for a fractional actor).
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))
    seed_everything(run.config.trainer.seed)
    # "cuda" only when Ray gave this actor a GPU (skyrl_fn.distributed placement); else "cpu".
    return actor_device()


def _shares_gpu(run: ResolvedRun) -> bool:
    """Colocated vLLM engines wake up after the trainer side's work: it gives cached memory back."""
    return run.backend_is_engine and run.config.gpu.colocate


def hosts_rollout(run: ResolvedRun) -> bool:
    """True when the policy trainer samples itself (``ray.rollout_workers == 0`` with a backend that
    samples with the trainer's own module, as ``hf`` and any backend that is not an engine)."""
    return run.config.ray.rollout_workers == 0 and not run.backend_is_engine


class _Ping:
    def ping(self) -> int:
        return os.getpid()


class WeightSender:
    """The trainer side of the NCCL weight broadcast to vLLM engines on their own GPUs (driven by
    ``skyrl_fn.distributed.broadcast``; needs CUDA and vLLM). The class gives ``_hf_weights()``,
    the full weights under Hugging Face names, and ``_sends``: the single policy actor sends; of
    the data-parallel ranks rank 0 does, and every rank calls ``_hf_weights`` (a collective
    there: the full weights are gathered, onto rank 0)."""

    sender: BroadcastSender | None = None  # set by init_broadcast
    _sends = True

    def sync_address(self) -> tuple[str, int]:
        """``(host, port)`` of this node for the NCCL sync group's rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def init_broadcast(self, host: str, port: int, world_size: int):
        """Become rank 0 of the sync group (concurrently the engines join); returns the bucket
        plan (None where nothing is sent)."""
        weights = self._hf_weights()
        if not self._sends:
            return None
        self.sender = BroadcastSender(host, port, world_size, device=self.device)
        self.sync_plan = self.sender.plan(weights)
        return self.sync_plan

    def broadcast(self) -> None:
        """Send the current weights to every engine (they call ``receive_broadcast`` concurrently)."""
        weights = self._hf_weights()
        if self._sends:
            self.sender.send(weights, self.sync_plan)


class PolicyTrainer(roles.PolicyWorker, WeightSender, _Ping):
    """The policy role as an actor. With :func:`hosts_rollout` it also samples: the generated
    batch stays in this actor for the ``update`` that follows, and no weights travel anywhere."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run, samples=hosts_rollout(run), device=_start(run))
        self.kept: roles.Generated | None = None  # the batch of the last local generate

    def generate_here(self, examples, seed: int, share: bool = False):
        """Sample here (hybrid layout) and keep the batch for :meth:`update_here`. Returns
        ``(generated or None, seconds)``: the batch only when ``share`` (the reference model or the
        critic needs it), so nothing is serialised otherwise."""
        self.kept = self.generate(examples, seed)
        return (self.kept if share else None), self.kept.seconds

    def generate_and_update(self, examples, seed: int, kl_coef: float):
        """:meth:`generate_here` then :meth:`update_here` in one call (hybrid layout, nobody else
        waiting for the batch). Returns ``(metrics, sampling seconds)``."""
        _, seconds = self.generate_here(examples, seed)
        return self.update_here(None, None, None, kl_coef)[0], seconds

    def transform_here(self, fn, *generated: roles.Generated):
        """``PolicyWorker.transform`` (the batch transforms) on ``generated``; the result becomes the
        batch the next :meth:`update_here` trains on. Returns ``(batch or None, metrics, sampling seconds)``."""
        out, metrics = self.transform(fn, *generated)
        self.kept = out
        return out, metrics, float(sum(g.seconds for g in generated if isinstance(g, roles.Generated)))

    def update_here(self, generated, ref_log_probs, values, kl_coef: float):
        """``PolicyWorker.update`` on ``generated`` (None: the batch kept by the last
        :meth:`generate_here`). Returns ``(metrics, experience or None, weights or None)``: the
        experience feeds the critic (None without one); the packed weights go straight to
        separate rollout workers (None when there are none or the broadcast carries them)."""
        if generated is None:
            if self.kept is None:
                raise RuntimeError("PolicyTrainer.update_here: no batch given and none generated here")
            generated, self.kept = self.kept, None
        # to_device moves nothing (and copies nothing) on the CPU path.
        rollout, scores, ref_log_probs, values = to_device((generated.rollout, generated.scores, ref_log_probs, values), self.device)
        metrics, exp = self.update(rollout, scores, ref_log_probs, values, kl_coef)
        if values is not None:
            exp = to_device(exp, "cpu")
        push = self.sender is None and self.backend is None
        release_cached_memory(self.device, colocated=_shares_gpu(self.run))
        return metrics, (exp if values is not None else None), (self.packed_weights() if push else None)

    def packed_weights(self) -> PackedWeights:
        """The current weights in one byte buffer (:mod:`skyrl_fn.distributed.weights`): Ray copies
        it into its object store once and the workers read it zero-copy."""
        return pack(self.weights())

    def get_state(self) -> tuple[roles.RoleState, Mapping[str, Any]]:
        """``(state, RNG states of this process)``, on the CPU."""
        return to_device(self.state(), "cpu"), ckpt.capture_rng()

    def set_state(self, saved: roles.RoleState, rng: Mapping[str, Any] | None = None) -> None:
        self.load_state(saved)
        if rng is not None:
            ckpt.restore_rng(rng)

    def _hf_weights(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names, for the NCCL broadcast (:class:`WeightSender`)."""
        model = self.train_state.model
        return to_hf_names({k: v.detach() for k, v in model.state_dict().items()}, tied_embeddings=ties_embeddings(model))


class RolloutWorker(roles.RolloutWorker, _Ping):
    """The rollout role as an actor: samples with its own copy of the policy."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run, device=_start(run))

    def generate_split(self, examples, seed: int):
        """``(generated, seconds)``: two results, so the driver reads the time without the batch."""
        generated = self.generate(examples, seed)
        return generated, generated.seconds

    def sync_packed(self, weights: PackedWeights | Mapping[str, torch.Tensor]) -> None:
        """Load the policy's weights (``PolicyTrainer.packed_weights()``, or a state dict)."""
        self.sync(unpack(weights) if isinstance(weights, PackedWeights) else dict(weights))

    def init_broadcast(self, host: str, port: int, rank_offset: int, world_size: int):
        """Join the policy's NCCL sync group (vLLM backend; ``weight_sync.broadcast_ranks``)."""
        return self.backend.init_broadcast(host, port, rank_offset, world_size)

    def receive_broadcast(self, plan) -> None:
        """Receive the policy's weights (run concurrently with ``PolicyTrainer.broadcast``)."""
        self.backend.receive_broadcast(plan)


class _ScorerActor(_Ping):
    """A frozen scorer (``skyrl_fn.trainer.forward.FrozenScorer``) as an actor."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run, device=_start(run))

    def log_probs_of(self, generated: roles.Generated) -> torch.Tensor:
        lp = self.log_probs(to_device(generated.rollout, self.device)).cpu()
        release_cached_memory(self.device, colocated=_shares_gpu(self.run))
        return lp


class ReferenceModel(_ScorerActor, roles.ReferenceWorker):
    """The reference role as an actor."""


class TeacherModel(_ScorerActor, TeacherWorker):
    """The teacher role as an actor (on-policy distillation)."""


class Critic(roles.CriticWorker, _Ping):
    """The critic role as an actor."""

    def __init__(self, run: ResolvedRun) -> None:
        super().__init__(run, device=_start(run))

    def values_of(self, generated: roles.Generated) -> torch.Tensor:
        values = self.values(to_device(generated.rollout, self.device)).cpu()
        release_cached_memory(self.device, colocated=_shares_gpu(self.run))
        return values

    def update_on(self, exp) -> dict[str, float]:
        """The critic update on the experience ``PolicyTrainer.update_here`` returned."""
        metrics = self.update(None if exp is None else to_device(exp, self.device))  # None: skipped step
        release_cached_memory(self.device, colocated=_shares_gpu(self.run))
        return metrics

    def get_state(self) -> roles.RoleState:
        return to_device(self.state(), "cpu")

    def set_state(self, saved: roles.RoleState) -> None:
        self.load_state(saved)


def release(actors: Sequence[Any], pg: Any = None, *, timeout: float = 30.0) -> None:
    """Kill ``actors`` (already dead ones are skipped), wait until each is dead, and remove the
    placement group ``pg``.

    ``ray.kill`` only asks: for a moment the actor may still answer calls and hold its CPUs, so
    a run started right after this one could find the cluster short. Each actor is therefore
    called until the call fails with ``RayActorError`` (at most ``timeout`` seconds in all; an
    actor still answering then is left to Ray, with a warning naming how many)."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # already dead: nothing left to release
            pass
    deadline = time.monotonic() + timeout
    alive = 0
    for a in actors:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                alive += 1
                break
            try:
                ray.get(a.__ray_ready__.remote(), timeout=left)
            except RayActorError:
                break  # dead
            except Exception:  # GetTimeoutError: the deadline passed
                continue
            time.sleep(0.02)  # it answered: the kill has not reached it yet
    if alive:
        warnings.warn(f"{alive} Ray actor(s) still answered {timeout:g} s after ray.kill; left to Ray to stop", RuntimeWarning, stacklevel=2)
    if pg is not None:
        remove_placement_group(pg)
