"""SkyRL-Train's class-based advantage estimators (the seed's ``skyrl_train.algorithms.advantage_estimators``).

Replace ``from skyrl_train.algorithms.advantage_estimators import AdvantageEstimator,
register_advantage_estimator`` with ``from skyrl_fn.compat.advantage_estimators import ...``. (In
SkyRL 0.3.0 the name ``AdvantageEstimator`` is the ``StrEnum`` of built-in names:
``skyrl_fn.compat.AdvantageEstimator``.) Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

from skyrl_fn.compat._advantages import AdvantageEstimator
from skyrl_fn.compat._api import register_advantage_estimator

__all__ = ["AdvantageEstimator", "register_advantage_estimator"]
