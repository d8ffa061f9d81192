"""skyrl_fn: functional RL-for-LLM algorithm pieces on PyTorch.

The core: frozen records (``skyrl_fn.records``), pure estimators and losses, and an immutable
``AlgorithmTable`` naming them (``DEFAULT_TABLE`` holds every built-in).
"""

from skyrl_fn.records import (
    AdvantageInput,
    AdvantageOutput,
    PolicyLossInput,
    PolicyLossOutput,
    ReducedLoss,
)
from skyrl_fn.table import DEFAULT_TABLE, KINDS, AlgorithmTable, Entry, UnknownNameError

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
]
