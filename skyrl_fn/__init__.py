"""skyrl_fn: functional RL-for-LLM algorithm pieces on PyTorch.

The core: frozen records (``skyrl_fn.core.records``), pure estimators and losses, and an immutable
``AlgorithmTable`` naming them (``DEFAULT_TABLE`` holds every built-in).
"""

from skyrl_fn.core.records import (
    AdvantageInput,
    AdvantageOutput,
    PolicyLossInput,
    PolicyLossOutput,
    ReducedLoss,
)
from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import KINDS, AlgorithmTable, Entry, UnknownNameError
from skyrl_fn.core.compose import AdvantageTransform, Chain, RewardTransform, chain
from skyrl_fn.algorithm import Algorithm, bind, bind_algorithm, compute_policy_loss
from skyrl_fn.core.requires import requires
from skyrl_fn.transforms import (
    OutcomeEstimator,
    batch_mean,
    clip_advantages,
    group_mean,
    group_median,
    group_normalize_std,
    leave_one_out,
    length_penalty,
    normalize_by_length,
    outcome_estimator,
    scale_rewards,
    shape_rewards,
    weighted_sum,
    whiten,
)

__version__ = "0.1.0"

__all__ = [
    "AdvantageInput",
    "AdvantageOutput",
    "PolicyLossInput",
    "PolicyLossOutput",
    "ReducedLoss",
    "AlgorithmTable",
    "Entry",
    "DEFAULT_TABLE",
    "KINDS",
    "UnknownNameError",
    # names bound once (skyrl_fn.algorithm, skyrl_fn.core.requires)
    "Algorithm",
    "bind",
    "bind_algorithm",
    "compute_policy_loss",
    "requires",
    # composition (skyrl_fn.core.compose, skyrl_fn.transforms)
    "chain",
    "Chain",
    "RewardTransform",
    "AdvantageTransform",
    "scale_rewards",
    "shape_rewards",
    "weighted_sum",
    "length_penalty",
    "outcome_estimator",
    "OutcomeEstimator",
    "group_mean",
    "leave_one_out",
    "batch_mean",
    "group_median",
    "whiten",
    "clip_advantages",
    "normalize_by_length",
    "group_normalize_std",
]
