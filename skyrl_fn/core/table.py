"""The frozen algorithm table: names -> pure functions, by kind.

``AlgorithmTable`` is an immutable value. ``register`` and ``unregister`` return a *new* table;
nothing is ever changed in place, so a table can be passed to Ray workers as an argument and every
worker sees exactly what the driver resolved. ``DEFAULT_TABLE`` (``skyrl_fn.algorithm.builtins``, above the
estimators and losses it registers) holds every built-in.

Kinds and the call each kind's functions must accept (positional inputs, then keyword-only
hyperparameters, every one with a default):

====================  ==========================================  =============================
kind                  call                                        returns
====================  ==========================================  =============================
advantage_estimator   ``fn(batch: AdvantageInput, **hyper)``      ``AdvantageOutput``
policy_loss           ``fn(batch: PolicyLossInput, **hyper)``     ``PolicyLossOutput``
kl_estimator          ``fn(log_probs, ref_log_probs, **hyper)``   ``[B, T]`` tensor
aggregation           ``fn(token_loss, loss_mask, **hyper)``      ``[]`` scalar tensor
task                  ``fn(data, **hyper)``                       a ``Task``
reward                ``fn(response, example, **hyper)``          ``float``
rollout_backend       ``fn(model, tokenizer, rollout, **opts)``   a ``RolloutBackend``
off_policy_correction ``fn(batch: PolicyLossInput, **hyper)``     ``OffPolicyCorrection``
batch_transform       ``fn(batch: SampleBatch, **hyper)``         ``SampleBatch``
====================  ==========================================  =============================

The first four are the algorithm pieces (``DEFAULT_TABLE`` holds their built-ins); an
``off_policy_correction`` shares the policy loss's input record, so its kind is never inferred
from the annotation: register it with ``kind="off_policy_correction"``. The task, reward and
rollout backend kinds plug the training run: ``data`` is the run's data config group, ``example``
a task's example, ``rollout`` the rollout config group; the training stack registers its built-in
tasks, rewards and backends on top of ``DEFAULT_TABLE`` (``skyrl_fn.trainer.run_table``), and a
plugin adds its own the same way, so ``--data.task mine`` works like
``--algorithm.advantage-estimator mine``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from typing import Any, Callable, Iterable, Mapping

import attrs

from skyrl_fn.core.properties import check_promises
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput, PolicyLossInput
from skyrl_fn.core.requires import check_inputs, requirements

__all__ = [
    "KINDS",
    "Entry",
    "AlgorithmTable",
    "UnknownNameError",
    "infer_kind",
    "HyperValue",
]

#: A hyperparameter value as a command line can give it (``--algorithm.loss.x 1`` or KEY VALUE pairs).
HyperValue = float | int | bool | str

#: kind -> number of positional inputs the function takes.
KINDS: Mapping[str, int] = {
    "advantage_estimator": 1,
    "policy_loss": 1,
    "kl_estimator": 2,
    "aggregation": 2,
    "task": 1,
    "reward": 2,
    "rollout_backend": 3,
    "off_policy_correction": 1,
    "batch_transform": 1,
}
_RECORD_KIND = {AdvantageInput: "advantage_estimator", PolicyLossInput: "policy_loss"}


class UnknownNameError(KeyError, ValueError):
    """An unknown name was looked up. Subclasses KeyError (a lookup) and ValueError (bad input)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


