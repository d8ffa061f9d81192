"""SkyRL-Train's registries, decorators and ``sync_registries``, over the frozen table.

The registries below (advantage estimators; SkyRL 0.3.0's and the seed era's policy losses) are
the only mutable global state of the library. They hold only what
users register; the built-ins are read from ``DEFAULT_TABLE`` on lookup. ``freeze()`` turns them
into one ``AlgorithmTable``, the value that Ray tasks receive as an argument.
"""

from __future__ import annotations

import enum
import functools
import inspect
from typing import Any, Callable, ClassVar

import cloudpickle

from skyrl_fn.compat._advantages import AdvantageEstimator, NativeFromSkyRL, SkyRLCallable
from skyrl_fn.compat._calls import as_name, describe
from skyrl_fn.compat._losses import NativeFromSkyRLLoss, SkyRLPolicyLoss, SkyRLSumPolicyLoss
from skyrl_fn.compat._policy_losses import SKYRL_LOSSES, PolicyLossType
from skyrl_fn.compat._seed_losses import SEED_LOSS_NAMES, SEED_LOSSES
from skyrl_fn.table import DEFAULT_TABLE, KINDS, AlgorithmTable, UnknownNameError, infer_kind, unknown_name_message

__all__ = [
    "AdvantageEstimatorRegistry",
    "PolicyLossRegistry",
    "SeedPolicyLossRegistry",
    "PolicyLossType",
    "register_advantage_estimator",
    "register_policy_loss",
    "register_seed_policy_loss",
    "sync_registries",
    "repopulate_all_registries",
    "freeze",
    "compute_advantages_and_returns",
]


