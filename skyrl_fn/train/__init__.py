"""Training pieces: config and name resolution, models, tasks, rollouts, the learner step,
atomic checkpoints, the workers of each role and the one training loop over them. The Ray
launcher (``skyrl_fn.launcher``) implements the same ``Workers`` protocol with actors; everything
here also runs without Ray.
"""

from skyrl_fn.train.config import (
    AlgorithmConfig,
    LoggingConfig,
    RayConfig,
    TeacherConfig,
    TrainConfig,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
)
from skyrl_fn.train.run import ResolvedRun, resolve
from skyrl_fn.train.model import ModelConfig, build_critic, build_tiny_model, build_tokenizer, load_model, load_tokenizer
from skyrl_fn.train.rollout import BackendUnavailableError, HFBackend, RolloutBackend, RolloutBatch, RolloutConfig, hf_backend
from skyrl_fn.train.tasks import (
    DataConfig,
    DataState,
    DigitsTask,
    Example,
    Rewarded,
    Task,
    next_prompts,
    score,
)
from skyrl_fn.train.async_loop import AsyncRollouts, InFlight, staleness_metrics
from skyrl_fn.train.checkpoint import Checkpoint, latest_checkpoint, load, save
from skyrl_fn.train.learner import (
    Experience,
    KLController,
    TrainState,
    kl_controller_of,
    batched_log_probs,
    batched_values,
    compute_advantages,
    critic_update,
    loss_kernel,
    make_experience,
    make_optimizer,
    make_train_state,
    policy_update,
    sequence_log_probs,
    token_rewards,
)
from skyrl_fn.train.batch_transforms import batch_totals, collect, transform_step
from skyrl_fn.train.teacher import TeacherWorker, check_teacher_vocabulary, teacher_model_config
from skyrl_fn.train.loop import Summary, rollout_seed, run_step, seed_everything, train
from skyrl_fn.train.workers import (
    CriticWorker,
    Generated,
    LocalWorkers,
    PolicyWorker,
    ReferenceWorker,
    RolloutWorker,
    Workers,
    WorkersState,
)
from skyrl_fn.train.sampling import nucleus_log_mass, nucleus_mask, nucleus_probs, sampling_log_probs
from skyrl_fn.train.run_table import RUN_TABLE, with_run_builtins

__all__ = [
    "AlgorithmConfig", "DataConfig", "LoggingConfig", "ModelConfig", "RayConfig", "ResolvedRun",
    "RolloutConfig", "TeacherConfig", "TrainConfig", "TrainerConfig", "config_from_dict", "config_to_dict", "resolve",
    "batch_totals", "collect", "transform_step", "TeacherWorker", "check_teacher_vocabulary", "teacher_model_config",
    "Checkpoint", "latest_checkpoint", "load", "save",
    "Experience", "KLController", "TrainState", "kl_controller_of", "batched_log_probs", "batched_values",
    "compute_advantages", "critic_update", "loss_kernel", "make_experience", "make_optimizer",
    "make_train_state", "policy_update", "sequence_log_probs", "token_rewards",
    "Summary", "rollout_seed", "run_step", "seed_everything", "train",
    "AsyncRollouts", "InFlight", "staleness_metrics",
    "Workers", "LocalWorkers", "WorkersState", "Generated", "PolicyWorker", "RolloutWorker", "ReferenceWorker",
    "CriticWorker",
    "build_critic", "build_tiny_model", "build_tokenizer", "load_model", "load_tokenizer",
    "BackendUnavailableError", "HFBackend", "RolloutBackend", "RolloutBatch", "hf_backend",
    "nucleus_log_mass", "nucleus_mask", "nucleus_probs", "sampling_log_probs",
    "DataState", "DigitsTask", "Example", "Task", "Rewarded", "next_prompts", "score",
    "RUN_TABLE", "with_run_builtins",
]
