"""Advantage estimators: pure functions ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput``.

One module per family; every estimator runs under ``torch.no_grad`` and never changes its inputs.
"""

from skyrl_fn.estimators.group_relative import grpo

__all__ = ["grpo"]
