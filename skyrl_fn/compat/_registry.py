"""SkyRL-Train's registries, decorators and ``sync_registries``, over the frozen table.

The registries below (advantage estimators; SkyRL 0.3.0's and the seed era's policy losses) are
the only mutable global state of the library. They hold only what
users register; the built-ins are read from ``DEFAULT_TABLE`` on lookup. ``freeze()`` turns them
into one ``AlgorithmTable``, the value that Ray tasks receive as an argument.

On Ray, every task and actor of the job sees the driver's registrations too: the driver publishes
``freeze()`` as an immutable snapshot whenever its registrations change while Ray is initialised
and on ``sync_registries()``, and a worker answers a lookup it cannot answer itself from the
latest snapshot (see ``skyrl_fn.compat._snapshot``). Workers never write to it.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any, Callable, ClassVar

import cloudpickle

from skyrl_fn.compat._advantages import AdvantageEstimator, NativeFromSkyRL, SkyRLCallable
from skyrl_fn.compat._calls import as_name, describe
from skyrl_fn.compat._losses import NativeFromSkyRLLoss, SkyRLPolicyLoss, SkyRLSumPolicyLoss
from skyrl_fn.compat._policy_losses import SKYRL_LOSSES, PolicyLossType
from skyrl_fn.compat._seed_losses import SEED_LOSS_NAMES, SEED_LOSSES
from skyrl_fn.compat._snapshot import RegistrySnapshot, latest, publish, published_in_this_session, ray_role
from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import KINDS, AlgorithmTable, UnknownNameError, infer_kind, unknown_name_message

__all__ = [
    "AdvantageEstimatorRegistry",
    "PolicyLossRegistry",
    "SeedPolicyLossRegistry",
    "PolicyLossType",
    "sync_registries",
    "repopulate_all_registries",
    "freeze",
]


class BaseFunctionRegistry:
    """SkyRL-Train's registry interface (class methods on a per-kind class).

    Lookup order: user registrations, then the built-ins of ``DEFAULT_TABLE`` (which
    ``unregister`` can hide, as SkyRL lets you unregister a default). Built-ins are returned as
    SkyRL-style callables (``SkyRLCallable`` / ``SkyRLPolicyLoss``); user functions as registered.

    Inside a Ray task or actor, a name the worker did not register itself is looked up in the
    driver's latest published snapshot (its registrations, hidden and shadowed built-ins included),
    and ``list_available`` lists the snapshot's names; without a snapshot the worker has the
    built-ins. On the driver, registering or unregistering while Ray is initialised publishes a
    new snapshot, so a registration must pickle with cloudpickle then (else TypeError, and the
    registration is undone); registrations made before ``ray.init()`` are published by
    ``sync_registries()`` or at the driver's next lookup.

    Registering a built-in's name raises ValueError only for SkyRL-Train's own defaults
    (``_skyrl_defaults``). skyrl_fn has more built-ins (e.g. the ``reinforce`` policy loss), and
    SkyRL code may register those names for its own functions: the user function then shadows the
    built-in, in ``get`` and in ``freeze()``, until it is unregistered.
    """

    _kind: ClassVar[str] = ""
    #: Key of this registry's names in a published snapshot (default: the kind).
    _names_key: ClassVar[str] = ""
    _function_type: ClassVar[str] = "function"
    _wrapper: ClassVar[type] = object
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
    def _lookup_snapshot(cls) -> RegistrySnapshot | None:
        """The driver's latest snapshot in a Ray worker, None elsewhere; on the driver, first
        publish registrations not yet published in this Ray session (made before ``ray.init()``)."""
        role = ray_role()
        if role == "driver" and _generation and not published_in_this_session(_generation):
            _publish()
        return latest() if role == "worker" else None

    @classmethod
    def _local_available(cls) -> list[str]:
        return list(cls._builtins()) + [n for n in cls._functions if n not in cls._builtins()]

    @classmethod
    def _available(cls, snapshot: RegistrySnapshot | None) -> list[str]:
        if snapshot is None:
            return cls._local_available()
        names = [n for n in snapshot.names.get(cls._names_key or cls._kind, ()) if n not in cls._hidden]
        return names + [n for n in cls._functions if n not in names]

    @classmethod
    def _from_snapshot(cls, snapshot: RegistrySnapshot, key: str) -> Callable:
        if key in cls._hidden or (cls._kind, key) not in snapshot.table:
            raise UnknownNameError(unknown_name_message(cls._function_type, str(key), cls._available(snapshot)))
        fn = snapshot.table.get(cls._kind, key)
        return fn.fn if isinstance(fn, cls._wrapper) else cls._adapt(snapshot.table, key)

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
        try:
            _changed()
        except (TypeError, ValueError):  # it cannot be published (does not pickle, clashes): not registered
            del cls._functions[name]
            raise

    @classmethod
    def get(cls, name: str | enum.Enum) -> Callable:
        """The function registered as ``name``.

        Raises:
            UnknownNameError: (a KeyError and a ValueError) listing the available names and the
                closest one.
        """
        key = name.value if isinstance(name, enum.Enum) else name
        if key in cls._functions:
            if ray_role() == "driver":
                cls._lookup_snapshot()
            return cls._functions[key]
        snapshot = cls._lookup_snapshot()
        if snapshot is not None:
            return cls._from_snapshot(snapshot, key)
        if key in cls._builtins():
            return cls._adapt(DEFAULT_TABLE, key)
        message = unknown_name_message(cls._function_type, str(key), cls._local_available())
        raise UnknownNameError("U" + message[1:])  # SkyRL's wording: "Unknown advantage estimator 'x'"

    @classmethod
    def list_available(cls) -> list[str]:
        """Every name ``get`` accepts: the built-ins (sorted), then user registrations in order
        (in a Ray worker: the driver's list, then the worker's own registrations)."""
        return cls._available(cls._lookup_snapshot())

    @classmethod
    def unregister(cls, name: str | enum.Enum) -> None:
        """Remove ``name`` (a user registration, else hide the built-in); UnknownNameError if absent."""
        key = as_name(name)
        if key in cls._functions:
            del cls._functions[key]
        elif key in cls._builtins() or key in cls.list_available():  # (a worker hides a driver's name locally)
            cls._hidden.add(key)
        else:
            raise UnknownNameError(
                f"{cls._function_type} {key!r} not registered; "
                + unknown_name_message(cls._function_type, key, cls.list_available())
            )
        _changed()

    @classmethod
    def reset(cls) -> None:
        """Forget every user registration and bring back every built-in (for tests)."""
        cls._functions.clear()
        cls._hidden.clear()
        _changed()

    @classmethod
    def repopulate_registry(cls) -> None:
        """Bring back unregistered built-ins whose name no user function took since."""
        cls._hidden = {n for n in cls._hidden if n in cls._functions}
        _changed()

    @classmethod
    def sync_with_actor(cls) -> None:
        """Check that every registration pickles; on a Ray driver, publish (see ``sync_registries``)."""
        cls._check_pickles()
        if ray_role() == "driver":
            _publish()

    @classmethod
    def _check_pickles(cls) -> None:
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
    _wrapper = NativeFromSkyRL

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
    _wrapper = NativeFromSkyRLLoss

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
    _names_key = "policy_loss (skyrl_train)"

    @classmethod
    def _adapt(cls, table: AlgorithmTable, name: str) -> Callable:
        return SEED_LOSSES.get(name) or SkyRLPolicyLoss(table, name)


_REGISTRIES: tuple[type[BaseFunctionRegistry], ...] = (AdvantageEstimatorRegistry, PolicyLossRegistry, SeedPolicyLossRegistry)
#: Counts changes to the registrations (any registry); the driver publishes each count once per Ray session.
_generation = 0


def _changed() -> None:
    """Note a change to the registrations; on a Ray driver, publish it now."""
    global _generation
    _generation += 1
    if ray_role() == "driver":
        _publish()


def _publish() -> None:
    """Publish the driver's registrations (checked to pickle first, naming the culprit)."""
    for registry in _REGISTRIES:
        registry._check_pickles()
    names = {registry._names_key or registry._kind: tuple(registry._local_available()) for registry in _REGISTRIES}
    publish(RegistrySnapshot(table=freeze(base=DEFAULT_TABLE), names=names), _generation)


