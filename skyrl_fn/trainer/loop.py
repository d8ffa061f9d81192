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
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.config import ResolvedRun, config_to_dict
from skyrl_fn.trainer.evaluate import eval_due, heldout_examples
from skyrl_fn.trainer.experience import kl_controller_of
from skyrl_fn.trainer.nonfinite import SkipCounter
from skyrl_fn.trainer.resume import check_resume
from skyrl_fn.rollout.choice import check_backend_available
from skyrl_fn.tasks.choice import make_task
from skyrl_fn.tasks.base import DataState, next_prompts
from skyrl_fn.trainer.workers import LocalWorkers, Workers, WorkersState, state_from_checkpoint

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


def run_step(run: ResolvedRun, workers: Workers, step: int, examples: Sequence[Any], kl_ctrl: KLController) -> tuple[dict[str, float], KLController]:
    """One RL step on ``examples``. Returns the step's metrics and the next KL controller.

    The calls are submitted in order and waited for once (:meth:`Workers.wait`), so on Ray the
    reference model and the critic work concurrently and nothing goes through the driver.
    """
    cfg = run.config
    t0 = time.perf_counter()
    generated = workers.generate(examples, step=step, seed=rollout_seed(cfg.trainer.seed, step))
    ref_lp = workers.reference_log_probs(generated) if run.uses_reference else None
    values = workers.values(generated) if run.uses_critic else None
    updated = workers.update_policy(generated, ref_lp, values, kl_ctrl.coef)
    critic = workers.update_critic(updated) if run.uses_critic else None
    metrics, rollout_seconds = workers.wait(generated, updated, critic)
    # response_length is the mean over the B = P * G sequences, so this is the token count.
    n_tokens = round(metrics.get("response_length", 0.0) * len(examples) * cfg.rollout.samples_per_prompt)
    metrics.update(step_timing(step, time.perf_counter() - t0, rollout_seconds, n_tokens))
    if run.algorithm.kl_in_reward and not metrics.get("skipped"):  # a skipped step measured no KL
        metrics["kl_coef"] = kl_ctrl.coef
        kl_ctrl = kl_ctrl.update(metrics.get("kl", 0.0), len(examples) * cfg.rollout.samples_per_prompt)
    return metrics, kl_ctrl


def _save(run: ResolvedRun, state: WorkersState, step: int, data_state: DataState, kl_ctrl: KLController) -> str:
    weights = {role: s.weights for role, s in state.roles.items()}
    optim: dict[str, Any] = {}
    for role, s in state.roles.items():
        optim.update({role: s.optim, f"{role}_sched": s.sched})
    cfg = run.config
    return ckpt.save(
        cfg.ckpt_dir, step=step, weights=weights, optim=optim, data_state=attrs.asdict(data_state),
        config=config_to_dict(cfg), rng=state.rng, extra={"kl_coef": kl_ctrl.coef}, keep=cfg.trainer.keep_checkpoints,
    )


def check_checkpoint(run: ResolvedRun, c: ckpt.Checkpoint) -> None:
    """Refuse a checkpoint ``run`` cannot resume from (``IncompatibleResumeError`` naming each
    field, ``skyrl_fn.trainer.resume``); warn (``CheckpointWarning``) listing compatible changes."""
    needed = ["policy", "critic"] if run.uses_critic else ["policy"]
    diff = check_resume(c.config, config_to_dict(run.config), where=c.path, saved_models=list(c.weights), needed_models=needed)
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
    check_backend_available(cfg.rollout)  # vllm without vllm/CUDA fails before any model loads
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    seed_everything(cfg.trainer.seed)
    task = make_task(cfg.data, seed=cfg.trainer.seed)
    pool = workers(run)
    try:
        data_state = DataState(seed=cfg.trainer.seed)
        kl_ctrl = kl_controller_of(run)
        start, resumed_from, last_ckpt = 0, None, None
        # The newest checkpoint that verifies; damaged ones are skipped with a warning.
        c = ckpt.load_latest(cfg.ckpt_dir) if cfg.trainer.resume else None
        if c is not None:
            path = c.path
            check_checkpoint(run, c)
            pool.load_state(state_from_checkpoint(c))
            data_state = DataState(**c.data_state)
            kl_ctrl = attrs.evolve(kl_ctrl, coef=float(c.extra.get("kl_coef", kl_ctrl.coef)))
            start = resumed_from = c.step
            last_ckpt = path
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        interval = cfg.trainer.ckpt_interval
        held = heldout_examples(task, cfg.eval)[1] if cfg.eval.every > 0 else None
        if start == 0 and eval_due(cfg, 0) and on_step is not None:
            on_step({"step": 0.0, **pool.evaluate(held)})  # the baseline, before any update
        skips = SkipCounter(limit=cfg.trainer.max_consecutive_skips)
        for step in range(start, cfg.trainer.steps):
            examples, data_state = next_prompts(task, data_state, cfg.trainer.prompts_per_step, shuffle=cfg.data.shuffle)
            metrics, kl_ctrl = run_step(run, pool, step, examples, kl_ctrl)
            skips = skips.record(metrics, step=step + 1)
            metrics["skipped_steps"] = float(skips.total)
            history.append(metrics)
            done = step + 1
            if eval_due(cfg, done):
                metrics.update(pool.evaluate(held))
            if (interval > 0 and done % interval == 0) or done == cfg.trainer.steps:
                last_ckpt = _save(run, pool.state(), done, data_state, kl_ctrl)
            if on_step is not None:
                on_step(metrics)
    finally:
        pool.close()
    return Summary(
        steps=max(cfg.trainer.steps, start), history=tuple(history),
        first_reward=_window_mean(history, "reward", True), last_reward=_window_mean(history, "reward", False),
        seconds=time.perf_counter() - t0, last_checkpoint=last_ckpt, resumed_from=resumed_from,
    )
