"""Name resolution: a ``TrainConfig`` checked against a table once, bound into a ``ResolvedRun``.

``resolve`` is the one place names become callables: the algorithm pieces
(``skyrl_fn.algorithm.bind_algorithm``), the task and its reward, and the rollout backend. The
result travels into every Ray task and actor; workers call what it holds and never look a name up.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping

import attrs

import torch

from skyrl_fn.algorithm import SUPPLIED, Algorithm, bind, bind_algorithm, entry_hyperparameters
from skyrl_fn.losses.corrections import compose_corrections
from skyrl_fn.core.records import PolicyLossInput
from skyrl_fn.core.table import AlgorithmTable, UnknownNameError, unknown_name_message
from skyrl_fn.trainer.config import HYPER_FIELDS, AlgorithmConfig, TrainConfig, config_to_dict
from skyrl_fn.rollout.base import VLLM_TEMPERATURE_RANGE, RolloutBackend, check_available
from skyrl_fn.trainer.run_table import with_run_builtins
from skyrl_fn.tasks.base import Example, Rewarded, Task
from skyrl_fn.tasks.scoring import provided_fields
from skyrl_fn.trainer.fields import TRAINER_FIELDS, check_fields, requested_fields
from skyrl_fn.transforms import BatchPipeline, overlong_penalty

__all__ = ["ResolvedRun", "resolve", "resolve_correction", "TRAINER_FIELDS"]


@attrs.frozen(kw_only=True, eq=False)
class ResolvedRun:
    """The one object the driver builds after name resolution and ships everywhere.

    Attributes:
        config: the full ``TrainConfig``.
        table: the ``AlgorithmTable`` every name was checked against (with the user's
            registrations); workers look functions up in it, never in a global.
        algorithm: every piece bound once (``skyrl_fn.algorithm.Algorithm``): workers call these
            callables and never look a name up.
        task_factory: the ``task`` entry chosen by ``data.task`` with ``data.task_args`` bound.
        reward: the ``reward`` entry chosen by ``data.reward`` with ``data.reward_args`` bound, or
            None for the task's own reward.
        backend_factory: the ``rollout_backend`` entry chosen by ``rollout.backend``.
        batch_transforms: ``algorithm.batch_transforms`` bound in order
            (``skyrl_fn.transforms.BatchPipeline``), None when there are none.
        task_fields: the per-sample fields the task's reward returns besides the score (declared
            with ``skyrl_fn.tasks.provides`` on the reward, or on the task factory for the task's
            own reward); they reach the estimator's and the loss's ``extras``.
        computed_fields: the trainer fields computed on request (``skyrl_fn.trainer.fields.ON_REQUEST``)
            that a chosen piece reads (``sum_pi_squared``), empty when none does.
    """

    config: TrainConfig
    table: AlgorithmTable
    algorithm: Algorithm
    task_factory: Callable[..., Task] = attrs.field(default=None, repr=False)
    reward: Callable[[str, Example], float] | None = attrs.field(default=None, repr=False)
    backend_factory: Callable[..., RolloutBackend] = attrs.field(default=None, repr=False)
    batch_transforms: BatchPipeline | None = None
    task_fields: tuple[str, ...] = ()
    computed_fields: frozenset[str] = frozenset()

    def make_task(self) -> Task:
        """The run's task (``--data.task``, seeded by ``trainer.seed``), scored by ``--data.reward``
        when one is chosen.

        Raises:
            DataError: the task's data cannot be used (``file:line`` named).
        """
        task = self.task_factory(self.config.data, seed=self.config.trainer.seed)
        if self.reward is not None:
            task = Rewarded(task=task, fn=self.reward, reward_name=self.config.data.reward)
        return task

    def make_backend(self, model, tokenizer, *, seed: int = 0, colocated: bool = True) -> RolloutBackend:
        """The run's rollout backend (``--rollout.backend``) around ``model``."""
        return self.backend_factory(model, tokenizer, self.config.rollout, seed=seed, colocated=colocated)

    @property
    def backend_is_engine(self) -> bool:
        """True when the rollout backend runs its own engine with its own copy of the weights (its
        factory's ``engine`` attribute, as ``vllm``); False when it samples with the module it is
        given (``hf``, and a plugin's backend unless it says otherwise)."""
        return bool(getattr(self.backend_factory, "engine", False))

    def check_backend_available(self) -> None:
        """Raise ``BackendUnavailableError`` now (before any model loads) if the chosen backend
        cannot run here (vllm without vLLM or CUDA)."""
        check_available(self.backend_factory, self.config.rollout)

    @property
    def uses_critic(self) -> bool:
        """True when the advantage estimator reads critic values (its entry ``requires`` them)."""
        return self.algorithm.needs_critic

    @property
    def uses_teacher(self) -> bool:
        """True when a teacher model scores the samples (``teacher.model``; on-policy distillation)."""
        return self.config.teacher.model is not None

    @property
    def uses_reference(self) -> bool:
        """True when a reference model is needed (a KL term, or a loss reading ``ref_log_probs``)."""
        return self.algorithm.needs_reference

    def to_json(self) -> str:
        """The config as JSON (the table holds functions and is not serialised)."""
        return json.dumps(config_to_dict(self.config), indent=2, sort_keys=True)


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def resolve_correction(alg: AlgorithmConfig, table: AlgorithmTable):
    """The run's off-policy correction: the chosen names bound with their hyperparameters and
    composed in order (``compose_corrections``), or None. Probed once on a two-token batch so a bad
    hyperparameter value fails here, naming its flag, before any model loads.

    Raises:
        UnknownNameError: an unknown correction name (lists the options and the closest).
        ValueError: a name chosen twice; hyperparameters for a correction not chosen; a bad
            hyperparameter; ``unbiased_kl`` (KL weights) without ``use_kl_loss``.
    """
    names = tuple(alg.off_policy_correction)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"algorithm.off_policy_correction: expected each correction once, got {twice} more than once")
    stray = sorted(set(alg.correction) - set(names))
    if stray:
        raise ValueError(f"algorithm.correction: hyperparameters for {stray}, which algorithm.off_policy_correction "
                         f"does not choose (it chooses {list(names)})")
    if not names:
        return None
    pieces = [bind(table, "off_policy_correction", n, alg.correction.get(n)) for n in names]
    chain = compose_corrections(*pieces)
    probe = PolicyLossInput(
        log_probs=torch.tensor([[-1.0, -2.0]]), old_log_probs=torch.tensor([[-1.1, -1.9]]),
        advantages=torch.tensor([[1.0, 1.0]]), loss_mask=torch.ones(1, 2, dtype=torch.bool),
        rollout_log_probs=torch.tensor([[-1.05, -2.1]]),
    )
    for name, piece in zip(names, pieces):
        try:
            out = piece(probe)
        except (ValueError, TypeError) as err:
            raise ValueError(f"algorithm.correction.{name}: {err}") from err
        if out.kl_weights is not None and not alg.use_kl_loss:
            raise ValueError(f"algorithm.off_policy_correction: {name!r} weights the KL loss term; expected "
                             f"algorithm.use_kl_loss, got False")
    return chain


