"""The workers of a training run: one class per role, and the records they exchange.

Each role builds its own piece from the ``ResolvedRun`` (same seeds everywhere, so every copy of
the policy starts with the same weights) and holds its state; the in-process
:class:`LocalWorkers` and the Ray actors (``skyrl_fn.distributed.actors`` subclass these classes)
call exactly the same methods:

====================  ==============================================================
role                  does
====================  ==============================================================
:class:`PolicyWorker`     old log-probs, advantages, the policy update; sampling too
                          when it hosts the rollout (hybrid layout)
:class:`RolloutWorker`    sampling + task reward with its own copy of the policy
:class:`ReferenceWorker`  reference log-probs (the frozen initial policy)
:class:`CriticWorker`     values and the critic update
``TeacherWorker``         teacher log-probs (on-policy distillation; ``skyrl_fn.trainer.teacher``)
====================  ==============================================================

The loop (``skyrl_fn.trainer.loop``) drives them through ``skyrl_fn.trainer.workers.Workers``.

Notation: ``P`` prompts, ``G`` samples per prompt, ``B = P * G``, ``T`` response tokens.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from skyrl_fn.trainer import shards
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.evaluate import evaluate, heldout_task
from skyrl_fn.trainer.experience import Experience
from skyrl_fn.trainer.forward import FrozenScorer, batched_values, old_policy_pass
from skyrl_fn.trainer.critic import critic_update
from skyrl_fn.trainer.learner import TrainState, experience_and_update, loss_kernel, make_train_state, set_hyperparameters
from skyrl_fn.tasks.base import Task, reward_function_name
from skyrl_fn.tasks.scoring import score_fields
from skyrl_fn.models.model import build_critic, load_model, load_tokenizer
from skyrl_fn.rollout.base import RolloutBatch
from skyrl_fn.trainer.sharding import load_full_state
from skyrl_fn.trainer.timing import UpdateClock

__all__ = [
    "Generated",
    "RoleState",
    "ShardWriter",
    "SavedShards",
    "WorkersState",
    "PolicyWorker",
    "RolloutWorker",
    "ReferenceWorker",
    "CriticWorker",
    "generate_and_score",
    "score_rollout",
    "load_role_state",
]


@attrs.frozen(kw_only=True, eq=False)
class Generated:
    """One step's samples.

    Attributes:
        rollout: the ``RolloutBatch`` of ``B`` sequences.
        scores: ``[B]`` task rewards.
        seconds: wall time of sampling and scoring.
    """

    rollout: RolloutBatch
    scores: torch.Tensor
    seconds: float


@attrs.frozen(kw_only=True, eq=False)
class RoleState:
    """A trainable role's state: model weights, optimiser and LR schedule state dicts."""

    weights: Mapping[str, torch.Tensor]
    optim: Mapping[str, Any]
    sched: Mapping[str, Any]


@attrs.frozen(kw_only=True, eq=False)
class ShardWriter:
    """A sharded role's state to save (data-parallel ranks): its weights and optimiser state stay
    on the ranks, which write them to disk themselves (``skyrl_fn.trainer.shards``).

    Attributes:
        write: ``write(directory)``: every rank writes its shards into ``directory``; returns
            when all have. Writes the state as it is when called: call it before the next step.
        sched: the LR schedule's state dict (the same on every rank).
    """

    write: Callable[[str], None]
    sched: Mapping[str, Any]


@attrs.frozen(kw_only=True, eq=False)
class SavedShards:
    """A role saved as shards (a checkpoint's ``<role>/`` directory, written at any number of
    ranks): the workers load it themselves, sharded or whole (``skyrl_fn.trainer.shards.load``).

    Attributes:
        path: the directory of the shards.
        sched: the LR schedule's state dict.
    """

    path: str
    sched: Mapping[str, Any]


@attrs.frozen(kw_only=True, eq=False)
class WorkersState:
    """Everything a checkpoint holds of the workers: state per role (whole, or shards), and the
    RNG states of the processes that sample and train the policy (one, or ``{"ranks": [...]}``)."""

    roles: Mapping[str, RoleState | ShardWriter | SavedShards]
    rng: Mapping[str, Any]


def _task_and_tokenizer(run: ResolvedRun) -> tuple[Task, Any]:
    cfg = run.config
    task = run.make_task()
    return task, load_tokenizer(cfg.model, alphabet=task.alphabet)


