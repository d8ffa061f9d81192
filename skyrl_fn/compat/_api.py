"""SkyRL-Train's module-level functions over the registries: the registration decorators
(``register_advantage_estimator``, ``register_policy_loss`` and the seed era's) and the dispatcher
``compute_advantages_and_returns``. Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import enum
import functools
import inspect
from typing import Any, Callable

from skyrl_fn.compat._registry import (
    AdvantageEstimatorRegistry,
    BaseFunctionRegistry,
    PolicyLossRegistry,
    SeedPolicyLossRegistry,
)

__all__ = [
    "register_advantage_estimator",
    "register_policy_loss",
    "register_seed_policy_loss",
    "compute_advantages_and_returns",
]


def _decorator(registry: type[BaseFunctionRegistry], name: Any) -> Callable:
    def decorator(func: Callable) -> Callable:
        if inspect.isclass(func):
            registry.register(name, func)
            return func

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        registry.register(name, wrapper)
        return wrapper

    return decorator


def register_advantage_estimator(name: str | enum.Enum, estimator: Callable | type | None = None) -> Callable:
    """Register a SkyRL-style advantage estimator.

    ``@register_advantage_estimator("name")`` decorates a keyword function (or an
    ``AdvantageEstimator`` subclass) and returns it (functions wrapped with ``functools.wraps``);
    ``register_advantage_estimator("name", MyEstimator)`` registers a class, instance or function
    directly and returns it. Duplicates raise ValueError.
    """
    if estimator is not None:
        AdvantageEstimatorRegistry.register(name, estimator)
        return estimator
    return _decorator(AdvantageEstimatorRegistry, name)


def register_policy_loss(name: str | enum.Enum, loss: Callable | None = None) -> Callable:
    """Register a SkyRL-style policy loss; as a decorator or ``register_policy_loss(name, fn)``."""
    if loss is not None:
        PolicyLossRegistry.register(name, loss)
        return loss
    return _decorator(PolicyLossRegistry, name)


def register_seed_policy_loss(name: str | enum.Enum, loss: Callable | None = None) -> Callable:
    """The seed era's ``register_policy_loss`` (into ``SeedPolicyLossRegistry``); as a decorator or
    ``register_seed_policy_loss(name, fn)``."""
    if loss is not None:
        SeedPolicyLossRegistry.register(name, loss)
        return loss
    return _decorator(SeedPolicyLossRegistry, name)


def compute_advantages_and_returns(
    token_level_rewards,
    response_mask,
    index,
    adv_estimator: str | enum.Enum,
    config: Any = None,
    values=None,
    grpo_norm_by_std: bool | None = None,
    gamma: float = 1.0,
    lambd: float = 1.0,
    **kwargs: Any,
):
    """SkyRL-Train's dispatcher: look ``adv_estimator`` up and call it with the trainer's keywords.

    Returns ``(advantages [B, T], returns [B, T])``. ``grpo_norm_by_std=None`` (default) leaves the
    switch to the estimator's own default (True for ``grpo``, as SkyRL-Train's default).
    """
    if grpo_norm_by_std is not None:
        kwargs["grpo_norm_by_std"] = grpo_norm_by_std
    return AdvantageEstimatorRegistry.get(adv_estimator)(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        values=values,
        gamma=gamma,
        lambd=lambd,
        config=config,
        **kwargs,
    )