def _check_async(config: TrainConfig) -> None:
    """``trainer.max_staleness`` >= 1 needs rollout workers that sample while the trainer trains."""
    k = config.trainer.max_staleness
    _check_positive("trainer.max_staleness", k, allow_zero=True)
    if k == 0:
        return
    if config.algorithm.batch_transforms:
        raise ValueError(
            f"trainer.max_staleness: expected 0 with algorithm.batch_transforms (a transform may draw more prompts "
            f"for the step it filters, which the K steps sampled ahead cannot), got {k}"
        )
    fix = "set --trainer.max-staleness 0 (synchronous)"
    if not config.ray.use_ray:
        raise ValueError(
            f"trainer.max_staleness: expected 0 in-process (--ray.no-use-ray: one process samples and trains in turn, "
            f"so nothing overlaps), got {k}; run on Ray with --ray.rollout-workers 1 (or more), or {fix}"
        )
    if config.rollout.backend == "hf" and config.ray.rollout_workers == 0:
        raise ValueError(
            f"trainer.max_staleness: expected 0 with the hybrid layout (--ray.rollout-workers 0: the policy trainer "
            f"samples itself, so sampling cannot overlap its updates), got {k}; set --ray.rollout-workers 1 (or more), or {fix}"
        )
    if config.rollout.backend == "vllm" and config.gpu.colocate:
        raise ValueError(
            f"trainer.max_staleness: expected 0 with colocated vLLM engines (--gpu.colocate: the engines sleep while the "
            f"trainer uses their GPUs), got {k}; set --gpu.no-colocate to give the engines their own GPUs, or {fix}"
        )


