"""Advantage estimators: pure functions ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput``.

One module per family; every estimator runs under ``torch.no_grad`` and never changes its inputs.
"""

from skyrl_fn.estimators.gae import gae
from skyrl_fn.estimators.group_relative import gpg, grpo, grpo_passk, maxrl, opo
from skyrl_fn.estimators.leave_one_out import rloo
from skyrl_fn.estimators.reinforce import (
    discounted_returns,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    remax,
)

__all__ = [
    "grpo",
    "rloo",
    "maxrl",
    "gpg",
    "grpo_passk",
    "opo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
    "gae",
    "discounted_returns",
]