class BaseFunctionRegistry:
    """SkyRL-Train's registry interface (class methods on a per-kind class), without Ray actors.

    Lookup order: user registrations, then the built-ins of ``DEFAULT_TABLE`` (which
    ``unregister`` can hide, as SkyRL lets you unregister a default). Built-ins are returned as
    SkyRL-style callables (``SkyRLCallable`` / ``SkyRLPolicyLoss``); user functions as registered.

    Registering a built-in's name raises ValueError only for SkyRL-Train's own defaults
    (``_skyrl_defaults``). skyrl_fn has more built-ins (e.g. the ``reinforce`` policy loss), and
    SkyRL code may register those names for its own functions: the user function then shadows the
    built-in, in ``get`` and in ``freeze()``, until it is unregistered.
    """

    _kind: ClassVar[str] = ""
    _function_type: ClassVar[str] = "function"
    _skyrl_defaults: ClassVar[frozenset[str]] = frozenset()
    _functions: ClassVar[dict[str, Callable]]
    _hidden: ClassVar[set[str]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._functions = {}
        cls._hidden = set()

    # -- helpers ----------------------------------------------------------------------------
    @classmethod
    def _builtins(cls) -> tuple[str, ...]:
        return tuple(n for n in DEFAULT_TABLE.names(cls._kind) if n not in cls._hidden)

    @classmethod
    def _adapt(cls, table: AlgorithmTable, name: str) -> Callable:
        raise NotImplementedError

    @classmethod
    def _shadows(cls, name: str) -> bool:
        """Whether the user registration ``name`` shadows a skyrl_fn-only built-in."""
        return name in cls._functions and name in DEFAULT_TABLE.names(cls._kind) and name not in cls._skyrl_defaults

    @classmethod
    def _prepare(cls, name: str, func: Any) -> Callable:
        """Check a SkyRL-style callable before storing it."""
        if not callable(func):
            raise TypeError(f"{cls._function_type} {name!r}: expected a callable, got {type(func).__name__}")
        if infer_kind(func) in KINDS:
            raise TypeError(
                f"{cls._function_type} {name!r}: {describe(func)} is a native function (its first "
                f"parameter is a record); register it with AlgorithmTable.register, expected a "
                f"SkyRL-style keyword function here"
            )
        return func

    # -- SkyRL-Train's interface ------------------------------------------------------------
    @classmethod
    def register(cls, name: str | enum.Enum, func: Callable) -> None:
        """Register ``func`` as ``name`` (a string or StrEnum).

        Raises:
            ValueError: ``name`` is already registered (also one of SkyRL-Train's built-ins, unless
                unregistered first), or is not a non-empty string without whitespace.
            TypeError: ``func`` is not callable, or is a native record-taking function.
        """
        name = as_name(name)
        if name in cls._functions or (name in cls._builtins() and name in cls._skyrl_defaults):
            raise ValueError(f"{cls._function_type} {name!r} already registered")
        cls._functions[name] = cls._prepare(name, func)

    @classmethod
    def get(cls, name: str | enum.Enum) -> Callable:
        """The function registered as ``name``.

        Raises:
            UnknownNameError: (a KeyError and a ValueError) listing the available names and the
                closest one.
        """
        key = name.value if isinstance(name, enum.Enum) else name
        if key in cls._functions:
            return cls._functions[key]
        if key in cls._builtins():
            return cls._adapt(DEFAULT_TABLE, key)
        message = unknown_name_message(cls._function_type, str(key), cls.list_available())
        raise UnknownNameError("U" + message[1:])  # SkyRL's wording: "Unknown advantage estimator 'x'"

    @classmethod
    def list_available(cls) -> list[str]:
        """Every name ``get`` accepts: the built-ins (sorted), then user registrations in order."""
        return list(cls._builtins()) + [n for n in cls._functions if n not in cls._builtins()]

    @classmethod
    def unregister(cls, name: str | enum.Enum) -> None:
        """Remove ``name`` (a user registration, else hide the built-in); UnknownNameError if absent."""
        key = as_name(name)
        if key in cls._functions:
            del cls._functions[key]
        elif key in cls._builtins():
            cls._hidden.add(key)
        else:
            raise UnknownNameError(
                f"{cls._function_type} {key!r} not registered; "
                + unknown_name_message(cls._function_type, key, cls.list_available())
            )

    @classmethod
    def reset(cls) -> None:
        """Forget every user registration and bring back every built-in (for tests)."""
        cls._functions.clear()
        cls._hidden.clear()

    @classmethod
    def repopulate_registry(cls) -> None:
        """Bring back unregistered built-ins whose name no user function took since."""
        cls._hidden = {n for n in cls._hidden if n in cls._functions}

    @classmethod
    def sync_with_actor(cls) -> None:
        """Check that every registration pickles (there is no actor to sync; see ``sync_registries``)."""
        for name, fn in cls._functions.items():
            try:
                cloudpickle.dumps(fn)
            except Exception as e:
                raise TypeError(
                    f"{cls._function_type} {name!r} ({describe(fn)}): expected it to pickle with "
                    f"cloudpickle so Ray workers can receive it in the frozen table, got "
                    f"{type(e).__name__}: {e}"
                ) from e


class AdvantageEstimatorRegistry(BaseFunctionRegistry):
    """SkyRL-style advantage estimators: ``fn(token_level_rewards, response_mask, index, **kwargs)
    -> (advantages, returns)``; classes derived from ``AdvantageEstimator`` are instantiated."""

    _kind = "advantage_estimator"
    _function_type = "advantage estimator"
    _skyrl_defaults = frozenset({"gae", "grpo", "rloo", "reinforce++", "maxrl"})

    @classmethod
    def _adapt(cls, table: AlgorithmTable, name: str) -> Callable:
        return SkyRLCallable(table, name)

    @classmethod
    def _prepare(cls, name: str, func: Any) -> Callable:
        if inspect.isclass(func):
            if not issubclass(func, AdvantageEstimator):
                raise TypeError(
                    f"{cls._function_type} {name!r}: expected a function or an AdvantageEstimator "
                    f"subclass, got class {describe(func)}"
                )
            func = func()
        return super()._prepare(name, func)


class PolicyLossRegistry(BaseFunctionRegistry):
    """SkyRL 0.3.0's policy losses: ``fn(log_probs, old_log_probs, advantages, config,
    loss_mask=None, rollout_logprobs=None) -> (masked-sum loss, metrics dict)``; the reduction is
    in the advantages. SkyRL's built-in names give SkyRL's functions (``_policy_losses``), the
    table's other losses a ``SkyRLSumPolicyLoss``. User functions are frozen into the table as
    ``NativeFromSkyRLLoss(..., presummed=True)``."""

    _kind = "policy_loss"
    _function_type = "policy loss"
    _skyrl_defaults = frozenset(m.value for m in PolicyLossType)
    _presummed: ClassVar[bool] = True

    @classmethod
    def _adapt(cls, table: AlgorithmTable, name: str) -> Callable:
        return SKYRL_LOSSES.get(name) or SkyRLSumPolicyLoss(table, name)


class SeedPolicyLossRegistry(PolicyLossRegistry):
    """The skyrl_train seed era's policy losses (``skyrl_fn.compat.skyrl_train.PolicyLossRegistry``):
    ``fn(...) -> (loss reduced by config.loss_reduction, clip_ratio float)``. A registry of its own:
    user functions are frozen as ``NativeFromSkyRLLoss`` (reduced loss), the seed's built-in names
    give the seed's functions (``_seed_losses``), the table's other losses a ``SkyRLPolicyLoss``."""

    _skyrl_defaults = SEED_LOSS_NAMES
    _presummed = False

    @classmethod
    def _adapt(cls, table: AlgorithmTable, name: str) -> Callable:
        return SEED_LOSSES.get(name) or SkyRLPolicyLoss(table, name)


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


def freeze(base: AlgorithmTable = DEFAULT_TABLE, *, replace: bool = False) -> AlgorithmTable:
    """One ``AlgorithmTable``: ``base`` plus every façade registration, as native functions.

    Built-ins unregistered through the façade are removed (when ``base`` has them), built-ins
    shadowed by a user registration (see ``BaseFunctionRegistry``) are replaced; user
    estimators are wrapped in ``NativeFromSkyRL``, user losses in ``NativeFromSkyRLLoss`` (SkyRL
    0.3.0 registrations with ``presummed=True``, seed-era ones without; both registries' names
    share the table, so one name in both raises)
    (module-level classes holding the user function, so the table pickles as long as the
    functions do). The façade itself is not changed.

    Raises:
        ValueError: a registration clashes with a name already in ``base`` (pass ``replace=True``
            to let the registration win).
    """
    table = base
    for registry in (AdvantageEstimatorRegistry, PolicyLossRegistry, SeedPolicyLossRegistry):
        kind = registry._kind
        for name in sorted(registry._hidden):
            if (kind, name) in table:
                table = table.unregister(kind, name)
        for name, fn in registry._functions.items():
            if kind == "advantage_estimator":
                native = NativeFromSkyRL(name, fn)
            else:
                native = NativeFromSkyRLLoss(name, fn, presummed=registry._presummed)
            table = table.register(name, native, kind=kind, replace=replace or registry._shadows(name))
    return table


def sync_registries() -> AlgorithmTable:
    """Kept so SkyRL-Train code runs; returns ``freeze()``.

    SkyRL-Train copies registrations into a named Ray actor here. In skyrl_fn the frozen table
    travels with every Ray task as an argument, so there is nothing to sync: this only checks that
    every registration pickles with cloudpickle. Works whether or not Ray is initialised.

    Raises:
        TypeError: a registered function cannot be pickled (the message names it).
    """
    PolicyLossRegistry.sync_with_actor()
    SeedPolicyLossRegistry.sync_with_actor()
    AdvantageEstimatorRegistry.sync_with_actor()
    return freeze()


def repopulate_all_registries() -> None:
    """Bring back unregistered built-ins in both registries (SkyRL-Train's name)."""
    PolicyLossRegistry.repopulate_registry()
    SeedPolicyLossRegistry.repopulate_registry()
    AdvantageEstimatorRegistry.repopulate_registry()


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


def register_seed_policy_loss(name: str | enum.Enum, loss: Callable | None = None) -> Callable:
    """The seed era's ``register_policy_loss`` (into ``SeedPolicyLossRegistry``); as a decorator or
    ``register_seed_policy_loss(name, fn)``."""
    if loss is not None:
        SeedPolicyLossRegistry.register(name, loss)
        return loss
    return _decorator(SeedPolicyLossRegistry, name)
