"""What a function reads beyond the fields every record has: declared once, on the function.

A training run builds models only for what its pieces read: a critic when the advantage
estimator reads ``AdvantageInput.values`` (GAE), a reference model when a policy loss reads
``PolicyLossInput.ref_log_probs``. The fact is declared on the function with :func:`requires`
and read back with :func:`requirements`, which looks through ``functools.partial`` and through
any object that defines ``__skyrl_requires__`` itself (``skyrl_fn.core.compose.Chain`` unions its
pieces'), so ``chain(gae, clip_advantages(1.0))`` registered under a new name still needs a
critic. ``AlgorithmTable.register`` stores the result on the ``Entry``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, TypeVar

__all__ = [
    "INPUTS", "EXTRAS_PREFIX", "check_inputs", "requires", "requirements", "declaration", "extras_required", "fields_needed", "missing_fields",
]

#: The optional inputs a piece can require: critic values (``AdvantageInput.values``, so a run
#: builds a critic), baseline rewards (``AdvantageInput.reward_baselines``: ReMax's greedy sample),
#: reference log-probs (``PolicyLossInput.ref_log_probs``, so a run builds a reference model) and
#: rollout log-probs (``PolicyLossInput.rollout_log_probs``) and a teacher's log-probs of the
#: sampled tokens (on-policy distillation, so a run must name ``teacher.model``).
INPUTS = frozenset({"values", "reward_baselines", "ref_log_probs", "rollout_log_probs", "teacher_log_probs"})
#: How a per-sample field is named in a requirement: ``"extras.<key>"`` (the key of ``extras``).
EXTRAS_PREFIX = "extras."

F = TypeVar("F", bound=Callable)


def check_inputs(inputs) -> frozenset[str]:
    """``inputs`` as a frozenset; raises ValueError naming any not in :data:`INPUTS`."""
    if isinstance(inputs, str):
        raise TypeError(f"requires: expected a collection of input names, got the string {inputs!r}")
    out = frozenset(inputs)
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"requires: expected input names (str), got {name!r}")
    unknown = sorted(n for n in out if n not in INPUTS and not _is_field(n))
    if unknown:
        raise ValueError(
            f"requires: expected inputs from {sorted(INPUTS)} or per-sample fields '{EXTRAS_PREFIX}<key>', got {unknown}"
        )
    return out


def _is_field(name: str) -> bool:
    key = name[len(EXTRAS_PREFIX):]
    return name.startswith(EXTRAS_PREFIX) and bool(key) and not any(c.isspace() for c in key)


def extras_required(fn_or_requires) -> frozenset[str]:
    """The ``extras`` keys a function (or a set of requirements, e.g. ``Entry.requires``) reads."""
    needs = fn_or_requires if isinstance(fn_or_requires, (set, frozenset)) else requirements(fn_or_requires)
    return frozenset(n[len(EXTRAS_PREFIX):] for n in needs if _is_field(n))


def _fields_from(fn: Callable) -> tuple[str, ...]:
    """Hyperparameter names declared with ``requires(fields_from=...)`` on ``fn`` or, through
    partials and chains, on the function(s) it wraps."""
    out: list[str] = list(getattr(fn, "__skyrl_fields_from__", ()))
    if isinstance(fn, functools.partial):
        out += _fields_from(fn.func)
    estimator = getattr(fn, "estimator", None)  # a skyrl_fn.core.compose.Chain
    if callable(estimator):
        out += _fields_from(estimator)
    return tuple(dict.fromkeys(out))


def fields_needed(fn: Callable, hyper: Mapping[str, Any] | None = None) -> frozenset[str]:
    """The ``extras`` keys ``fn`` reads when called with the hyperparameters ``hyper``: the ones it
    declares (``"extras.<key>"``) plus the values of its ``fields_from`` hyperparameters (bound in
    ``hyper`` or fixed by a partial).

    Raises:
        TypeError: a ``fields_from`` hyperparameter bound to something else than a collection of
            strings.
    """
    out = set(extras_required(fn))
    fixed: dict[str, Any] = {}
    inner = fn
    while isinstance(inner, functools.partial):
        fixed = {**inner.keywords, **fixed}
        inner = inner.func
    values = {**fixed, **dict(hyper or {})}
    for name in _fields_from(fn):
        keys = values.get(name) or ()
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"{name}: expected a collection of extras keys (str), got {keys!r}")
        out |= set(keys)
    return frozenset(out)


def missing_fields(needs: Mapping[str, Any], available, *, source: str) -> None:
    """Raise if a piece needs a per-sample field that ``available`` does not hold.

    Args:
        needs: a label of each piece (e.g. ``"algorithm.advantage_estimator 'gdpo'"``) -> the
            ``extras`` keys it reads (:func:`fields_needed`).
        available: the per-sample field names the run produces.
        source: what produces which fields, completing the message (e.g. ``"the trainer provides
            ['old_log_probs']"``).

    Raises:
        ValueError: ``"<piece> reads extras.<key>, ...; <source>"``.
    """
    have = set(available)
    for label, keys in needs.items():
        missing = sorted(set(keys) - have)
        if missing:
            raise ValueError(f"{label} reads {', '.join(EXTRAS_PREFIX + k for k in missing)}; {source}")


def requires(*inputs: str, fields_from: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator: ``fn`` reads the optional ``inputs`` (names from :data:`INPUTS`, or per-sample
    fields ``"extras.<key>"``).

    Example::

        @requires("values")
        def gae(batch: AdvantageInput, *, gamma: float = 1.0, lambd: float = 1.0) -> AdvantageOutput: ...

    ``fields_from`` names hyperparameters whose value is a collection of ``extras`` keys the
    function reads (GDPO's ``reward_keys``): the fields it needs then depend on how it is bound
    (:func:`fields_needed`).

    Raises:
        ValueError: an input name not in :data:`INPUTS`.
    """
    declared = check_inputs(inputs)
    if isinstance(fields_from, str):
        raise TypeError(f"fields_from: expected a tuple of hyperparameter names, got the string {fields_from!r}")

    def mark(fn: F) -> F:
        fn.__skyrl_requires__ = declared
        if fields_from:
            fn.__skyrl_fields_from__ = tuple(fields_from)
        return fn

    return mark


def declaration(fn: Callable, attribute: str) -> Any:
    """What a decorator declared on ``fn`` as ``attribute`` (``__skyrl_requires__``, a task's
    ``__skyrl_provides__``), looking through ``functools.partial``: the outermost declaration
    wins; ``()`` when there is none."""
    while isinstance(fn, functools.partial):
        own = getattr(fn, attribute, None)
        if own is not None:
            return own
        fn = fn.func
    return getattr(fn, attribute, ())


def requirements(fn: Callable) -> frozenset[str]:
    """The optional inputs ``fn`` reads: its ``__skyrl_requires__``, looking through partials."""
    return check_inputs(declaration(fn, "__skyrl_requires__"))
