"""Training configuration: frozen, tyro-ready dataclasses.

``TrainConfig`` composes one group per concern. The groups the lower layers read live with their
code (``ModelConfig`` with the models, ``DataConfig`` with the tasks, ``RolloutConfig`` with the
rollout backends), so those layers never import the trainer's config; the rest live here.

Every attribute docstring becomes the ``--help`` text of its flag (tyro reads them). Names of
algorithm pieces, tasks, rewards and rollout backends are plain strings, checked once by
``skyrl_fn.trainer.run.resolve`` against an ``AlgorithmTable`` (so
``--algorithm.advantage-estimator my_custom`` and ``--data.task my_task`` work for anything
registered), which returns the one ``ResolvedRun`` the driver ships into every Ray task and actor.

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
from typing import Any, Literal, Mapping

from skyrl_fn.core.table import HyperValue
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.rollout.base import RolloutConfig
from skyrl_fn.tasks.base import DataConfig

__all__ = [
    "AlgorithmConfig",
    "TeacherConfig",
    "TrainerConfig",
    "RayConfig",
    "LoggingConfig",
    "EvalConfig",
    "GPUPlacementConfig",
    "TrainConfig",
    "config_to_dict",
    "config_from_dict",
    "HYPER_FIELDS",
    "DATA_HYPER_FIELDS",
]

#: ``AlgorithmConfig`` name field -> (its hyperparameter field, the table kind).
HYPER_FIELDS: Mapping[str, tuple[str, str]] = {
    "advantage_estimator": ("estimator", "advantage_estimator"),
    "policy_loss": ("loss", "policy_loss"),
    "loss_reduction": ("reduction", "aggregation"),
    "kl_estimator": ("kl", "kl_estimator"),
}

#: ``DataConfig`` name field -> (its argument field, the table kind).
DATA_HYPER_FIELDS: Mapping[str, tuple[str, str]] = {
    "task": ("task_args", "task"),
    "reward": ("reward_args", "reward"),
}

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
    off_policy_correction: tuple[str, ...] = ()
    """Off-policy corrections registered in the table (kind off_policy_correction), composed in the
    order given (skyrl_fn.losses.compose_corrections): tis, tis_sequence, icepop, geo_mask,
    product_mask, outlier_veto, opsm, unbiased_kl, or your own. Empty: none."""
    correction: dict[str, dict[str, HyperValue]] = dataclasses.field(default_factory=dict)
    """Hyperparameters of the chosen corrections, name -> {hyperparameter: value}, only those to
    change (on the command line: --algorithm.correction.NAME.HYPER VALUE)."""
    bypass_mode: bool = False
    """Bypass mode (verl's algorithm.rollout_correction.bypass_mode): the old log-probs are the
    rollout engine's, no trainer pass scores the rollout; the policy loss then measures its ratio
    against the sampler (regular = verl's loss_type ppo_clip, reinforce + a tis correction with
    against=current = its loss_type reinforce)."""
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
    batch_transforms: tuple[str, ...] = ()
    """Batch transforms registered in the table, applied in order to each step's sampled batch
    before advantages (overlong_filter, overlong_penalty, zero_variance_filter, dynamic_sampling)."""
    transform: dict[str, dict[str, HyperValue]] = dataclasses.field(default_factory=dict)
    """Hyperparameters of the batch transforms: name -> only those to change."""

    def __post_init__(self) -> None:
        # A single name (and the former "none") reads as a one-piece / empty chain.
        value = self.off_policy_correction
        if isinstance(value, str):
            object.__setattr__(self, "off_policy_correction", () if value == "none" else (value,))
        elif isinstance(value, list):  # JSON has no tuples
            object.__setattr__(self, "off_policy_correction", tuple(value))


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """On-policy distillation: a frozen teacher scores the student's own samples and its log-probs
    feed a reverse-KL term of the advantages (skyrl_fn.trainer.teacher)."""

    model: str | None = None
    """None: no teacher. 'tiny': the embedded tiny Llama with the sizes below (seeded with
    teacher.seed); else a local HF directory, .gguf file or packaged model, as --model.name-or-path.
    It must have the policy's tokenizer (checked before training)."""
    coef: float = 1.0
    """Weight of the reverse-KL term: A_t += coef * (log pi_teacher(y_t) - log pi_student(y_t))."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter dtype of the teacher."""
    seed: int = 1
    """tiny only: initialisation seed."""
    hidden_size: int = 64
    """tiny only: hidden size."""
    num_layers: int = 2
    """tiny only: transformer layers."""
    num_heads: int = 4
    """tiny only: attention heads."""
    intermediate_size: int = 256
    """tiny only: MLP width."""


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
    workers: int = 1
    """W, data-parallel policy ranks (Ray actors, one torch.distributed group, FSDP2-sharded; see docs/distributed.md); 1 is the single policy actor."""
    dist_timeout_s: float = 300.0
    """Seconds a collective of the W ranks may wait (a dead or stuck rank fails the run after this at the latest)."""
    bf16_mixed_precision: bool = False
    """W > 1: bf16 parameters for compute, fp32 gradient reduction and master weights (FSDP2 MixedPrecisionPolicy; meant for CUDA)."""
    max_staleness: int = 0
    """K, asynchronous training: rollouts of the next K steps run while the policy trains, and no
    update uses a sample produced more than K policy versions ago (docs/async.md). 0: synchronous
    (sample, then update). K >= 1 needs separate rollout workers (--ray.rollout-workers >= 1)."""
    stale_samples: Literal["regenerate", "drop"] = "regenerate"
    """With max_staleness >= 1, a batch older than K versions (e.g. restored from a checkpoint written
    with a larger K): regenerate its prompts with the current policy, or drop them and sample the
    next prompts. Counted in the metrics (stale_regenerated, stale_dropped)."""


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
    """Separate rollout actors (prompts split, weights pushed after each update; with trainer.workers W > 1 the ranks gather them once per update); 0: the policy trainer (or each rank) samples itself (hybrid, nothing moves). vLLM: one per engine."""


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
    teacher: TeacherConfig = TeacherConfig()

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
        "gpu": GPUPlacementConfig, "eval": EvalConfig, "teacher": TeacherConfig,
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
