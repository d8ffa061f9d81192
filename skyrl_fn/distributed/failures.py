"""A dead Ray actor named in the error that stops the run: :class:`WorkerDiedError` and
:class:`NamedActors`, shared by :class:`~skyrl_fn.distributed.ray_workers.RayWorkers` and
:class:`~skyrl_fn.distributed.dp.DPWorkers`.

The message names the actor (``policy rank 1 of 2 (PolicyRank, pid 4242)``, ``rollout worker 0
(RolloutWorker)``), the step it died in and the last checkpoint to resume from (docs/faults.md).
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

from skyrl_fn.trainer import checkpoint as ckpt

__all__ = ["WorkerDiedError", "NamedActors"]


class WorkerDiedError(RuntimeError):
    """A Ray actor died (killed, out of memory, crashed); the message names it."""


class NamedActors:
    """What a ``Workers`` over Ray actors needs to name a dead one. The class using it sets
    ``names`` (actor id hex -> name), ``run``, ``saved`` (a checkpoint of this run may exist),
    ``step_index`` (-1 while starting) and defines ``actors()``."""

    names: dict[str, str]
    saved: bool
    step_index: int

    def actors(self) -> list[Any]:
        raise NotImplementedError

    def _dead_actor(self) -> str | None:
        """The name of the first actor that does not answer a ping (None: all alive)."""
        import ray

        for a in self.actors():
            try:
                ray.get(a.ping.remote(), timeout=10)
            except Exception:
                return self.names[a._actor_id.hex()]
        return None

    def _died(self, err, *, who: str | None = None) -> NoReturn:
        """Raise :class:`WorkerDiedError` for ``err`` naming the actor (``who``, the error's actor
        id, or the first that does not answer), the step and the last checkpoint."""
        actor_id = getattr(err, "actor_id", None)
        who = who or self.names.get(actor_id) or self._dead_actor() or "a Ray worker"
        last = ckpt.latest_checkpoint(self.run.config.ckpt_dir) if self.saved else None
        where = f"the last checkpoint is {last} (intact; rerun with --trainer.resume to continue)" if last else "no checkpoint was written yet"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        when = "while starting" if self.step_index < 0 else f"during step {self.step_index + 1}"
        raise WorkerDiedError(f"Ray worker {who} died {when}: {detail}. {where}.") from None

    def _failed(self, err, *, ask: bool = False) -> NoReturn:
        """Raise for the error ``err`` of a ``ray.get``: :class:`WorkerDiedError` when an actor
        died (``ask``: also when any actor does not answer a ping), else the task's own error."""
        from ray.exceptions import RayActorError

        if isinstance(err, RayActorError):
            self._died(err)
        cause = getattr(err, "cause", None)
        if isinstance(cause, RayActorError):
            self._died(cause)
        dead = self._dead_actor() if ask else None
        if dead is not None:
            self._died(err, who=dead)
        raise err.as_instanceof_cause() from None

    def get_each(self, refs, *, timeout: float | None = None, what: str | None = None):
        """``ray.get`` that fails as soon as ANY of ``refs`` fails (an actor blocked in a
        collective with a dead peer never hides the peer's death), naming a dead actor
        (:class:`WorkerDiedError`); with ``timeout`` a :class:`TimeoutError` naming ``what``."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = list(refs) if isinstance(refs, list) else [refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"{what} did not finish within {timeout:g} s")
            try:
                ray.get(ready)
            except (RayActorError, RayTaskError) as err:
                self._failed(err, ask=True)  # a collective may fail because a peer died
        return ray.get(refs)
