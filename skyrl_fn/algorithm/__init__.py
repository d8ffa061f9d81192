"""The top of the algorithm stack: ``DEFAULT_TABLE`` (every built-in) and names bound once
(``Algorithm``, ``bind``, ``bind_algorithm``, ``compute_policy_loss``).
"""

from skyrl_fn.algorithm.binding import (
    SUPPLIED,
    Algorithm,
    CheckedEstimator,
    bind,
    bind_algorithm,
    compute_policy_loss,
    entry_hyperparameters,
)
from skyrl_fn.algorithm.builtins import (
    BUILTINS,
    DEFAULT_TABLE,
)

__all__ = [
    "SUPPLIED",
    "Algorithm",
    "CheckedEstimator",
    "entry_hyperparameters",
    "bind",
    "bind_algorithm",
    "compute_policy_loss",
    "BUILTINS",
    "DEFAULT_TABLE",
]