def generate_and_score(backend, task: Task, examples: Sequence[Any], seed: int, *, fields: Sequence[str] = ()) -> Generated:
    """Sample ``examples`` (``P`` prompts, ``G`` responses each) with ``backend``; score with
    ``task``, whose reward also returns the per-sample ``fields`` (``ResolvedRun.task_fields``;
    they go into ``RolloutBatch.extras``)."""
    t0 = time.perf_counter()
    rollout, scores = score_rollout(task, backend.generate([e.prompt for e in examples], seed=seed), examples, fields=fields)
    return Generated(rollout=rollout, scores=scores, seconds=time.perf_counter() - t0)


def score_rollout(task: Task, rollout: RolloutBatch, examples: Sequence[Any], *, fields: Sequence[str] = ()) -> tuple[RolloutBatch, torch.Tensor]:
    """``(rollout with the reward's per-sample fields added to its extras, scores [B])``: the
    sampled responses of ``examples`` scored with ``task`` (``skyrl_fn.tasks.scoring.score_fields``)."""
    scores, extras = score_fields(task, rollout.responses, examples, rollout.group_ids.tolist(), fields=fields)
    if extras:
        rollout = attrs.evolve(rollout, extras={**rollout.extras, **extras})
    return rollout, scores


def _role_state(state: TrainState) -> RoleState:
    weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    return RoleState(weights=weights, optim=state.optimizer.state_dict(), sched=state.scheduler.state_dict())


def load_role_state(state: TrainState, saved: RoleState | SavedShards, *, lr: float, weight_decay: float) -> None:
    """Load a trained role's checkpointed state into ``state``, a plain model (one worker) or an
    FSDP2-sharded one (a data-parallel rank; then a collective): shards written at any number of
    ranks (DCP reshards; a plain model reads them whole) or a single worker's whole state dicts
    (each rank keeps its slice). The saved optimiser carries the old rate and decay: this run's
    ``lr`` and ``weight_decay`` apply."""
    if isinstance(saved, SavedShards):
        shards.load(state.model, state.optimizer, saved.path)
    else:
        load_full_state(state.model, state.optimizer, saved.weights, saved.optim)
    state.scheduler.load_state_dict(saved.sched)
    set_hyperparameters(state, lr=lr, weight_decay=weight_decay)


class PolicyWorker:
    """The policy and its optimiser; with ``samples`` it also samples with its own model (the
    hybrid layout: the rollout stays where the update happens and no weights travel)."""

    def __init__(self, run: ResolvedRun, *, samples: bool, device: str = "cpu") -> None:
        cfg = run.config
        self.run = run
        self.device = device
        self.task, self.tokenizer = _task_and_tokenizer(run)
        model = load_model(cfg.model, self.tokenizer, seed=cfg.trainer.seed)
        if device != "cpu":
            model = model.to(device)
        tr = cfg.trainer
        self.train_state = make_train_state(model, lr=tr.lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)
        self.kernel = loss_kernel(run, device_type=torch.device(device).type)
        self.backend = run.make_backend(model, self.tokenizer) if samples else None
        self._heldout: Task | None = None  # the held-out task, built on the first evaluate

    def generate(self, examples: Sequence[Any], seed: int) -> Generated:
        """Sample and score with the policy's own model (hybrid layout)."""
        if self.backend is None:
            raise RuntimeError("PolicyWorker.generate: this run samples in separate rollout workers")
        self.train_state.model.eval()
        return generate_and_score(self.backend, self.task, examples, seed, fields=self.run.task_fields)

    def update(
        self, rollout: RolloutBatch, scores: torch.Tensor, ref_log_probs: torch.Tensor | None,
        values: torch.Tensor | None, kl_coef: float,
    ) -> tuple[dict[str, float], Experience | None]:
        """Old log-probs (a separate pass only with ``recompute_old_log_probs`` or a trainer field
        computed on request, ``skyrl_fn.trainer.forward.old_policy_pass``), token rewards
        and advantages (``make_experience``), then the policy update (``experience_and_update``).
        Returns its metrics and the experience (the critic trains on it), None when the step was
        skipped for something non-finite (``skyrl_fn.trainer.nonfinite``)."""
        clock = UpdateClock()
        model = self.train_state.model
        model.eval()
        old_lp, computed = old_policy_pass(self.run, model, rollout)  # None: from policy_update's first pass
        metrics, exp = experience_and_update(
            self.run, self.train_state, rollout, scores, reward_function=reward_function_name(self.task), old_log_probs=old_lp,
            ref_log_probs=ref_log_probs, values=values, kl_coef=kl_coef, kernel=self.kernel, fields=computed,
        )
        metrics.update(clock.timings())
        return metrics, exp

    def transform(self, fn: Callable[..., tuple[Generated | None, dict[str, float]]], *generated: Generated) -> tuple[Generated | None, dict[str, float]]:
        """``fn(generated, pad_id=...)``: a pure function over sampled batches (the batch
        transforms' ``skyrl_fn.trainer.batch_transforms.collect``), given this policy's pad id."""
        return fn(generated, pad_id=int(self.tokenizer.pad_token_id))

    def evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        """Greedy pass@1 of the current policy on held-out ``examples`` (``P`` of them), scored by
        the held-out task (:func:`skyrl_fn.trainer.evaluate.evaluate`; its ``eval_*`` metrics)."""
        cfg = self.run.config
        if self._heldout is None:
            self._heldout = heldout_task(self.task, cfg.eval)
        return evaluate(
            self.train_state.model, self.tokenizer, self._heldout, examples,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, batch_size=cfg.eval.batch_size,
        )

    def weights(self) -> dict[str, torch.Tensor]:
        """The current state dict (for separate rollout workers)."""
        return self.train_state.model.state_dict()

    def state(self) -> RoleState:
        """Weights, optimiser and schedule (copies)."""
        return _role_state(self.train_state)

    def load_state(self, saved: RoleState | SavedShards) -> None:
        """Load what :meth:`state` returned, or shards (from a checkpoint of any number of
        ranks); this run's ``trainer.lr`` and ``trainer.weight_decay`` apply from now on."""
        tr = self.run.config.trainer
        load_role_state(self.train_state, saved, lr=tr.lr, weight_decay=tr.weight_decay)


