"""The in-process training loop (no Ray), with checkpoints and resume.

``train(run)`` reads top to bottom as one RL step per iteration: next prompts -> rollout ->
rewards -> log-probs (policy, reference) and values -> advantages -> policy (and critic) update ->
metrics -> checkpoint. On CPU with a fixed seed it is deterministic, and a resumed run reproduces
the metrics of an uninterrupted one (the sampling generator of each step is a pure function of
``(seed, step)``; the data position, weights, optimiser and RNG states are checkpointed).
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any, Callable, Mapping

import attrs
import numpy as np
import torch
from torch import nn

from skyrl_fn.train import checkpoint as ckpt
from skyrl_fn.train.config import ResolvedRun, config_to_dict
from skyrl_fn.train.learner import (
    KLController,
    TrainState,
    batched_log_probs,
    batched_values,
    critic_update,
    loss_kernel,
    make_experience,
    make_train_state,
    policy_update,
)
from skyrl_fn.train.model import build_critic, load_model, load_tokenizer
from skyrl_fn.train.rollout import RolloutBackend, check_backend_available, make_backend
from skyrl_fn.train.tasks import DataState, Task, make_task, next_prompts, score

__all__ = ["Components", "Summary", "build_components", "seed_everything", "rollout_seed", "run_step", "train"]


@attrs.frozen(kw_only=True, eq=False)
class Components:
    """Everything a run builds once.

    Attributes:
        task: prompts and reward.
        tokenizer: the tokenizer.
        policy: the policy's ``TrainState``.
        reference: frozen reference model, or None when no KL is used.
        critic: the critic's ``TrainState``, or None without GAE.
        backend: the rollout backend around the policy.
    """

    task: Task
    tokenizer: Any
    policy: TrainState
    reference: nn.Module | None
    critic: TrainState | None
    backend: RolloutBackend


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


def build_components(run: ResolvedRun) -> Components:
    """Build task, tokenizer, policy (+ optimiser), reference, critic and backend for ``run``.

    The backend is checked first, so ``rollout.backend=vllm`` without vllm/CUDA fails before any
    model loads.
    """
    cfg = run.config
    check_backend_available(cfg.rollout)
    seed = cfg.trainer.seed
    task = make_task(cfg.data, seed=seed)
    tokenizer = load_tokenizer(cfg.model, alphabet=task.alphabet)
    policy = load_model(cfg.model, tokenizer, seed=seed)
    tr = cfg.trainer
    policy_state = make_train_state(policy, lr=tr.lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)
    reference = None
    if cfg.uses_reference:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    critic_state = None
    if cfg.uses_critic:
        critic = build_critic(cfg.model, tokenizer, seed=seed)
        critic_state = make_train_state(critic, lr=tr.critic_lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)
    backend = make_backend(cfg.rollout, policy, tokenizer)
    return Components(task=task, tokenizer=tokenizer, policy=policy_state, reference=reference, critic=critic_state, backend=backend)


def run_step(
    run: ResolvedRun,
    comp: Components,
    step: int,
    data_state: DataState,
    kl_ctrl: KLController,
    *,
    kernel: Callable | None = None,
) -> tuple[dict[str, float], DataState, KLController]:
    """One RL step. Returns the step's metrics, the advanced data state and KL controller."""
    cfg = run.config
    t0 = time.perf_counter()
    examples, data_state = next_prompts(comp.task, data_state, cfg.trainer.prompts_per_step, shuffle=cfg.data.shuffle)
    comp.policy.model.eval()
    rollout = comp.backend.generate([e.prompt for e in examples], seed=rollout_seed(cfg.trainer.seed, step))
    t_rollout = time.perf_counter() - t0
    scores = torch.tensor(score(comp.task, rollout.responses, examples, rollout.group_ids.tolist()), dtype=torch.float32)
    mbs, temp = cfg.trainer.micro_batch_size, cfg.rollout.temperature
    # The policy's log-probs before the update come from policy_update's first forward pass.
    old_lp = None if not cfg.algorithm.recompute_old_log_probs else batched_log_probs(comp.policy.model, rollout, micro_batch_size=mbs, temperature=temp, top_p=cfg.rollout.top_p)
    ref_lp = None if comp.reference is None else batched_log_probs(comp.reference, rollout, micro_batch_size=mbs, temperature=temp, top_p=cfg.rollout.top_p)
    values = None
    if comp.critic is not None:
        comp.critic.model.eval()
        values = batched_values(comp.critic.model, rollout, micro_batch_size=mbs)
    exp, metrics = make_experience(run, rollout, scores, old_log_probs=old_lp, ref_log_probs=ref_lp, values=values, kl_coef=kl_ctrl.coef)
    metrics.update(policy_update(run, comp.policy, exp, kernel=kernel))
    if comp.critic is not None:
        metrics.update(critic_update(run, comp.critic, exp))
    if cfg.algorithm.use_kl_in_reward:
        metrics["kl_coef"] = kl_ctrl.coef
        kl_ctrl = kl_ctrl.update(metrics.get("kl", 0.0), rollout.batch_size)
    metrics.update(step_timing(step, time.perf_counter() - t0, t_rollout, int(rollout.response_mask.sum())))
    return metrics, data_state, kl_ctrl