def freeze(base: AlgorithmTable | None = None, *, replace: bool = False) -> AlgorithmTable:
    """One ``AlgorithmTable``: ``base`` plus every façade registration, as native functions.

    ``base`` defaults to ``DEFAULT_TABLE``; in a Ray worker, to the driver's latest published
    snapshot when there is one (the worker's own registrations then replace the snapshot's entries
    of the same name, as in ``get``). Built-ins unregistered through the façade are removed (when
    ``base`` has them), built-ins shadowed by a user registration (see ``BaseFunctionRegistry``)
    are replaced; user estimators are wrapped in ``NativeFromSkyRL``, user losses in
    ``NativeFromSkyRLLoss`` (SkyRL 0.3.0 registrations with ``presummed=True``, seed-era ones
    without; both eras' names share the table, so one name in both raises), module-level classes
    holding the user function, so the table pickles as long as the functions do. The façade
    itself is not changed.

    Raises:
        ValueError: a registration clashes with a name already in ``base`` (pass ``replace=True``
            to let the registration win).
    """
    snapshot = latest() if base is None and ray_role() == "worker" else None
    table = base if base is not None else (snapshot.table if snapshot is not None else DEFAULT_TABLE)
    for registry in _REGISTRIES:
        kind = registry._kind
        for name in sorted(registry._hidden):
            if (kind, name) in table:
                table = table.unregister(kind, name)
        for name, fn in registry._functions.items():
            wins = replace or registry._shadows(name) or (snapshot is not None and (kind, name) in snapshot.table)
            if kind == "advantage_estimator":
                native = NativeFromSkyRL(name, fn)
            else:
                native = NativeFromSkyRLLoss(name, fn, presummed=registry._presummed)
            table = table.register(name, native, kind=kind, replace=wins)
    return table


def sync_registries() -> AlgorithmTable:
    """Make the registrations visible to every Ray task and actor of the job; returns ``freeze()``.

    Checks that every registration pickles with cloudpickle. On a Ray driver it then publishes
    them (SkyRL-Train copies them into a named actor here; see ``skyrl_fn.compat._snapshot``), so
    ``AdvantageEstimatorRegistry.get(name)`` and ``list_available()`` work inside ``@ray.remote``
    functions. Call it after ``ray.init()``; later registrations on the driver are published as
    they happen. Without Ray (or in a worker) it publishes nothing. The returned table can also be
    passed to Ray tasks as an argument.

    Raises:
        TypeError: a registered function cannot be pickled (the message names it).
    """
    for registry in _REGISTRIES:
        registry._check_pickles()
    if ray_role() == "driver":
        _publish()
    return freeze()


def repopulate_all_registries() -> None:
    """Bring back unregistered built-ins in both registries (SkyRL-Train's name)."""
    PolicyLossRegistry.repopulate_registry()
    SeedPolicyLossRegistry.repopulate_registry()
    AdvantageEstimatorRegistry.repopulate_registry()