class RolloutWorker:
    """Samples and scores with its own copy of the policy; receives the policy's weights."""

    def __init__(self, run: ResolvedRun, *, device: str = "cpu") -> None:
        cfg = run.config
        self.run = run
        self.device = device
        self.task, self.tokenizer = _task_and_tokenizer(run)
        self.model = load_model(cfg.model, self.tokenizer, seed=cfg.trainer.seed).eval()
        if device != "cpu" and not run.backend_is_engine:  # an engine (vLLM) loads its own copy
            self.model = self.model.to(device)
        self.backend = run.make_backend(self.model, self.tokenizer, seed=cfg.trainer.seed, colocated=cfg.gpu.colocate)

    def generate(self, examples: Sequence[Any], seed: int) -> Generated:
        """Sample and score ``examples``."""
        return generate_and_score(self.backend, self.task, examples, seed, fields=self.run.task_fields)

    def sync(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load the policy's weights (a state dict)."""
        self.backend.sync_weights(dict(weights))


class ReferenceWorker(FrozenScorer):
    """The frozen initial policy: reference log-probs for the KL terms (:meth:`log_probs`)."""

    def __init__(self, run: ResolvedRun, *, device: str = "cpu") -> None:
        super().__init__(run, run.config.model, seed=run.config.trainer.seed, device=device)


class CriticWorker:
    """The value model and its optimiser."""

    def __init__(self, run: ResolvedRun, *, device: str = "cpu") -> None:
        cfg = run.config
        tr = cfg.trainer
        self.run = run
        self.device = device
        _, tokenizer = _task_and_tokenizer(run)
        critic = build_critic(cfg.model, tokenizer, seed=tr.seed)
        if device != "cpu":
            critic = critic.to(device)
        self.train_state = make_train_state(critic, lr=tr.critic_lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)

    def values(self, rollout: RolloutBatch) -> torch.Tensor:
        """``[B, T]`` values of the response tokens."""
        self.train_state.model.eval()
        return batched_values(self.train_state.model, rollout, micro_batch_size=self.run.config.trainer.micro_batch_size)

    def update(self, exp: Experience | None) -> dict[str, float]:
        """The critic update on ``exp`` (``critic_update``); nothing (``{}``) when the policy step
        was skipped (``exp`` None)."""
        if exp is None:
            return {}
        return critic_update(self.run, self.train_state, exp)

    def state(self) -> RoleState:
        return _role_state(self.train_state)

    def load_state(self, saved: RoleState | SavedShards) -> None:
        tr = self.run.config.trainer
        load_role_state(self.train_state, saved, lr=tr.critic_lr, weight_decay=tr.weight_decay)
