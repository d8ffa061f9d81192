"""Asynchronous, bounded-staleness training: the driver samples the next K steps ahead while the
current one trains (``--trainer.max-staleness K``; docs/async.md).

Nothing here knows Ray: :class:`AsyncRollouts` reorders the calls of the
:class:`~skyrl_fn.trainer.workers.Workers` protocol. At step ``s`` it calls ``generate`` for steps
up to ``s + K`` *before* ``update_policy`` of step ``s``; since the workers run calls in the order
they are made, a rollout worker samples step ``s + K`` while the trainer updates on step ``s``,
and the weight push of update ``s`` is queued behind that rollout (between two generation calls,
never blocking the trainer, which only hands its weights to the object store).

Versions. The policy version ``v`` is the number of ``update_policy`` calls made so far (a skipped
update counts: the bound is then conservative). A batch records the version it is sampled with:
``generate`` called at step ``s`` samples with version ``s``. The update of step ``s`` runs on
version ``s``, so the batch it consumes has staleness ``s - v``, which is ``min(s, K)`` in an
uninterrupted run (at most K by construction). A batch older than K (restored from a checkpoint
written with a larger K) is regenerated with the current policy or dropped
(``--trainer.stale-samples``), and counted.

The loss sees the three log-probs: the rollout's (behaviour, ``rollout_log_probs`` of the batch),
the old (proximal) ones of the policy before the update (recomputed by the trainer) and the
current ones; the off-policy corrections (``--algorithm.off-policy-correction tis geo_mask ...``,
composed in order) act on the old/rollout gap, which now includes the staleness.

Checkpoints hold the batches in flight (``in_flight.pt``): their step, version, data position and
samples, so a resumed run continues exactly like an uninterrupted one. K = 0 never builds an
``AsyncRollouts``: the loop is the synchronous one, unchanged.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

import attrs

from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.rollout.base import RolloutBatch
from skyrl_fn.tasks.base import DataState, Task, next_prompts
from skyrl_fn.trainer.workers import Workers
from skyrl_fn.trainer.roles import Generated

__all__ = ["InFlight", "AsyncRollouts", "staleness_metrics", "generated_to_plain", "generated_from_plain"]

_BATCH_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_log_probs", "group_ids", "prompts", "responses")


@attrs.frozen(kw_only=True, eq=False)
class InFlight:
    """One step's batch, sampled ahead.

    Attributes:
        step: the step it was drawn for (its sampling seed is the seed of that step).
        examples: its ``P`` prompts.
        before: the data position before its prompts.
        version: the policy version it is sampled with (updates made before its ``generate``).
        handle: what ``Workers.generate`` returned.
    """

    step: int
    examples: Sequence[Any]
    before: DataState
    version: int
    handle: Any


def staleness_metrics(step: int, version: int, n_samples: int, max_staleness: int) -> dict[str, float]:
    """The staleness metrics of the update of step ``step`` (0-based, policy version ``step``) on
    ``n_samples`` samples of policy version ``version``: ``policy_version``, ``sample_version``,
    ``version_gap`` (``step - version``) and the histogram ``staleness_0 .. staleness_K`` (samples
    per gap; the batch of one step has one gap, the run's histogram is the sum over steps).

    Raises:
        ValueError: the gap is negative or above ``max_staleness`` (the bound this module guarantees).
    """
    gap = step - version
    if not 0 <= gap <= max_staleness:
        raise ValueError(f"version gap: expected 0 <= gap <= trainer.max_staleness = {max_staleness}, got {gap} (step {step + 1}, samples of version {version})")
    out = {f"staleness_{k}": float(n_samples if k == gap else 0) for k in range(max_staleness + 1)}
    out.update(policy_version=float(step), sample_version=float(version), version_gap=float(gap))
    return out


def generated_to_plain(g: Generated) -> dict[str, Any]:
    """``g`` as tensors, lists and floats (a checkpoint loads ``weights_only``)."""
    r = g.rollout
    batch = {f: (list(getattr(r, f)) if f in ("prompts", "responses") else getattr(r, f).detach().cpu()) for f in _BATCH_FIELDS}
    batch["extras"] = {k: v.detach().cpu() for k, v in r.extras.items()}  # the task's per-sample fields
    return {"rollout": batch, "scores": g.scores.detach().cpu(), "seconds": float(g.seconds)}


def generated_from_plain(d: Mapping[str, Any]) -> Generated:
    """Inverse of :func:`generated_to_plain`."""
    return Generated(rollout=RolloutBatch(**d["rollout"]), scores=d["scores"], seconds=float(d["seconds"]))


class AsyncRollouts:
    """The batches of the next ``K = trainer.max_staleness`` steps, sampled while a step trains.

    Per step the loop calls :meth:`take` (submits ``generate`` up to step ``s + K``, returns the
    batch of step ``s``), runs the step on it, then :meth:`consumed` (its staleness metrics; the
    policy version moves on). :attr:`data_state` is the position after the prompts of the steps
    consumed so far (what a checkpoint stores); :meth:`in_flight` is the rest, for the checkpoint.

    Args:
        run: the resolved run (``trainer.max_staleness`` >= 1).
        workers: the workers; ``generate`` must honour call order (the ``Workers`` contract).
        task: the task the prompts come from.
        data_state: the data position of step ``start``.
        start: the first step (after a resume, the checkpoint's step).
        seed_of: ``seed_of(seed, step)``, the sampling seed of a step.
        saved: a checkpoint's ``in_flight`` (:meth:`in_flight` output), or None.
    """

    def __init__(
        self, run: ResolvedRun, workers: Workers, task: Task, data_state: DataState, *, start: int,
        seed_of: Callable[[int, int], int], saved: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = run.config
        self.k = cfg.trainer.max_staleness
        if self.k < 1:
            raise ValueError(f"trainer.max_staleness: expected >= 1 for asynchronous rollouts, got {self.k}")
        self.run, self.workers, self.task, self.seed_of = run, workers, task, seed_of
        self.version = start  # update_policy calls so far: the policy version a generate now samples with
        self.queue: collections.deque[InFlight] = collections.deque()
        self.ahead = data_state  # the data position after the last prompts drawn
        self.next_step = start  # the step the next prompts are drawn for
        self.dropped = self.regenerated = 0  # samples, over this process's run
        for entry in (saved or {}).get("batches", []):
            self._restore(entry)

    @property
    def data_state(self) -> DataState:
        """The position after the prompts of every step consumed (before the first in flight)."""
        return self.queue[0].before if self.queue else self.ahead

    def _draw(self) -> None:
        cfg = self.run.config
        examples, after = next_prompts(self.task, self.ahead, cfg.trainer.prompts_per_step, shuffle=cfg.data.shuffle)
        self.queue.append(self._submit(self.next_step, examples, self.ahead))
        self.ahead, self.next_step = after, self.next_step + 1

    def _submit(self, step: int, examples: Sequence[Any], before: DataState) -> InFlight:
        seed = self.seed_of(self.run.config.trainer.seed, step)
        handle = self.workers.generate(examples, step=step, seed=seed)
        return InFlight(step=step, examples=examples, before=before, version=self.version, handle=handle)

    def _restore(self, entry: Mapping[str, Any]) -> None:
        before = DataState(**entry["before"])
        examples, after = next_prompts(self.task, before, self.run.config.trainer.prompts_per_step, shuffle=self.run.config.data.shuffle)
        handle = self.workers.put_generated(generated_from_plain(entry["generated"]))
        self.queue.append(InFlight(step=int(entry["step"]), examples=examples, before=before, version=int(entry["version"]), handle=handle))
        self.ahead, self.next_step = after, int(entry["step"]) + 1

    def take(self, step: int) -> InFlight:
        """Submit the rollouts of steps up to ``step + K`` (none past the last step), then return
        the oldest batch, within the bound: an older one is regenerated (same prompts and seed,
        the current policy) or dropped for the next one (``trainer.stale_samples``)."""
        last = self.run.config.trainer.steps - 1
        while self.next_step <= min(step + self.k, last) or not self.queue:
            self._draw()
        batch = self.queue.popleft()
        n = len(batch.examples) * self.run.config.rollout.samples_per_prompt
        while step - batch.version > self.k:
            if self.run.config.trainer.stale_samples == "regenerate":
                self.regenerated += n
                return self._submit(batch.step, batch.examples, batch.before)
            self.dropped += n
            if not self.queue:
                self._draw()
            batch = self.queue.popleft()
        return batch

    def consumed(self, batch: InFlight, step: int) -> dict[str, float]:
        """Step ``step`` submitted its update on ``batch``: the policy version moves on. Returns
        :func:`staleness_metrics` plus ``stale_dropped`` / ``stale_regenerated`` (samples so far)."""
        n = len(batch.examples) * self.run.config.rollout.samples_per_prompt
        metrics = staleness_metrics(step, batch.version, n, self.k)
        metrics.update(stale_dropped=float(self.dropped), stale_regenerated=float(self.regenerated))
        self.version += 1
        return metrics

    def in_flight(self) -> dict[str, Any]:
        """The batches in flight for a checkpoint (waits until they are sampled)."""
        batches = [
            {"step": e.step, "version": e.version, "before": attrs.asdict(e.before),
             "generated": generated_to_plain(self.workers.fetch_generated(e.handle))}
            for e in self.queue
        ]
        return {"max_staleness": self.k, "batches": batches}

