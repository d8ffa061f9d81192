"""Training configuration: frozen, tyro-ready dataclasses, and name resolution against the table.

``TrainConfig`` composes one group per concern. The groups the lower layers read live with their
code (``ModelConfig`` with the models, ``DataConfig`` with the tasks, ``RolloutConfig`` with the
rollout backends), so those layers never import the trainer's config; the rest live here.

Every attribute docstring becomes the ``--help`` text of its flag (tyro reads them). Names of
algorithm pieces are plain strings, checked once by :func:`resolve` against an ``AlgorithmTable``
(so ``--algorithm.advantage-estimator my_custom`` works for anything registered). ``resolve``
returns the one :class:`ResolvedRun` the driver ships into every Ray task and actor.

Hyperparameters belong to the function they are for: each name field has its own mapping
(``advantage_estimator`` -> ``estimator``, ``policy_loss`` -> ``loss``, ``loss_reduction`` ->
``reduction``, ``kl_estimator`` -> ``kl``; :data:`HYPER_FIELDS`) holding only the values to change.
``resolve`` binds each function once (``skyrl_fn.algorithm.bind_algorithm``): a key the function
does not take is an error naming it, and a function's own defaults are never overridden by
anything else. The command line gives each chosen function's hyperparameters typed flags
(``skyrl_fn.cli.app``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Literal, Mapping

import attrs

from skyrl_fn.algorithm import Algorithm, bind_algorithm
from skyrl_fn.losses.off_policy import off_policy_correction
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.rollout.base import VLLM_TEMPERATURE_RANGE, RolloutConfig
from skyrl_fn.tasks.base import DataConfig

__all__ = [
    "AlgorithmConfig",
    "TrainerConfig",
    "RayConfig",
    "LoggingConfig",
    "EvalConfig",
    "GPUPlacementConfig",
    "TrainConfig",
    "ResolvedRun",
    "resolve",
    "config_to_dict",
    "config_from_dict",
    "HYPER_FIELDS",
]

#: ``AlgorithmConfig`` name field -> (its hyperparameter field, the table kind).
HYPER_FIELDS: Mapping[str, tuple[str, str]] = {
    "advantage_estimator": ("estimator", "advantage_estimator"),
    "policy_loss": ("loss", "policy_loss"),
    "loss_reduction": ("reduction", "aggregation"),
    "kl_estimator": ("kl", "kl_estimator"),
}

HyperValue = float | int | bool | str
#: ``torch.compile`` modes (the same tuple as ``skyrl_fn.ops.kernels.COMPILE_MODES``; spelled out
#: here so this module imports without ``skyrl_fn.distributed``).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Which algorithm pieces to use (names from the table) and their hyperparameters."""

    advantage_estimator: str = "grpo"
    """Advantage estimator registered in the algorithm table (e.g. grpo, dr_grpo, rloo, gae)."""
    estimator: dict[str, HyperValue] = dataclasses.field(default_factory=dict)
    """Hyperparameters of the advantage estimator, only those to change (the rest keep the
    function's own defaults)."""
    policy_loss: str = "regular"
    """Policy loss registered in the algorithm table (e.g. regular = PPO clip, gspo, cispo)."""
    loss: dict[str, HyperValue] = dataclasses.field(default_factory=dict)
    """Hyperparameters of the policy loss, only those to change."""
    loss_reduction: str = "token_mean"
    """Aggregation of the per-token loss: token_mean, token_sum, seq_mean_token_sum,
    seq_mean_token_mean, seq_mean_token_sum_norm (or any registered aggregation)."""
    reduction: dict[str, HyperValue] = dataclasses.field(default_factory=dict)
    """Hyperparameters of the aggregation (besides the global counts the objective passes)."""
    use_kl_loss: bool = False
    """Add kl_loss_coef * KL(policy || reference) to the policy loss."""
    kl_loss_coef: float = 0.001
    """Coefficient of the KL loss term."""
    kl_estimator: str = "k3"
    """KL estimator registered in the table (k1, k2, k3, ...), used by the KL loss and penalty."""
    kl: dict[str, HyperValue] = dataclasses.field(default_factory=dict)
    """Hyperparameters of the KL estimator, only those to change."""
    use_kl_in_reward: bool = False
    """Subtract kl_coef * KL from the token rewards (the reward-penalty form)."""
    kl_ctrl: Literal["fixed", "adaptive"] = "fixed"
    """KL-in-reward coefficient controller: fixed, or adaptive (Ziegler et al. 2019)."""
    kl_coef: float = 0.001
    """Initial KL-in-reward coefficient."""
    kl_target: float = 0.1
    """Target KL of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller."""
    off_policy_correction: Literal["none", "tis", "tis_sequence"] = "none"
    """Correct for rollout-vs-trainer mismatch: truncated importance sampling with weight
    min(exp(old_log_probs - rollout_log_probs), tis_cap) per token (tis) or per sequence."""
    tis_cap: float = 2.0
    """Cap of the truncated importance-sampling weight."""
    entropy_coef: float = 0.0
    """Subtract entropy_coef * mean token entropy from the policy loss (0 disables)."""
    value_clip: float = 0.2
    """Clip range of the critic's value loss (PPO value clipping)."""
    update_epochs: int = 1
    """Passes over each rollout batch per step (> 1 makes the ratio differ from 1)."""
    recompute_old_log_probs: bool = False
    """Score the rollout with a separate no-grad forward pass before the update (False takes the
    old log-probs from the update's first forward pass: the same values, one pass fewer)."""
    compile: bool = False
    """torch.compile the loss kernel (policy loss + aggregation)."""
    compile_mode: CompileMode = "max-autotune-no-cudagraphs"
    """With compile, on CUDA: the inductor mode (skyrl_fn.ops.kernels); CPU always compiles as default."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy decoding, pass@1 (skyrl_fn.trainer.evaluate)."""

    every: int = 0
    """Evaluate at step 0, every this many steps and after the last step; 0 disables."""
    size: int = 64
    """Held-out prompts (the first ones of the task's held-out split, or of eval.path)."""
    path: str | None = None
    """A jsonl of held-out {"prompt", "answer"} rows (for tasks without a held-out split, e.g. gsm8k)."""
    max_new_tokens: int | None = None
    """Longest greedy response; None uses rollout.max_new_tokens."""
    batch_size: int = 32
    """Prompts per generate call."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Optimisation and checkpoints."""

    steps: int = 100
    """Training steps (one rollout batch each)."""
    prompts_per_step: int = 16
    """P, prompts per step; the batch holds B = P * G responses."""
    micro_batch_size: int = 128
    """Sequences per forward/backward; gradients accumulate to the full-batch gradient."""
    lr: float = 3e-3
    """Peak AdamW learning rate of the policy."""
    warmup_steps: int = 3
    """Linear warm-up from 0 to lr over this many steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (<= 0 disables)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of models, data and sampling."""
    ckpt_dir: str | None = None
    """Checkpoint directory; None uses <logging.run_dir>/checkpoints."""
    ckpt_interval: int = 25
    """Save every this many steps (and at the end); <= 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Keep the latest this many checkpoints."""
    resume: bool = False
    """Continue from the latest checkpoint in ckpt_dir (start fresh if there is none)."""
    critic_lr: float = 3e-3
    """Peak AdamW learning rate of the critic (GAE)."""
    torch_threads: int = 1
    """torch CPU threads per process (0 keeps torch's default); tiny models run fastest on 1."""
    max_consecutive_skips: int = 3
    """Stop the run after more than this many consecutive steps skipped for a non-finite reward,
    loss or gradient (each skipped step is counted and logged; 0 stops at the first)."""


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """Ray placement."""

    use_ray: bool = True
    """Run policy, reference, critic and rollout as Ray actors; False runs in-process."""
    address: str | None = None
    """Join an existing cluster (e.g. auto or ray://host:10001); None starts a local Ray."""
    num_cpus: float | None = None
    """CPUs for a local Ray (None: Ray's default)."""
    rollout_workers: int = 0
    """Separate rollout actors (prompts split, weights pushed after each update); 0: the policy trainer samples itself (hybrid, nothing moves). vLLM: one per engine."""


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go."""

    run_dir: str = "runs/latest"
    """Directory for metrics, plots and (by default) checkpoints."""
    jsonl: bool = True
    """Write metrics.jsonl in run_dir."""
    tensorboard: bool = True
    """Write TensorBoard events in run_dir."""
    plot: bool = True
    """Write a PNG of reward and KL per step at the end."""
    wandb_project: str | None = None
    """Log to this wandb project (needs the wandb extra)."""
    progress: bool = True
    """Show a rich progress bar."""


@dataclasses.dataclass(frozen=True)
class GPUPlacementConfig:
    """GPUs of a run and how trainer and rollout engines share them (used with --rollout.backend vllm;
    the Ray bundles are planned by ``skyrl_fn.distributed.placement.plan_placement``)."""

    num_gpus: int = 1
    """N, GPUs the run uses (one placement-group bundle each)."""
    colocate: bool = True
    """True: trainer and vLLM engines share every GPU (engines sleep during training);
    False: engines get their own GPUs and weights are broadcast over NCCL."""
    trainer_gpus: int = 1
    """separate layout only: GPUs of the trainer side (the rest go to the engines)."""
    cpus_per_bundle: float = 1.0
    """CPUs reserved with each GPU bundle."""
    sync_timeout_s: float = 900.0
    """Seconds the driver waits for one weight sync (or for forming the NCCL group) before it
    stops the run with an error naming the step (a hung collective never returns)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs."""

    algorithm: AlgorithmConfig = AlgorithmConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    trainer: TrainerConfig = TrainerConfig()
    ray: RayConfig = RayConfig()
    logging: LoggingConfig = LoggingConfig()
    gpu: GPUPlacementConfig = GPUPlacementConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def ckpt_dir(self) -> str:
        """The effective checkpoint directory."""
        import os

        return self.trainer.ckpt_dir or os.path.join(self.logging.run_dir, "checkpoints")



def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A JSON-ready nested dict of ``config``."""
    return dataclasses.asdict(config)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict`; unknown keys raise ValueError naming them."""
    groups = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    classes = {
        "algorithm": AlgorithmConfig, "model": ModelConfig, "data": DataConfig,
        "rollout": RolloutConfig, "trainer": TrainerConfig, "ray": RayConfig, "logging": LoggingConfig,
        "gpu": GPUPlacementConfig, "eval": EvalConfig,
    }
    for key, value in data.items():
        if key not in groups:
            raise ValueError(f"config: unknown group {key!r}; expected one of {sorted(groups)}")
        cls = classes[key]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"config.{key}: unknown fields {sorted(unknown)}; expected some of {sorted(names)}")
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        kwargs[key] = cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in value.items()})  # JSON has no tuples
    return TrainConfig(**kwargs)


@attrs.frozen(kw_only=True, eq=False)
class ResolvedRun:
    """The one object the driver builds after name resolution and ships everywhere.

    Attributes:
        config: the full ``TrainConfig``.
        table: the ``AlgorithmTable`` every name was checked against (with the user's
            registrations); workers look functions up in it, never in a global.
        algorithm: every piece bound once (``skyrl_fn.algorithm.Algorithm``): workers call these
            callables and never look a name up.
    """

    config: TrainConfig
    table: AlgorithmTable
    algorithm: Algorithm

    @property
    def uses_critic(self) -> bool:
        """True when the advantage estimator reads critic values (its entry ``requires`` them)."""
        return self.algorithm.needs_critic

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


def resolve(config: TrainConfig, table: AlgorithmTable) -> ResolvedRun:
    """Check every name and hyperparameter of ``config`` against ``table``; build the run.

    Checked: the advantage estimator, policy loss, aggregation (``loss_reduction``) and KL
    estimator names (UnknownNameError listing the options and the closest one), each function's
    hyperparameters against its signature (ValueError), and basic sizes.

    Args:
        config: the full training config.
        table: the algorithm table (``DEFAULT_TABLE`` plus registrations).

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
    alg = config.algorithm
    correction = None
    if alg.off_policy_correction != "none":
        level = {"tis": "token", "tis_sequence": "sequence"}[alg.off_policy_correction]
        correction = functools.partial(off_policy_correction, tis_ratio_type=level, tis_cap=alg.tis_cap)
    algorithm = bind_algorithm(
        table,
        names={kind: getattr(alg, field) for field, (_, kind) in HYPER_FIELDS.items()},
        hyper={kind: getattr(alg, hyper) for hyper, kind in HYPER_FIELDS.values()},
        use_kl_loss=alg.use_kl_loss, kl_loss_coef=alg.kl_loss_coef, kl_in_reward=alg.use_kl_in_reward,
        correction=correction, entropy_coef=alg.entropy_coef,
    )
    tr, ro = config.trainer, config.rollout
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
    if config.data.task == "gsm8k" and not config.data.path:
        raise ValueError("data.path: expected a jsonl path for task gsm8k (see launch/prep_gsm8k.py), got None")
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
    if ev.every > 0 and config.data.task != "arithmetic" and not ev.path:
        raise ValueError(
            f"eval.path: task {config.data.task!r} has no held-out split of its own; expected a jsonl of "
            f'held-out {{"prompt", "answer"}} rows with --eval.every {ev.every}, got None'
        )
    if config.data.task == "arithmetic" and not 0.0 <= config.data.format_credit < 1.0:
        raise ValueError(f"data.format_credit: expected in [0, 1) (below a correct answer), got {config.data.format_credit!r}")
    return ResolvedRun(config=config, table=table, algorithm=algorithm)