def step_timing(step: int, step_seconds: float, rollout_seconds: float, n_tokens: int) -> dict[str, float]:
    """The timing metrics every runner (in-process or Ray) logs for step ``step`` (0-based)."""
    return dict(
        step=float(step + 1), step_seconds=step_seconds, rollout_seconds=rollout_seconds,
        rollout_tokens_per_s=n_tokens / max(rollout_seconds, 1e-9), tokens_per_s=n_tokens / max(step_seconds, 1e-9),
        response_tokens=float(n_tokens),
    )


def _save(run: ResolvedRun, comp: Components, step: int, data_state: DataState, kl_ctrl: KLController) -> str:
    weights = {"policy": comp.policy.model.state_dict()}
    optim = {"policy": comp.policy.optimizer.state_dict(), "policy_sched": comp.policy.scheduler.state_dict()}
    if comp.critic is not None:
        weights["critic"] = comp.critic.model.state_dict()
        optim.update(critic=comp.critic.optimizer.state_dict(), critic_sched=comp.critic.scheduler.state_dict())
    return ckpt.save(
        run.config.ckpt_dir, step=step, weights=weights, optim=optim,
        data_state=attrs.asdict(data_state), config=config_to_dict(run.config),
        extra={"kl_coef": kl_ctrl.coef}, keep=run.config.trainer.keep_checkpoints,
    )


def _restore(comp: Components, c: ckpt.Checkpoint) -> tuple[DataState, float]:
    comp.policy.model.load_state_dict(c.weights["policy"])
    comp.policy.optimizer.load_state_dict(c.optim["policy"])
    comp.policy.scheduler.load_state_dict(c.optim["policy_sched"])
    if comp.critic is not None:
        comp.critic.model.load_state_dict(c.weights["critic"])
        comp.critic.optimizer.load_state_dict(c.optim["critic"])
        comp.critic.scheduler.load_state_dict(c.optim["critic_sched"])
    ckpt.restore_rng(c.rng)
    return DataState(**c.data_state), float(c.extra.get("kl_coef", 0.0))


def _window_mean(history: list[Mapping[str, float]], key: str, first: bool) -> float:
    if not history:
        return float("nan")
    n = max(1, len(history) // 10)
    part = history[:n] if first else history[-n:]
    return float(np.mean([h[key] for h in part]))


def train(run: ResolvedRun, *, on_step: Callable[[dict[str, float]], None] | None = None) -> Summary:
    """Train in-process for ``run.config.trainer.steps`` steps.

    Args:
        run: the resolved run (config + table).
        on_step: called after every step with its metrics (python floats; keys include
            ``step``, ``reward``, ``loss``, ``kl`` when a KL is used, ``grad_norm``, ``lr``,
            ``tokens_per_s``, ``step_seconds``).

    Returns:
        a :class:`Summary`. With ``trainer.resume`` it continues from the latest checkpoint in
        ``run.config.ckpt_dir`` (fresh when there is none).
    """
    cfg = run.config
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    seed_everything(cfg.trainer.seed)
    comp = build_components(run)
    data_state = DataState(seed=cfg.trainer.seed)
    kl_ctrl = KLController.from_run(run)
    start, resumed_from, last_ckpt = 0, None, None
    if cfg.trainer.resume:
        path = ckpt.latest_checkpoint(cfg.ckpt_dir)
        if path is not None:
            c = ckpt.load(path)
            data_state, coef = _restore(comp, c)
            kl_ctrl = attrs.evolve(kl_ctrl, coef=coef)
            start = resumed_from = c.step
            last_ckpt = path
    kernel = loss_kernel(run)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    interval = cfg.trainer.ckpt_interval
    for step in range(start, cfg.trainer.steps):
        metrics, data_state, kl_ctrl = run_step(run, comp, step, data_state, kl_ctrl, kernel=kernel)
        history.append(metrics)
        done = step + 1
        if (interval > 0 and done % interval == 0) or done == cfg.trainer.steps:
            last_ckpt = _save(run, comp, done, data_state, kl_ctrl)
        if on_step is not None:
            on_step(metrics)
    return Summary(
        steps=max(cfg.trainer.steps, start), history=tuple(history),
        first_reward=_window_mean(history, "reward", True), last_reward=_window_mean(history, "reward", False),
        seconds=time.perf_counter() - t0, last_checkpoint=last_ckpt, resumed_from=resumed_from,
    )
