"""Every step's weight sync is checked before the next generate: the first failure stops the run
there, naming the step and worker; a hung sync times out; the runner uses the tracker on Ray."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from skyrl_fn.distributed.sync_check import SyncTracker, WeightSyncError


class FlakyEngine:
    """Syncs in a background thread (like a Ray actor) and fails exactly once, at ``fail_step``."""

    def __init__(self, fail_step: int) -> None:
        self.fail_step = fail_step
        self.pool = ThreadPoolExecutor(1)
        self.synced: list[int] = []
        self.generated: list[int] = []

    def sync(self, step: int) -> Future:
        def run():
            if step == self.fail_step:
                raise RuntimeError(f"AttributeError: 'list' object has no attribute 'to' (step {step})")
            self.synced.append(step)
            return step

        return self.pool.submit(run)

    def generate(self, step: int) -> None:
        self.generated.append(step)


def _wait(fut: Future, timeout: float):
    return fut.result(timeout=timeout)


def _drive(tracker: SyncTracker, engines, steps: int) -> None:
    """The runner's order: check, generate, (update), record the sync of this step; flush at the end."""
    for step in range(steps):
        tracker.check()
        for e in engines:
            e.generate(step)
        tracker.record(step, [e.sync(step) for e in engines])
    tracker.check()


def test_first_failed_sync_stops_before_the_next_generate():
    engine = FlakyEngine(fail_step=2)
    tracker = SyncTracker(_wait, timeout_s=30)
    with pytest.raises(WeightSyncError, match=r"step 3 to rollout worker 0 failed: RuntimeError: AttributeError") as info:
        _drive(tracker, [engine], steps=6)
    assert engine.generated == [0, 1, 2]  # step index 3 never sampled with stale weights
    assert engine.synced == [0, 1] and tracker.checked_steps == [0, 1]
    assert isinstance(info.value.__cause__, RuntimeError)
    tracker.check()  # reported once; nothing pending afterwards
    assert tracker.pending_step is None


def test_a_failure_at_the_last_step_is_raised_by_the_final_check():
    engine = FlakyEngine(fail_step=3)
    with pytest.raises(WeightSyncError, match="step 4"):
        _drive(SyncTracker(_wait, timeout_s=30), [engine], steps=4)
    assert engine.generated == [0, 1, 2, 3]


def test_the_failing_worker_is_named_among_several():
    good, bad = FlakyEngine(fail_step=-1), FlakyEngine(fail_step=1)
    tracker = SyncTracker(_wait, timeout_s=30, names=["engine A", "engine B"])
    with pytest.raises(WeightSyncError, match="step 2 to engine B failed"):
        _drive(tracker, [good, bad], steps=5)
    assert good.generated == bad.generated == [0, 1]


def test_every_step_is_checked_when_nothing_fails():
    engine = FlakyEngine(fail_step=-1)
    tracker = SyncTracker(_wait, timeout_s=30)
    _drive(tracker, [engine], steps=5)
    assert tracker.checked_steps == [0, 1, 2, 3, 4] and engine.synced == [0, 1, 2, 3, 4]


def test_record_checks_the_previous_sync_first():
    tracker = SyncTracker(_wait, timeout_s=30)
    failed: Future = Future()
    failed.set_exception(ValueError("boom"))
    tracker.record(0, [failed])
    with pytest.raises(WeightSyncError, match="step 1 .* ValueError: boom"):
        tracker.record(1, [])


def test_a_hung_sync_times_out_with_a_clear_error():
    never: Future = Future()
    tracker = SyncTracker(_wait, timeout_s=0.05)
    tracker.record(6, [never])
    with pytest.raises(WeightSyncError, match=r"step 7 to rollout worker 0: did not finish within 0.05 s"):
        tracker.check()


def test_passthrough_errors_are_not_wrapped_and_bad_timeouts_are_rejected():
    class Died(RuntimeError):
        pass

    def wait(handle, timeout):
        raise Died("rollout worker 0 died")

    tracker = SyncTracker(wait, timeout_s=1, passthrough=(Died,))
    tracker.record(0, [object()])
    with pytest.raises(Died):
        tracker.check()
    for bad in (0, -1.0, True, "10"):
        with pytest.raises(ValueError, match="timeout_s"):
            SyncTracker(wait, timeout_s=bad)


# -- on Ray: the runner checks each step's sync before it generates --------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_stop_at_the_generate_after_a_failed_sync(ray_session, tmp_path):
    from skyrl_fn import DEFAULT_TABLE
    from skyrl_fn.cli import parse_config, resolve_names
    from skyrl_fn.distributed.ray_workers import RayWorkers
    from skyrl_fn.trainer.experience import kl_controller_of
    from skyrl_fn.trainer.loop import run_step
    from skyrl_fn.tasks.base import DataState, next_prompts

    argv = [
        "--model.hidden-size", "16", "--model.num-layers", "1", "--model.num-heads", "2", "--model.intermediate-size", "32",
        "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "2", "--rollout.max-new-tokens", "3",
        "--ray.rollout-workers", "1", "--logging.run-dir", str(tmp_path / "run"), "--logging.no-progress",
    ]
    run = resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)
    kl_ctrl = kl_controller_of(run)
    workers = RayWorkers(run)
    try:
        task = run.make_task()
        examples, state = next_prompts(task, DataState(seed=0), 2)
        run_step(run, workers, 0, examples, kl_ctrl)
        assert workers.syncs.pending_step == 0
        examples, state = next_prompts(task, state, 2)
        run_step(run, workers, 1, examples, kl_ctrl)
        assert workers.syncs.checked_steps == [0]
        # The step-1 sync fails in the worker (a state dict the model does not have).
        workers.syncs.check()
        workers.syncs.record(1, [workers.rollout[0].sync_packed.remote({"bogus.weight": torch.zeros(1)})])
        examples, state = next_prompts(task, state, 2)
        with pytest.raises(WeightSyncError, match=r"step 2 to rollout worker 0 \(RolloutWorker\) failed"):
            run_step(run, workers, 2, examples, kl_ctrl)
    finally:
        workers.close()


def test_keep_leaves_the_newest_syncs_pending_and_checks_the_oldest_first():
    """Asynchronous training (``trainer.max_staleness`` K) keeps K - 1 syncs queued behind rollouts in flight."""
    hung: Future = Future()  # a sync queued behind a rollout that is still running
    done = [Future() for _ in range(2)]
    for i, f in enumerate(done):
        f.set_result(i)
    tracker = SyncTracker(_wait, timeout_s=0.05)
    tracker.record(0, [done[0]], keep=1)
    tracker.record(1, [done[1]], keep=1)  # keeps step 0 pending, adds step 1
    assert tracker.checked_steps == [] and tracker.pending_step == 1
    tracker.record(2, [hung], keep=1)  # checks step 0 (the oldest), keeps step 1, adds step 2
    assert tracker.checked_steps == [0]
    tracker.check(keep=1)  # step 1 checked; step 2 (hung) may stay pending
    assert tracker.checked_steps == [0, 1] and tracker.pending_step == 2
    with pytest.raises(WeightSyncError, match="step 3 to rollout worker 0: did not finish"):
        tracker.check()
