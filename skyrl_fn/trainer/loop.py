"""The training loop: one RL step per iteration over a :class:`~skyrl_fn.trainer.workers.Workers`,
with seeding, resume, KL control, checkpoints and the summary written once.

``train(run)`` runs every role in this process (:class:`~skyrl_fn.trainer.workers.LocalWorkers`);
``train(run, workers=RayWorkers)`` (what ``skyrl_fn.distributed.ray_runner.train_on_ray`` does) runs
the same loop with each role in a Ray actor. One step reads top to bottom: next prompts -> sample
and score -> reference log-probs and values -> advantages and the policy update -> critic update
-> metrics -> KL coefficient -> held-out evaluation (``--eval.every``; ``Workers.evaluate``) ->
checkpoint. On CPU with a fixed seed it is deterministic, and a resumed run reproduces the metrics
of an uninterrupted one (the sampling seed of each step is a pure function of ``(seed, step)``;
the data position, weights, optimiser and RNG states and the KL coefficient are checkpointed).
With ``trainer.max_staleness`` K >= 1 each step's batch was sampled up to K steps earlier, while
earlier steps trained (``skyrl_fn.trainer.async_loop``); K = 0 is the loop above, unchanged.
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import attrs
import numpy as np
import torch

from skyrl_fn.losses.kl import KLController
from skyrl_fn.trainer.async_loop import AsyncRollouts
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.batch_transforms import transform_step
from skyrl_fn.trainer.teacher import with_teacher_log_probs
from skyrl_fn.trainer.config import config_to_dict
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.evaluate import eval_due, heldout_examples
from skyrl_fn.trainer.experience import kl_controller_of
from skyrl_fn.trainer.nonfinite import SkipCounter
from skyrl_fn.trainer.resume import check_resume
from skyrl_fn.tasks.base import DataState, next_prompts
from skyrl_fn.trainer.workers import LocalWorkers, Workers, state_from_checkpoint, trained_roles
from skyrl_fn.trainer.roles import RoleState, ShardWriter, WorkersState

__all__ = ["Summary", "seed_everything", "rollout_seed", "run_step", "step_timing", "check_checkpoint", "train"]


@attrs.frozen(kw_only=True)
class Summary:
    """What a run did.

    Attributes:
        steps: steps completed in total (including those before a resume).
        history: metrics of each step run in this process (dicts of floats).
        first_reward: mean reward over the first 10% of the steps in ``history``.
        last_reward: mean reward over the last 10% of the steps in ``history``.
        seconds: wall time of this process's loop.
        last_checkpoint: directory of the newest checkpoint, or None.
        resumed_from: step resumed from, or None.
    """

    steps: int
    history: tuple[Mapping[str, float], ...]
    first_reward: float
    last_reward: float
    seconds: float
    last_checkpoint: str | None = None
    resumed_from: int | None = None

    def line(self) -> str:
        """A one-line summary."""
        return (
            f"{self.steps} steps in {self.seconds:.1f}s; reward {self.first_reward:.3f} -> {self.last_reward:.3f} "
            f"(first/last 10%)" + (f"; checkpoint {self.last_checkpoint}" if self.last_checkpoint else "")
        )


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of ``step`` (pure, so resume reproduces sampling exactly)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**62)


def step_timing(step: int, step_seconds: float, rollout_seconds: float, n_tokens: int) -> dict[str, float]:
    """The timing metrics of step ``step`` (0-based)."""
    return dict(
        step=float(step + 1), step_seconds=step_seconds, rollout_seconds=rollout_seconds,
        rollout_tokens_per_s=n_tokens / max(rollout_seconds, 1e-9), tokens_per_s=n_tokens / max(step_seconds, 1e-9),
        response_tokens=float(n_tokens),
    )


def run_step(
    run: ResolvedRun, workers: Workers, step: int, examples: Sequence[Any], kl_ctrl: KLController,
    *, refill: Callable[[int], Sequence[Any]] | None = None, generated: Any = None,
) -> tuple[dict[str, float], KLController]:
    """One RL step on ``examples``. Returns the step's metrics and the next KL controller.

    The calls are submitted in order and waited for once (:meth:`Workers.wait`), so on Ray the
    reference model and the critic work concurrently and nothing goes through the driver. With
    batch transforms (``run.batch_transforms``) the sampled batch goes through them first
    (``skyrl_fn.trainer.batch_transforms.transform_step``), drawing more prompts with ``refill(n)``
    when a transform asks for more groups; a step left with no group is skipped.
    ``generated``: a handle of ``examples`` sampled earlier (asynchronous training,
    ``skyrl_fn.trainer.async_loop``); None samples them now.
    """
    cfg = run.config
    t0 = time.perf_counter()
    seed = rollout_seed(cfg.trainer.seed, step)
    if generated is None:
        generated = workers.generate(examples, step=step, seed=seed)
    batch: dict[str, float] = {}
    if run.batch_transforms is not None:
        if refill is None:
            raise ValueError("refill: expected a callable giving more prompts when batch transforms are used, got None")
        generated, batch = transform_step(run, workers, generated, step=step, seed=seed, refill=refill)
        if generated is None:
            reason = f"batch transforms {list(run.batch_transforms.names)} kept no prompt group of {batch['batch_sampled_batches']:g} sampled batch(es)"
            return {**batch, "skipped": 1.0, "skip_reason": reason, "reward": batch["batch_sampled_reward"], **step_timing(step, time.perf_counter() - t0, 0.0, 0)}, kl_ctrl
    if run.uses_teacher:  # on-policy distillation: the teacher scores the batch trained on
        generated, _ = workers.transform(with_teacher_log_probs, generated, workers.teacher_log_probs(generated))
    ref_lp = workers.reference_log_probs(generated) if run.uses_reference else None
    values = workers.values(generated) if run.uses_critic else None
    updated = workers.update_policy(generated, ref_lp, values, kl_ctrl.coef)
    critic = workers.update_critic(updated) if run.uses_critic else None
    metrics, rollout_seconds = workers.wait(generated, updated, critic)
    metrics.update(batch)
    # response_length is the mean over the B sequences trained on, so this is the token count.
    rows = batch.get("batch_sequences", len(examples) * cfg.rollout.samples_per_prompt)
    n_tokens = round(metrics.get("response_length", 0.0) * rows)
    metrics.update(step_timing(step, time.perf_counter() - t0, rollout_seconds, n_tokens))
    if run.algorithm.kl_in_reward and not metrics.get("skipped"):  # a skipped step measured no KL
        metrics["kl_coef"] = kl_ctrl.coef
        kl_ctrl = kl_ctrl.update(metrics.get("kl", 0.0), len(examples) * cfg.rollout.samples_per_prompt)
    return metrics, kl_ctrl


def _save(run: ResolvedRun, state: WorkersState, step: int, data_state: DataState, kl_ctrl: KLController, in_flight: Any = None) -> str:
    # A sharded role (data-parallel ranks) writes its own shards into the checkpoint being saved.
    weights = {role: s.weights for role, s in state.roles.items() if isinstance(s, RoleState)}
    shards = {role: s.write for role, s in state.roles.items() if isinstance(s, ShardWriter)}
    optim: dict[str, Any] = {f"{role}_sched": s.sched for role, s in state.roles.items()}
    optim.update({role: s.optim for role, s in state.roles.items() if isinstance(s, RoleState)})
    cfg = run.config
    return ckpt.save(
        cfg.ckpt_dir, step=step, weights=weights, optim=optim, data_state=attrs.asdict(data_state),
        config=config_to_dict(cfg), rng=state.rng, extra={"kl_coef": kl_ctrl.coef}, keep=cfg.trainer.keep_checkpoints,
        in_flight=in_flight, shards=shards,
    )


def check_checkpoint(run: ResolvedRun, c: ckpt.Checkpoint) -> None:
    """Refuse a checkpoint ``run`` cannot resume from (``IncompatibleResumeError`` naming each
    field, ``skyrl_fn.trainer.resume``); warn (``CheckpointWarning``) listing compatible changes."""
    diff = check_resume(c.config, config_to_dict(run.config), where=c.path, saved_models=[*c.weights, *c.shards], needed_models=trained_roles(run))
    if diff.warning():
        warnings.warn(diff.warning(), ckpt.CheckpointWarning, stacklevel=3)


def _window_mean(history: Sequence[Mapping[str, float]], key: str, first: bool) -> float:
    """Mean of ``key`` over the first/last 10% of ``history``."""
    if not history:
        return float("nan")
    n = max(1, len(history) // 10)
    part = history[:n] if first else history[-n:]
    return float(np.mean([h[key] for h in part]))


def train(
    run: ResolvedRun,
    *,
    on_step: Callable[[dict[str, float]], None] | None = None,
    workers: Callable[[ResolvedRun], Workers] = LocalWorkers,
) -> Summary:
    """Train for ``run.config.trainer.steps`` steps.

    Args:
        run: the resolved run (config + bound algorithm).
        on_step: called after every step with its metrics (python floats; keys include
            ``step``, ``reward``, ``loss``, ``kl`` when a KL is used, ``grad_norm``, ``lr``,
            ``tokens_per_s``, ``step_seconds``).
        workers: builds the workers after seeding (default :class:`LocalWorkers`: everything
            in this process); closed when training ends or fails.

    Returns:
        a :class:`Summary`. With ``trainer.resume`` it continues from the latest checkpoint in
        ``run.config.ckpt_dir`` (fresh when there is none).
    """
    cfg = run.config
    run.check_backend_available()  # vllm without vllm/CUDA fails before any model loads
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    seed_everything(cfg.trainer.seed)
    task = run.make_task()
    held = heldout_examples(task, cfg.eval)[1] if cfg.eval.every > 0 else None  # before any model loads
    pool = workers(run)
    last_ckpt, step = None, 0
    try:
        data_state = DataState(seed=cfg.trainer.seed)
        kl_ctrl = kl_controller_of(run)
        start, resumed_from, saved_in_flight = 0, None, None
        # The newest checkpoint that verifies; damaged ones are skipped with a warning.
        c = ckpt.load_latest(cfg.ckpt_dir) if cfg.trainer.resume else None
        if c is not None:
            path = c.path
            check_checkpoint(run, c)
            pool.load_state(state_from_checkpoint(c))
            data_state = DataState(**c.data_state)
            kl_ctrl = attrs.evolve(kl_ctrl, coef=float(c.extra.get("kl_coef", kl_ctrl.coef)))
            start = resumed_from = c.step
            last_ckpt, saved_in_flight = path, c.in_flight
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        interval = cfg.trainer.ckpt_interval
        if start == 0 and eval_due(cfg, 0) and on_step is not None:
            on_step({"step": 0.0, **pool.evaluate(held)})  # the baseline, before any update
        skips = SkipCounter(limit=cfg.trainer.max_consecutive_skips)

        def refill(n: int) -> Sequence[Any]:  # the data stream's next prompts (dynamic sampling)
            nonlocal data_state
            more, data_state = next_prompts(task, data_state, n, shuffle=cfg.data.shuffle)
            return more

        step = start
        # trainer.max_staleness >= 1: the next K steps' rollouts are in flight while a step trains.
        ahead = AsyncRollouts(run, pool, task, data_state, start=start, seed_of=rollout_seed, saved=saved_in_flight) if cfg.trainer.max_staleness else None
        for step in range(start, cfg.trainer.steps):
            if ahead is None:
                examples, data_state = next_prompts(task, data_state, cfg.trainer.prompts_per_step, shuffle=cfg.data.shuffle)
                metrics, kl_ctrl = run_step(run, pool, step, examples, kl_ctrl, refill=refill)
            else:
                batch = ahead.take(step)
                metrics, kl_ctrl = run_step(run, pool, step, batch.examples, kl_ctrl, generated=batch.handle)
                metrics.update(ahead.consumed(batch, step))
                data_state = ahead.data_state
            skips = skips.record(metrics, step=step + 1)
            metrics["skipped_steps"] = float(skips.total)
            history.append(metrics)
            done = step + 1
            if eval_due(cfg, done):
                metrics.update(pool.evaluate(held))
            if (interval > 0 and done % interval == 0) or done == cfg.trainer.steps:
                in_flight = ahead.in_flight() if ahead is not None else None
                last_ckpt = _save(run, pool.state(), done, data_state, kl_ctrl, in_flight)
            if on_step is not None:
                on_step(metrics)
    except KeyboardInterrupt:
        # Ctrl-C: the finally below stops every worker (and whatever rollouts were in flight).
        where = f"the last checkpoint is {last_ckpt} (rerun with --trainer.resume to continue)" if last_ckpt else "no checkpoint was written"
        raise KeyboardInterrupt(f"interrupted (Ctrl-C) during step {step + 1}; every worker was stopped; {where}") from None
    finally:
        pool.close()
    return Summary(
        steps=max(cfg.trainer.steps, start), history=tuple(history),
        first_reward=_window_mean(history, "reward", True), last_reward=_window_mean(history, "reward", False),
        seconds=time.perf_counter() - t0, last_checkpoint=last_ckpt, resumed_from=resumed_from,
    )
