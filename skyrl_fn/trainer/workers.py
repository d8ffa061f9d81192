"""The ``Workers`` protocol the training loop drives, and :class:`LocalWorkers`, every role in
this process.

The roles themselves (policy, rollout, reference, critic) are in :mod:`skyrl_fn.trainer.roles`;
the Ray implementation is ``skyrl_fn.distributed.ray_workers.RayWorkers`` (and
``skyrl_fn.distributed.dp.DPWorkers`` for data-parallel ranks). Each method returns a *handle*:
the value itself in-process, a Ray object reference on Ray; the loop passes handles on without
looking inside and waits once per step (:meth:`Workers.wait`).

Notation: ``P`` prompts, ``G`` samples per prompt, ``B = P * G``, ``T`` response tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.roles import (
    CriticWorker, Generated, PolicyWorker, ReferenceWorker, RoleState, SavedShards, WorkersState,
)
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.teacher import TeacherWorker

__all__ = ["Workers", "LocalWorkers", "state_from_checkpoint", "trained_roles"]


class Workers(Protocol):
    """What the training loop asks of the workers; every return value is a handle (see the
    module docstring). Implementations: :class:`LocalWorkers` (in-process) and
    ``skyrl_fn.distributed.ray_workers.RayWorkers``.

    A data-parallel implementation splits the batch inside ``update_policy`` (each rank updates
    on its share with the whole batch's normalisers). Calls take effect in the order they are
    made: ``generate`` samples with the policy after every ``update_policy`` called before it,
    even when its handle is waited for later, which is what asynchronous training
    (``skyrl_fn.trainer.async_loop``) relies on to know the policy version of every batch.
    """

    def generate(self, examples: Sequence[Any], *, step: int, seed: int) -> Any:
        """Sample and score ``examples`` for step ``step`` (0-based) with sampling seed ``seed``."""

    def transform(self, fn: Callable[..., Any], *generated: Any) -> tuple[Any, dict[str, float]]:
        """Run ``fn(batches, pad_id=...) -> (batch or None, metrics)`` where the batches live (the
        batch transforms, ``skyrl_fn.trainer.batch_transforms``); returns the handle of its batch
        and its metrics (waits for those)."""

    def reference_log_probs(self, generated: Any) -> Any:
        """Reference log-probs ``[B, T]`` of the generated batch (runs that use a KL)."""

    def values(self, generated: Any) -> Any:
        """Critic values ``[B, T]`` of the generated batch (runs with a critic)."""

    def teacher_log_probs(self, generated: Any) -> Any:
        """Teacher log-probs ``[B, T]`` of the generated batch (runs with ``teacher.model``)."""

    def update_policy(self, generated: Any, ref_log_probs: Any, values: Any, kl_coef: float) -> Any:
        """Experience and the policy update; a handle of ``(metrics, experience)``."""

    def update_critic(self, updated: Any) -> Any:
        """The critic update on the experience of ``updated``; a handle of its metrics."""

    def wait(self, generated: Any, updated: Any, critic: Any) -> tuple[dict[str, float], float]:
        """Wait for the step: ``(policy metrics merged with the critic's, sampling seconds)``."""

    def fetch_generated(self, generated: Any) -> Generated:
        """The :class:`Generated` batch behind a handle of :meth:`generate` (blocks until it is
        sampled); asynchronous training saves the batches in flight with a checkpoint."""

    def put_generated(self, batch: Generated) -> Any:
        """A handle of :meth:`generate`'s kind holding ``batch`` (a batch restored on resume)."""

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        """Greedy pass@1 of the current policy (after every update so far) on held-out
        ``examples``: the ``eval_*`` metrics of ``skyrl_fn.trainer.evaluate.evaluate``. Blocks."""

    def state(self) -> WorkersState:
        """The state of every role (for a checkpoint)."""

    def load_state(self, saved: WorkersState) -> None:
        """Load what :meth:`state` returned (``state_from_checkpoint`` of a checkpoint)."""

    def close(self) -> None:
        """Release the workers (wait for anything still in flight)."""


def trained_roles(run: ResolvedRun) -> tuple[str, ...]:
    """The roles ``run`` trains, so the roles a checkpoint holds and a resume loads: ``policy``,
    and ``critic`` when the estimator reads values. (The reference model and a teacher are frozen
    and rebuilt from their model source; they are not saved.)"""
    return ("policy", "critic") if run.uses_critic else ("policy",)


def state_from_checkpoint(c: Any) -> WorkersState:
    """A :class:`WorkersState` from a ``skyrl_fn.trainer.checkpoint.Checkpoint``: whole roles as
    :class:`RoleState`, sharded ones as :class:`SavedShards`."""
    roles: dict[str, RoleState | SavedShards] = {}
    for role in ("policy", "critic"):  # what the checkpoint holds (the run may not need the critic)
        if role in c.weights:
            roles[role] = RoleState(weights=c.weights[role], optim=c.optim[role], sched=c.optim[f"{role}_sched"])
        elif role in c.shards:
            roles[role] = SavedShards(path=c.shards[role], sched=c.optim[f"{role}_sched"])
    return WorkersState(roles=roles, rng=c.rng)


class LocalWorkers:
    """Every role in this process; the policy samples itself (the hybrid layout)."""

    def __init__(self, run: ResolvedRun) -> None:
        self.policy = PolicyWorker(run, samples=True)
        self.reference = ReferenceWorker(run) if run.uses_reference else None
        self.critic = CriticWorker(run) if run.uses_critic else None
        self.teacher = TeacherWorker(run) if run.uses_teacher else None

    def generate(self, examples: Sequence[Any], *, step: int, seed: int) -> Generated:
        return self.policy.generate(examples, seed)

    def transform(self, fn, *generated: Generated):
        return self.policy.transform(fn, *generated)

    def reference_log_probs(self, generated: Generated) -> torch.Tensor:
        return self.reference.log_probs(generated.rollout)

    def values(self, generated: Generated) -> torch.Tensor:
        return self.critic.values(generated.rollout)

    def teacher_log_probs(self, generated: Generated) -> torch.Tensor:
        return self.teacher.log_probs(generated.rollout)

    def update_policy(self, generated: Generated, ref_log_probs, values, kl_coef: float):
        return self.policy.update(generated.rollout, generated.scores, ref_log_probs, values, kl_coef)

    def update_critic(self, updated) -> dict[str, float]:
        return self.critic.update(updated[1])

    def wait(self, generated: Generated, updated, critic) -> tuple[dict[str, float], float]:
        metrics = dict(updated[0])
        if critic is not None:
            metrics.update(critic)
        return metrics, generated.seconds

    def fetch_generated(self, generated: Generated) -> Generated:
        return generated

    def put_generated(self, batch: Generated) -> Generated:
        return batch

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        return self.policy.evaluate(examples)

    def state(self) -> WorkersState:
        roles = {"policy": self.policy.state()}
        if self.critic is not None:
            roles["critic"] = self.critic.state()
        return WorkersState(roles=roles, rng=ckpt.capture_rng())

    def load_state(self, saved: WorkersState) -> None:
        self.policy.load_state(saved.roles["policy"])
        if self.critic is not None:
            self.critic.load_state(saved.roles["critic"])
        ckpt.restore_rng(saved.rng)

    def close(self) -> None:
        pass
