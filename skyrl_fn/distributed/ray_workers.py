"""``RayWorkers``: the ``Workers`` protocol of ``skyrl_fn.trainer.workers`` with one Ray actor per role.

The training loop is ``skyrl_fn.trainer.loop.train`` itself; this module only decides where each
role runs and moves object references between the actors, so a batch never passes through the
driver. Handles are Ray object references; the loop waits once per step (:meth:`RayWorkers.wait`).

Layouts (chosen by ``ray.rollout_workers`` and ``rollout.backend``):

- hybrid (default, ``--ray.rollout-workers 0``, as verl's actor-rollout worker): the policy
  trainer samples with its own model; the batch stays in that actor and no weights travel. With
  neither a reference model nor a critic waiting for the batch, sampling and update are one call.
- separate (``--ray.rollout-workers N``): N rollout actors, prompts split between them (with one
  worker sampling equals the hybrid layout's); after each update the policy's packed weights are
  queued to every worker (each runs it before its next ``generate``).
- asynchronous (``--trainer.max-staleness K`` with separate workers; ``skyrl_fn.trainer.async_loop``):
  the loop calls ``generate`` for step ``s + K`` before ``update_policy`` of step ``s``, so the
  rollout workers sample while the trainer updates; K - 1 weight pushes may stay queued behind
  rollouts in flight (``SyncTracker`` with ``keep``).
- GPU (``--rollout.backend vllm``): the actors go into one placement group planned by
  ``skyrl_fn.distributed.placement.plan_placement`` (``skyrl_fn.distributed.devices.gpu_plan``), one rollout worker per
  vLLM engine; with ``--gpu.no-colocate`` the weight push is an NCCL broadcast.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs

from skyrl_fn.distributed.broadcast import broadcast, form_group
from skyrl_fn.distributed.failures import NamedActors, WorkerDiedError
from skyrl_fn.distributed.placement import actor_options, create_placement_group
from skyrl_fn.distributed.sync_check import SyncTracker
from skyrl_fn.distributed.actors import (
    Critic,
    PolicyTrainer,
    ReferenceModel,
    RolloutWorker,
    TeacherModel,
    hosts_rollout,
    release,
)
from skyrl_fn.distributed.devices import gpu_plan
from skyrl_fn.distributed.layout import pad_id, sample_on, with_rollout_workers
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.roles import Generated, WorkersState

__all__ = ["CPU_SHARES", "WorkerDiedError", "RayWorkers"]

#: Fractional CPUs each actor asks for. The step is sequential on-policy RL, so actors mostly
#: take turns; the fractions only need to fit (1.5 CPUs in total with GAE and KL).
CPU_SHARES: Mapping[str, float] = {"policy": 0.5, "rollout": 0.5, "reference": 0.25, "critic": 0.25, "teacher": 0.25}


@attrs.frozen(eq=False)
class _Deferred:
    """Hybrid layout with nobody else needing the batch: sampling waits for ``update_policy``."""

    examples: Sequence[Any]
    seed: int


@attrs.frozen(eq=False)
class _Sampled:
    """References of a generated batch (None when it stayed in the policy trainer) and its time."""

    generated: Any
    seconds: Any


@attrs.frozen(eq=False)
class _Updated:
    metrics: Any
    exp: Any
    seconds: Any = None  # set when sampling ran in the same call


class RayWorkers(NamedActors):
    """The actors of one run.

    Args:
        run: the one ``ResolvedRun``; passed as-is to every actor.
        num_rollout_workers: overrides ``ray.rollout_workers`` (None keeps it).
    """

    def __init__(self, run: ResolvedRun, *, num_rollout_workers: int | None = None) -> None:
        import ray

        run = with_rollout_workers(run, num_rollout_workers)
        self.run = run
        cfg = run.config
        n_rollout = cfg.ray.rollout_workers
        # GPU path: one placement group, each actor on its planned bundle. None on CPU (CPU_SHARES).
        self.plan = gpu_plan(run)
        self.pg = None
        self.broadcast_plan = None  # bucket plan of the NCCL weight sync (separate GPU layout)
        if self.plan is not None:
            self.pg = create_placement_group(self.plan)
            n_rollout = self.plan.num_engines

        def start(cls, role: str, index: int, share: float, name: str):
            if self.plan is None:
                handle = ray.remote(num_cpus=share, max_restarts=0)(cls).remote(run)
            else:
                opts = actor_options(self.plan.of(role)[index], self.pg)
                handle = ray.remote(max_restarts=0)(cls).options(**opts).remote(run)
            self.names[handle._actor_id.hex()] = name
            return handle

        self.names: dict[str, str] = {}
        self.step_index = -1  # -1: still starting (constructors running)
        self.saved = bool(cfg.trainer.resume)  # a checkpoint of this run may exist on disk
        self.hybrid = self.plan is None and hosts_rollout(run)
        # Someone besides the policy's update reads the batch (or batch transforms take it first).
        self.share = run.uses_reference or run.uses_critic or run.uses_teacher or run.batch_transforms is not None
        self.policy = None
        self.rollout = [
            start(RolloutWorker, "rollout", i, CPU_SHARES["rollout"] / max(1, n_rollout), f"rollout worker {i} (RolloutWorker)")
            for i in range(n_rollout)
        ]
        self.pad = pad_id(run) if n_rollout > 1 else None  # joins the workers' batches (sample_on)
        if self.plan is not None and self.plan.colocate:
            # Engines first: vLLM needs gpu_memory_utilization x total free at start-up, then
            # sleeps, so the trainer-side models load into the memory it frees.
            self.get([w.ping.remote() for w in self.rollout])
        policy_share = CPU_SHARES["policy"] + (CPU_SHARES["rollout"] if self.hybrid else 0.0)
        self.policy = start(PolicyTrainer, "policy", 0, policy_share, "policy trainer (PolicyTrainer)")
        self.reference = start(ReferenceModel, "reference", 0, CPU_SHARES["reference"], "reference model (ReferenceModel)") if run.uses_reference else None
        self.critic = start(Critic, "critic", 0, CPU_SHARES["critic"], "critic (Critic)") if run.uses_critic else None
        self.teacher = start(TeacherModel, "teacher", 0, CPU_SHARES["teacher"], "teacher model (TeacherModel)") if run.uses_teacher else None
        self.sync_timeout_s = cfg.gpu.sync_timeout_s
        # Asynchronous training (trainer.max_staleness K): K - 1 weight pushes may stay queued
        # behind rollouts in flight; waiting for them would serialise sampling and training.
        self.lag = max(0, cfg.trainer.max_staleness - 1)
        self.get([a.ping.remote() for a in self.actors()])  # constructors done, or a clear error
        if self.plan is not None and not self.plan.colocate:
            self._init_broadcast()
        self.step_index = 0
        # Each step's weight push, checked before the next generate (skyrl_fn.distributed.sync_check).
        self.syncs = SyncTracker(
            lambda ref, timeout: self.get(ref, timeout=timeout), timeout_s=self.sync_timeout_s,
            names=[self.names[w._actor_id.hex()] for w in self.rollout], passthrough=(WorkerDiedError,),
        )

    # -- the protocol ------------------------------------------------------------------------
    def generate(self, examples: Sequence[Any], *, step: int, seed: int):
        # Asynchronous training samples step + K while step trains: errors name the step training.
        self.step_index = max(0, step - self.run.config.trainer.max_staleness)
        if self.hybrid:
            if not self.share:
                return _Deferred(list(examples), seed)
            generated, seconds = self.policy.generate_here.options(num_returns=2).remote(examples, seed, True)
            return _Sampled(generated, seconds)
        self.syncs.check(keep=self.lag)  # the last step's weights reached every worker, or stop here
        return _Sampled(*sample_on(self.rollout, examples, seed, pad=self.pad, get=self.get))

    def transform(self, fn, *generated: _Sampled):
        # In the policy actor: the batches are there already in the hybrid layout, and go there next
        # in the separate one. Only the metrics come to the driver; the batch stays a reference.
        args = [g.generated if isinstance(g, _Sampled) else g for g in generated]  # batches, or other handles (teacher log-probs)
        out, metrics, seconds = self.policy.transform_here.options(num_returns=3).remote(fn, *args)
        return _Sampled(out, seconds), self.get(metrics)

    def reference_log_probs(self, generated: _Sampled):
        return self.reference.log_probs_of.remote(generated.generated)

    def values(self, generated: _Sampled):
        return self.critic.values_of.remote(generated.generated)

    def teacher_log_probs(self, generated: _Sampled):
        return self.teacher.log_probs_of.remote(generated.generated)

    def update_policy(self, generated, ref_log_probs, values, kl_coef: float) -> _Updated:
        if isinstance(generated, _Deferred):
            metrics, seconds = self.policy.generate_and_update.options(num_returns=2).remote(generated.examples, generated.seed, kl_coef)
            return _Updated(metrics, None, seconds)
        batch = None if self.hybrid else generated.generated  # hybrid: the batch stayed in the actor
        metrics, exp, weights = self.policy.update_here.options(num_returns=3).remote(batch, ref_log_probs, values, kl_coef)
        if not self.hybrid:
            if self.broadcast_plan is None:
                # Queued now, run by each worker before its next generate (an actor runs one
                # caller's calls in order); checked before the next generate and in state().
                self.syncs.record(self.step_index, [w.sync_packed.remote(weights) for w in self.rollout], keep=self.lag)
            else:  # engines on their own GPUs: NCCL broadcast, both sides started together
                self._broadcast()
        return _Updated(metrics, exp)

    def update_critic(self, updated: _Updated):
        return self.critic.update_on.remote(updated.exp)

    def wait(self, generated, updated: _Updated, critic) -> tuple[dict[str, float], float]:
        seconds = updated.seconds if updated.seconds is not None else generated.seconds
        got = self.get([updated.metrics, seconds] + ([critic] if critic is not None else []))
        metrics = dict(got[0])
        if critic is not None:
            metrics.update(got[2])
        return metrics, float(got[1])

    def fetch_generated(self, generated: _Sampled) -> Generated:
        if not isinstance(generated, _Sampled):  # hybrid without a shared batch: it never left the policy trainer
            raise RuntimeError("RayWorkers.fetch_generated: the hybrid layout keeps its batch in the policy trainer")
        return self.get(generated.generated)

    def put_generated(self, batch: Generated) -> _Sampled:
        import ray

        return _Sampled(ray.put(batch), ray.put(batch.seconds))

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        # The policy actor runs its calls in order: this one sees every update already queued.
        return self.get(self.policy.evaluate.remote(list(examples)))

    def state(self) -> WorkersState:
        self._flush()
        refs = [self.policy.get_state.remote()] + ([self.critic.get_state.remote()] if self.critic is not None else [])
        got = self.get(refs)
        (policy, rng), roles = got[0], {}
        roles["policy"] = policy
        if self.critic is not None:
            roles["critic"] = got[1]
        self.saved = True
        return WorkersState(roles=roles, rng=rng)

    def load_state(self, saved: WorkersState) -> None:
        refs = [self.policy.set_state.remote(saved.roles["policy"], saved.rng)]
        if self.broadcast_plan is None and self.rollout:
            # What the policy loaded (whole or from shards): it runs its calls in order.
            weights = self.policy.packed_weights.remote()
            refs += [w.sync_packed.remote(weights) for w in self.rollout]
        if self.critic is not None:
            refs.append(self.critic.set_state.remote(saved.roles["critic"]))
        self.get(refs)
        if self.broadcast_plan is not None:
            self._broadcast()

    def close(self) -> None:
        release(self.actors(), self.pg)
        self.pg = None

    # -- helpers -----------------------------------------------------------------------------
    def actors(self) -> list[Any]:
        return [a for a in [self.policy, *self.rollout, self.reference, self.critic, getattr(self, "teacher", None)] if a is not None]

    def _flush(self) -> None:
        """Wait for the last weight push (raises if it failed or a rollout worker died meanwhile)."""
        self.syncs.check()

    def _init_broadcast(self) -> None:
        """Form the NCCL sync group: the policy is rank 0, engine ``e``'s TP workers follow
        (``skyrl_fn.distributed.broadcast``); both sides start together."""
        self.broadcast_plan = form_group(
            self.get, [self.policy], self.rollout, tensor_parallel_size=self.run.config.rollout.tensor_parallel_size, timeout_s=self.sync_timeout_s,
        )

    def _broadcast(self) -> None:
        """Send the policy's weights to every engine over NCCL and wait for both sides."""
        broadcast(self.get, [self.policy], self.rollout, self.broadcast_plan, timeout_s=self.sync_timeout_s)

    def get(self, refs, *, timeout: float | None = None, what: str | None = None):
        """``ray.get`` that turns a dead actor into :class:`WorkerDiedError` naming it; with
        ``timeout`` (s) and ``what``, a wait that runs out is a ``TimeoutError`` naming ``what``."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as err:
            if what is None:
                raise
            raise TimeoutError(f"{what} did not finish within {timeout:g} s (--gpu.sync-timeout-s)") from err
        except (RayActorError, RayTaskError) as err:
            self._failed(err)