def resolve(config: TrainConfig, table: AlgorithmTable) -> ResolvedRun:
    """Check every name and hyperparameter of ``config`` against ``table``; build the run.

    Checked: the advantage estimator, policy loss, aggregation (``loss_reduction``) and KL
    estimator names, the task, reward and rollout backend names (UnknownNameError listing the
    options and the closest one), each function's hyperparameters and each task/reward's
    arguments against its signature (ValueError), and basic sizes. The task's data is read later,
    by the launcher's preflight (or the loop's start), still before any model loads.

    Args:
        config: the full training config.
        table: the algorithm table (``DEFAULT_TABLE`` plus registrations); the built-in tasks,
            rewards and rollout backends it lacks are added (``skyrl_fn.trainer.run_table``).

    Returns:
        ``ResolvedRun`` with every function bound (``run.algorithm``).

    Raises:
        UnknownNameError: an unknown estimator, loss, aggregation or KL estimator name.
        ValueError: an unknown hyperparameter key, or an out-of-range size.
        TypeError: ``config``/``table`` of the wrong type.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(table, AlgorithmTable):
        raise TypeError(f"table: expected an AlgorithmTable, got {type(table).__name__}")
    table = with_run_builtins(table)
    alg = config.algorithm
    correction = resolve_correction(alg, table)
    if alg.bypass_mode and alg.recompute_old_log_probs:
        raise ValueError(
            "algorithm.bypass_mode, algorithm.recompute_old_log_probs: expected at most one (bypass mode takes the "
            "old log-probs from the rollout engine instead of a trainer pass), got both"
        )
    algorithm = bind_algorithm(
        table,
        names={kind: getattr(alg, field) for field, (_, kind) in HYPER_FIELDS.items()},
        hyper={kind: getattr(alg, hyper) for hyper, kind in HYPER_FIELDS.values()},
        use_kl_loss=alg.use_kl_loss, kl_loss_coef=alg.kl_loss_coef, kl_in_reward=alg.use_kl_in_reward,
        correction=correction, entropy_coef=alg.entropy_coef,
    )
    tr, ro = config.trainer, config.rollout
    pipeline = bind_batch_transforms(table, alg.batch_transforms, alg.transform, max_new_tokens=ro.max_new_tokens)
    for name, value in (
        ("trainer.steps", tr.steps), ("trainer.prompts_per_step", tr.prompts_per_step),
        ("trainer.micro_batch_size", tr.micro_batch_size), ("trainer.lr", tr.lr),
        ("rollout.samples_per_prompt", ro.samples_per_prompt), ("rollout.max_new_tokens", ro.max_new_tokens),
        ("rollout.temperature", ro.temperature), ("algorithm.update_epochs", alg.update_epochs),
        ("trainer.keep_checkpoints", tr.keep_checkpoints),
    ):
        _check_positive(name, value)
    _check_positive("trainer.warmup_steps", tr.warmup_steps, allow_zero=True)
    _check_positive("trainer.max_consecutive_skips", tr.max_consecutive_skips, allow_zero=True)
    _check_positive("ray.rollout_workers", config.ray.rollout_workers, allow_zero=True)
    if not 0 < ro.top_p <= 1:
        raise ValueError(f"rollout.top_p: expected in (0, 1], got {ro.top_p!r}")
    if ro.backend == "vllm" and not VLLM_TEMPERATURE_RANGE[0] <= ro.temperature <= VLLM_TEMPERATURE_RANGE[1]:
        lo, hi = VLLM_TEMPERATURE_RANGE
        raise ValueError(
            f"rollout.temperature: expected in [{lo}, {hi}] with rollout.backend 'vllm' (vLLM's SamplingParams "
            f"rejects temperatures above {hi} and raises those below {lo} to {lo}, which the learner would not "
            f"know), got {ro.temperature!r}; use --rollout.backend hf for other temperatures"
        )
    _check_positive("gpu.sync_timeout_s", config.gpu.sync_timeout_s)
    _check_teacher(config, table)
    _check_data_parallel(config)
    _check_async(config)
    if config.data.min_digits < 1 or config.data.max_digits < config.data.min_digits:
        raise ValueError(
            f"data.min_digits/max_digits: expected 1 <= min <= max, got {config.data.min_digits}, {config.data.max_digits}"
        )
    ev = config.eval
    _check_positive("eval.every", ev.every, allow_zero=True)
    _check_positive("eval.size", ev.size)
    _check_positive("eval.batch_size", ev.batch_size)
    if ev.max_new_tokens is not None:
        _check_positive("eval.max_new_tokens", ev.max_new_tokens)
    if not 0.0 <= config.data.format_credit < 1.0:
        raise ValueError(f"data.format_credit: expected in [0, 1) (below a correct answer), got {config.data.format_credit!r}")
    data = config.data
    task_factory = _bind_run_piece(table, "task", data.task, data.task_args, "data.task", "data.task_args")
    reward = None
    if data.reward:
        reward = _bind_run_piece(table, "reward", data.reward, data.reward_args, "data.reward", "data.reward_args")
    elif data.reward_args:
        raise ValueError(f"data.reward_args: expected none without --data.reward, got {sorted(data.reward_args)}")
    backend_factory = _bind_run_piece(table, "rollout_backend", ro.backend, {}, "rollout.backend", None)
    # Before any model loads: every per-sample field a piece reads is one the trainer or the task provides.
    task_fields = provided_fields(reward if reward is not None else task_factory)
    task_label = f"task {data.task!r}" + (f" with reward {data.reward!r}" if data.reward else "")
    check_fields(algorithm.fields, task_fields, task=task_label)
    computed = requested_fields(algorithm.fields)
    if computed and alg.bypass_mode:
        raise ValueError(
            f"algorithm.bypass_mode: expected False when a piece reads {sorted(computed)} (the trainer computes it in the "
            f"old-log-prob forward pass that bypass mode skips), got True"
        )
    return ResolvedRun(
        config=config, table=table, algorithm=algorithm, task_factory=task_factory, reward=reward,
        backend_factory=backend_factory, batch_transforms=pipeline, task_fields=task_fields, computed_fields=computed,
    )


def _check_data_parallel(config: TrainConfig) -> None:
    """``trainer.workers``: W >= 1; W > 1 needs Ray, a whole prompt group per rank (either
    layout: the ranks sample, or ``ray.rollout_workers`` separate workers do) and the ``hf``
    backend, or ``vllm`` with one (trainer) GPU per rank (``docs/distributed.md``)."""
    tr = config.trainer
    if isinstance(tr.workers, bool) or not isinstance(tr.workers, int) or tr.workers < 1:
        raise ValueError(f"trainer.workers: expected an int >= 1, got {tr.workers!r}")
    _check_positive("trainer.dist_timeout_s", tr.dist_timeout_s)
    if tr.workers == 1:
        return
    if tr.workers > tr.prompts_per_step:
        raise ValueError(f"trainer.workers: expected <= trainer.prompts_per_step = {tr.prompts_per_step} (each rank trains whole prompt groups), got {tr.workers}")
    backend, gpu = config.rollout.backend, config.gpu
    for bad, what in (
        (not config.ray.use_ray, "ray.use_ray (the ranks are Ray actors; drop --ray.no-use-ray)"),
        (
            backend not in ("hf", "vllm"),
            f"rollout.backend 'hf' or 'vllm' (got {backend!r}; the ranks sample with their own model, or vLLM engines do)",
        ),
        (
            backend == "vllm" and gpu.colocate and tr.workers > gpu.num_gpus,
            f"one GPU each with rollout.backend 'vllm': gpu.num_gpus >= {tr.workers} (got {gpu.num_gpus})",
        ),
        (
            backend == "vllm" and not gpu.colocate and tr.workers > gpu.trainer_gpus,
            f"one trainer GPU each with rollout.backend 'vllm' and --gpu.no-colocate: gpu.trainer_gpus >= {tr.workers} (got {gpu.trainer_gpus})",
        ),
    ):
        if bad:
            raise ValueError(f"trainer.workers: {tr.workers} data-parallel ranks need {what}")


def _bind_run_piece(
    table: AlgorithmTable, kind: str, name: str, args: Mapping[str, Any], field: str, args_field: str | None
) -> Callable:
    """The ``kind`` entry ``name`` with ``args`` bound; errors name the config field."""
    try:
        entry = table.entry(kind, name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{field}: {err}") from None
    accepted = entry_hyperparameters(entry)
    if accepted is not None:
        for key in args:
            if key in SUPPLIED.get(kind, ()):
                raise ValueError(f"{args_field}: {key!r} is set by the trainer (trainer.{key}), not by {kind} arguments")
            if key not in accepted:
                raise ValueError(f"{args_field}: {kind} {name!r} {unknown_name_message('argument', key, accepted)}")
    return functools.partial(entry.fn, **args) if args else entry.fn


def _check_teacher(config: TrainConfig, table: AlgorithmTable) -> None:
    te, name = config.teacher, config.algorithm.advantage_estimator
    if "teacher_log_probs" in table.entry("advantage_estimator", name).requires and te.model is None:
        raise ValueError(f"teacher.model: advantage estimator {name!r} distils from a teacher (it requires teacher_log_probs), got None")
    if te.model is None:
        return
    if te.model == "":
        raise ValueError("teacher.model: expected 'tiny' or a model path, got ''")
    _check_positive("teacher.coef", te.coef)
    if te.model == "tiny":
        for field in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check_positive(f"teacher.{field}", getattr(te, field))
        if te.hidden_size % te.num_heads:
            raise ValueError(f"teacher.hidden_size: expected a multiple of teacher.num_heads ({te.num_heads}), got {te.hidden_size}")


def bind_batch_transforms(
    table: AlgorithmTable, names: tuple[str, ...], hyper: Mapping[str, Mapping[str, Any]], *, max_new_tokens: int
) -> BatchPipeline | None:
    """``algorithm.batch_transforms`` bound in order with ``algorithm.transform``'s hyperparameters;
    None when there are none.

    Raises:
        UnknownNameError: an unknown transform name (with the closest one).
        ValueError: a name given twice, hyperparameters for a transform not chosen or one the
            function does not take, an overlong buffer longer than ``rollout.max_new_tokens``.
    """
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ValueError(f"algorithm.batch_transforms: expected each name once, got {list(names)}")
    extra = sorted(set(hyper) - set(names))
    if extra:
        raise ValueError(f"algorithm.transform: hyperparameters for {extra}, which algorithm.batch_transforms does not choose ({list(names)})")
    fns = tuple(bind(table, "batch_transform", n, hyper.get(n)) for n in names)
    buf = None  # the built-in overlong penalty's buffer must fit in the generation budget
    if "overlong_penalty" in names and table.get("batch_transform", "overlong_penalty") is overlong_penalty:
        buf = (hyper.get("overlong_penalty") or {}).get("overlong_buffer_len", entry_hyperparameters(table.entry("batch_transform", "overlong_penalty"))["overlong_buffer_len"])
    if "overlong_penalty" in names and buf is not None and buf > max_new_tokens:
        raise ValueError(
            f"algorithm.transform.overlong_penalty.overlong_buffer_len: expected <= rollout.max_new_tokens ({max_new_tokens}), got {buf}"
        )
    return BatchPipeline(names, fns) if names else None
