"""Advantage estimators: pure functions ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput``.

One module per family; every estimator runs under ``torch.no_grad`` and never changes its inputs.
Where the maths is a chain the named estimator is one: ``gae = chain(gae_raw, whiten())`` and
``reinforce_plus_plus = chain(reinforce_plus_plus_raw, whiten())`` (``skyrl_fn.core.compose``).
"""

from skyrl_fn.estimators.gae import gae, gae_raw
from skyrl_fn.estimators.group_relative import gpg, grpo, grpo_passk, maxrl, opo
from skyrl_fn.estimators.leave_one_out import rloo
from skyrl_fn.estimators.reinforce import (
    discounted_returns,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    reinforce_plus_plus_raw,
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
    "reinforce_plus_plus_raw",
    "reinforce_plus_plus_baseline",
    "remax",
    "gae",
    "gae_raw",
    "discounted_returns",
]