def closest(name: str, names: Iterable[str]) -> str | None:
    """The registered name closest to ``name`` (case-insensitive first), or None."""
    names = list(names)
    lowered = {n.lower().replace("-", "_"): n for n in names}
    key = name.lower().replace("-", "_")
    if key in lowered:
        return lowered[key]
    match = difflib.get_close_matches(key, list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def unknown_name_message(what: str, name: str, names: Iterable[str]) -> str:
    """``unknown <what> 'x'; did you mean 'y'? Available: [...]``."""
    names = sorted(names)
    guess = closest(name, names)
    hint = f"; did you mean {guess!r}?" if guess is not None else ""
    return f"unknown {what} {name!r}{hint} Available: {names}"


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return None


def infer_kind(fn: Callable) -> str | None:
    """The kind declared by ``fn``: a ``__skyrl_kind__`` attribute, or its first parameter's
    annotation (``AdvantageInput`` or ``PolicyLossInput``). None when it declares nothing."""
    kind = getattr(fn, "__skyrl_kind__", None)
    if kind is not None:
        return kind
    if isinstance(fn, functools.partial) and not fn.args:
        return infer_kind(fn.func)
    sig = _signature(fn)
    if sig is None or not sig.parameters:
        return None
    first = next(iter(sig.parameters.values()))
    ann = first.annotation
    if isinstance(ann, str):
        try:
            target = fn.__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else fn
            ann = typing.get_type_hints(target).get(first.name, ann)
        except Exception:  # unresolvable forward refs: compare by name
            return {"AdvantageInput": "advantage_estimator", "PolicyLossInput": "policy_loss"}.get(ann.split(".")[-1])
    return _RECORD_KIND.get(ann)


def check_signature(kind: str, name: str, fn: Callable) -> None:
    """Raise TypeError unless ``fn`` can be called as ``fn(*inputs)`` for ``kind``, with every
    other parameter keyword-usable and defaulted."""
    if not callable(fn):
        raise TypeError(f"{kind} {name!r}: expected a callable, got {type(fn).__name__}")
    sig = _signature(fn)
    if sig is None:
        return
    n = KINDS[kind]
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    if len(positional) < n and not has_varargs:
        raise TypeError(
            f"{kind} {name!r}: expected a function taking {n} positional input(s) "
            f"({_CALLS[kind]}), got signature {sig}"
        )
    for p in positional[n:]:
        if p.default is p.empty:
            raise TypeError(
                f"{kind} {name!r}: parameter {p.name!r} has no default; hyperparameters must have "
                f"defaults (expected {_CALLS[kind]}), got signature {sig}"
            )
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY and p.default is p.empty:
            raise TypeError(
                f"{kind} {name!r}: keyword-only parameter {p.name!r} has no default; hyperparameters "
                f"must have defaults, got signature {sig}"
            )


_CALLS = {
    "advantage_estimator": "fn(batch: AdvantageInput, **hyper) -> AdvantageOutput",
    "policy_loss": "fn(batch: PolicyLossInput, **hyper) -> PolicyLossOutput",
    "kl_estimator": "fn(log_probs, ref_log_probs, **hyper) -> [B, T] tensor",
    "aggregation": "fn(token_loss, loss_mask, **hyper) -> scalar tensor",
    "task": "fn(data: DataConfig, **hyper) -> Task",
    "reward": "fn(response: str, example: Example, **hyper) -> float",
    "rollout_backend": "fn(model, tokenizer, rollout: RolloutConfig, *, seed=0, colocated=True) -> RolloutBackend",
    "off_policy_correction": "fn(batch: PolicyLossInput, **hyper) -> OffPolicyCorrection",
    "batch_transform": "fn(batch: SampleBatch, **hyper) -> SampleBatch",
}


def hyperparameters(fn: Callable, kind: str) -> Mapping[str, Any] | None:
    """Name -> default of the hyperparameters ``fn`` accepts; None if it takes ``**kwargs``.

    Keywords fixed by a ``functools.partial`` are part of the entry's identity, not
    hyperparameters: ``dr_grpo = partial(grpo, norm_by_std=False)`` does not accept
    ``norm_by_std``, so a config's ``norm_by_std=True`` can never turn it back into GRPO.
    """
    sig = _signature(fn)
    if sig is None or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    fixed = fn.keywords if isinstance(fn, functools.partial) else {}
    params = list(sig.parameters.values())
    n = KINDS[kind]
    out = {}
    for i, p in enumerate(params):
        if p.kind == p.VAR_POSITIONAL or (i < n and p.kind != p.KEYWORD_ONLY) or p.name in fixed:
            continue
        out[p.name] = p.default
    return out


@attrs.frozen(kw_only=True)
class Entry:
    """One registered function.

    Attributes:
        kind: one of ``KINDS``.
        name: the registered name.
        fn: the pure function.
        promises: invariants it promises (names from ``skyrl_fn.core.properties``) that the testing kit
            checks on top of the universal ones.
        requires: the optional inputs it reads (``skyrl_fn.core.requires.INPUTS``: ``values`` means
            a critic, ``ref_log_probs`` a reference model), from the function itself (through
            partials and chains) plus what ``register(requires=...)`` added.
    """

    kind: str
    name: str
    fn: Callable = attrs.field(eq=False)
    promises: frozenset[str] = frozenset()
    requires: frozenset[str] = frozenset()

    def hyperparameters(self) -> Mapping[str, Any] | None:
        """Name -> default of the accepted hyperparameters; None if the function takes ``**kwargs``."""
        return hyperparameters(self.fn, self.kind)


@attrs.frozen(eq=False)
class AlgorithmTable:
    """An immutable table of named algorithm pieces.

    Build new tables with :meth:`register`; look up with :meth:`get` / :meth:`estimator` /
    :meth:`policy_loss`. Lookups of unknown names raise :class:`UnknownNameError` listing the
    available names and the closest one.
    """

    _entries: dict[tuple[str, str], Entry] = attrs.field(factory=dict, alias="entries")

    # -- building ---------------------------------------------------------------------------
    def register(
        self,
        name: str,
        fn: Callable,
        *,
        kind: str | None = None,
        replace: bool = False,
        promises: Iterable[str] = (),
        requires: Iterable[str] = (),
    ) -> "AlgorithmTable":
        """Return a new table with ``fn`` registered as ``name``.

        Args:
            name: a non-empty name without whitespace.
            fn: the function; its signature is checked against ``kind`` now, not at first call.
            kind: one of ``KINDS``. Inferred when omitted from ``fn.__skyrl_kind__`` or the
                annotation of its first parameter (``AdvantageInput`` / ``PolicyLossInput``).
            replace: allow replacing an existing entry of the same kind and name.
            promises: invariants (``skyrl_fn.core.properties``) the testing kit should check.
            requires: optional inputs ``fn`` reads that it does not declare itself with
                ``skyrl_fn.core.requires.requires`` (e.g. ``("values",)`` for a wrapped critic-based
                estimator); joined with what it declares.

        Raises:
            ValueError: empty/whitespace name, duplicate name without ``replace=True``, unknown
                kind, promise or needed input, or a kind that cannot be inferred.
            TypeError: ``fn`` is not callable or cannot take the kind's inputs.
        """
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"name: expected a non-empty string without whitespace, got {name!r}")
        if kind is None:
            kind = infer_kind(fn)
            if kind is None:
                raise ValueError(
                    f"kind for {name!r}: could not infer it from the function; pass kind= one of "
                    f"{sorted(KINDS)} or annotate the first parameter as AdvantageInput/PolicyLossInput"
                )
        if kind not in KINDS:
            raise ValueError(unknown_name_message("kind", kind, KINDS))
        check_signature(kind, name, fn)
        key = (kind, name)
        if key in self._entries and not replace:
            raise ValueError(f"{kind} {name!r} is already registered; pass replace=True to replace it")
        entries = dict(self._entries)
        needs = check_inputs(requires) | requirements(fn)
        entries[key] = Entry(kind=kind, name=name, fn=fn, promises=check_promises(name, promises), requires=needs)
        return AlgorithmTable(entries=entries)

    def unregister(self, kind: str, name: str) -> "AlgorithmTable":
        """Return a new table without ``name``; raises UnknownNameError if it is not there."""
        self.entry(kind, name)
        entries = {k: v for k, v in self._entries.items() if k != (kind, name)}
        return AlgorithmTable(entries=entries)

    def merge(self, other: "AlgorithmTable", *, replace: bool = False) -> "AlgorithmTable":
        """Return a new table with every entry of ``other`` added (duplicates need ``replace``)."""
        table = self
        for e in other.entries():
            table = table.register(e.name, e.fn, kind=e.kind, replace=replace, promises=e.promises, requires=e.requires)
        return table

    # -- lookup -----------------------------------------------------------------------------
    def entry(self, kind: str, name: str) -> Entry:
        """The entry for ``name``; raises UnknownNameError with the closest registered name."""
        if kind not in KINDS:
            raise UnknownNameError(unknown_name_message("kind", kind, KINDS))
        try:
            return self._entries[(kind, name)]
        except KeyError:
            raise UnknownNameError(unknown_name_message(kind.replace("_", " "), name, self.names(kind))) from None

    def get(self, kind: str, name: str) -> Callable:
        """The function registered as ``name`` of ``kind``."""
        return self.entry(kind, name).fn

    def estimator(self, name: str) -> Callable:
        """The advantage estimator registered as ``name``."""
        return self.get("advantage_estimator", name)

    def policy_loss(self, name: str) -> Callable:
        """The policy loss registered as ``name``."""
        return self.get("policy_loss", name)

    def names(self, kind: str) -> tuple[str, ...]:
        """Sorted names registered under ``kind``."""
        return tuple(sorted(n for k, n in self._entries if k == kind))

    def entries(self) -> tuple[Entry, ...]:
        """Every entry, sorted by kind then name."""
        return tuple(self._entries[k] for k in sorted(self._entries))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(self.names(k))}" for k in KINDS)
        return f"AlgorithmTable({counts})"

    # -- checked calls --------------------------------------------------------------------------
    def check_hyperparameters(self, kind: str, name: str, hyper: Mapping[str, Any]) -> None:
        """Raise ValueError if ``hyper`` names a hyperparameter the function does not accept."""
        entry = self.entry(kind, name)  # an unknown name fails here, with or without ``hyper``
        if not hyper:
            return  # nothing to check: the signature is not read
        accepted = entry.hyperparameters()
        if accepted is None:
            return
        for key in hyper:
            if key not in accepted:
                raise ValueError(
                    f"{kind} {name!r}: {unknown_name_message('hyperparameter', key, accepted)}"
                )

    def compute_advantages(self, name: str, batch: AdvantageInput, **hyper: Any) -> AdvantageOutput:
        """Run the estimator ``name`` on ``batch`` and check its output.

        The output must be an ``AdvantageOutput`` of shape ``[B, T]`` in the rewards' dtype,
        finite, and zero wherever the response mask is 0; otherwise a ValueError/TypeError names
        the estimator.
        """
        if not isinstance(batch, AdvantageInput):
            raise TypeError(f"batch: expected an AdvantageInput, got {type(batch).__name__}")
        self.check_hyperparameters("advantage_estimator", name, hyper)
        out = self.estimator(name)(batch, **hyper)
        if not isinstance(out, AdvantageOutput):
            raise TypeError(f"advantage estimator {name!r}: expected it to return an AdvantageOutput, got {type(out).__name__}")
        return out.check_against(batch, name=f"advantage estimator {name!r}")
