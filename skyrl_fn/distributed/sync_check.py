"""Every step's weight sync is checked before the next rollout: :class:`SyncTracker`.

The driver queues ``RolloutWorker.sync(weights)`` after each update and does not wait for it (a
Ray actor runs one caller's calls in order, so the worker syncs before its next ``generate``).
But a failed sync only shows when someone asks for its result: if nobody does until the end of
the run, every step samples with the initial weights and the run fails (or, worse, finishes)
long after the first failure. The tracker holds the sync of the last step and
:meth:`SyncTracker.check` waits for it, with a timeout, raising :class:`WeightSyncError` naming
the step and the worker on the first failure. The driver calls ``check`` before submitting the
next step's ``generate``; the wait costs one round trip, since the worker would sync before
sampling anyway.

Nothing here imports Ray: the waiting function is passed in (``RayWorkers.get`` on Ray, a fake
in the tests).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["WeightSyncError", "SyncTracker"]


class WeightSyncError(RuntimeError):
    """A weight sync to a rollout worker failed or timed out; the message names step and worker."""


class SyncTracker:
    """Records each step's sync handles and raises on the first failed or hung one.

    Args:
        wait: ``wait(handle, timeout_s)`` blocks until the sync behind ``handle`` is done and
            returns its result, raising its error (``TimeoutError`` when ``timeout_s`` passes).
        timeout_s: seconds to wait for one step's syncs (> 0; the runner passes
            ``--gpu.sync-timeout-s``).
        names: ``names[i]`` names worker ``i`` in messages (default ``rollout worker i``).
        passthrough: error types re-raised unchanged (the runner's own "worker died" error,
            which already names the worker and the last checkpoint).

    Raises:
        ValueError: ``timeout_s`` is not positive.
    """

    def __init__(self, wait: Callable[[Any, float], Any], *, timeout_s: float,
                 names: Sequence[str] | None = None, passthrough: tuple[type[BaseException], ...] = ()) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self._wait = wait
        self._passthrough = tuple(passthrough)
        self.timeout_s = float(timeout_s)
        self._names = tuple(names) if names is not None else None
        self._step: int | None = None
        self._handles: tuple[Any, ...] = ()
        self.checked_steps: list[int] = []  # steps whose syncs were confirmed, in order

    @property
    def pending_step(self) -> int | None:
        """The step whose sync is recorded but not yet checked (None when nothing is pending)."""
        return self._step

    def record(self, step: int, handles: Sequence[Any]) -> None:
        """Hold ``handles`` (one per rollout worker) as the sync of ``step``.

        A sync still pending from an earlier step is checked first, so none is ever dropped.

        Raises:
            WeightSyncError: that earlier sync failed or timed out.
        """
        self.check()
        self._step, self._handles = int(step), tuple(handles)

    def check(self) -> None:
        """Wait for the pending sync (if any); call it before the next ``generate``.

        The pending sync is cleared before waiting, so a failure is reported once.

        Raises:
            WeightSyncError: a worker's sync raised (the cause is chained) or did not finish
                within ``timeout_s``.
        """
        if self._step is None:
            return
        step, handles = self._step, self._handles
        self._step, self._handles = None, ()
        for i, handle in enumerate(handles):
            who = self._names[i] if self._names is not None and i < len(self._names) else f"rollout worker {i}"
            try:
                self._wait(handle, self.timeout_s)
            except self._passthrough:
                raise
            except TimeoutError as err:
                raise WeightSyncError(
                    f"weight sync of step {step + 1} to {who}: did not finish within {self.timeout_s:g} s "
                    f"(a hung NCCL collective or an engine stuck waking up); the next rollout would use stale weights"
                ) from err
            except Exception as err:  # noqa: BLE001 - re-raised with the step and worker named
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise WeightSyncError(
                    f"weight sync of step {step + 1} to {who} failed: {type(err).__name__}: {detail}; "
                    f"stopping before the next rollout, which would use stale weights"
                ) from err
        self.checked_steps.append(step)
