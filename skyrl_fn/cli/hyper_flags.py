"""Typed command-line flags for the hyperparameters of the functions a run chooses.

Each name field of ``AlgorithmConfig`` has a hyperparameter mapping (``advantage_estimator`` ->
``estimator``, ``policy_loss`` -> ``loss``, ...; ``skyrl_fn.trainer.config.HYPER_FIELDS``). On the
command line that mapping becomes a group of typed flags built from the signature of the
function chosen by name, e.g. ``--algorithm.policy-loss sapo`` gives ``--algorithm.loss.tau-pos
FLOAT`` and ``--algorithm.loss.tau-neg FLOAT`` with the function's defaults and the help of its
docstring's ``Args:`` entries. Which function is chosen is read from the arguments before parsing
(:func:`chosen_names`), so ``--help`` lists exactly the chosen functions' hyperparameters.

A function that takes ``**kwargs`` (or whose name is not registered yet) keeps the untyped form
``--algorithm.loss KEY VALUE ...``; resolution checks it. A flag of the group that the chosen
function does not take is an error naming it (:func:`check_group_flags`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

import tyro

from skyrl_fn.algorithm import entry_hyperparameters
from skyrl_fn.core.compose import Chain
from skyrl_fn.core.table import AlgorithmTable, Entry, UnknownNameError
from skyrl_fn.trainer.config import HYPER_FIELDS, HyperValue

__all__ = ["chosen_names", "hyper_class", "to_mapping", "check_group_flags", "flag"]

_SIMPLE = (bool, int, float, str, type(None))


def flag(field: str) -> str:
    """``--algorithm.<field>`` as tyro spells it (hyphens)."""
    return "--algorithm." + field.replace("_", "-")


def chosen_names(argv: Sequence[str], defaults: Mapping[str, str]) -> dict[str, str]:
    """Name field -> the name ``argv`` chooses (the last one given), else ``defaults``'s."""
    out = dict(defaults)
    for i, arg in enumerate(argv):
        for field in HYPER_FIELDS:
            for spelling in (flag(field), "--algorithm." + field):
                if arg == spelling and i + 1 < len(argv):
                    out[field] = argv[i + 1]
                elif arg.startswith(spelling + "="):
                    out[field] = arg.split("=", 1)[1]
    return out


def _target(fn: Callable) -> Callable:
    """The function whose annotations and docstring describe ``fn``'s hyperparameters."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, Chain):
            fn = fn.estimator
        else:
            return fn


def _flag_type(annotation: Any) -> bool:
    """True for the types a flag can carry: bool, int, float, str, Literal, and unions of them."""
    if annotation in _SIMPLE:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return all(_flag_type(a) for a in typing.get_args(annotation))
    return False


def _arg_help(doc: str, name: str) -> str:
    """The text of ``name``'s entry in a Google-style ``Args:`` section (first paragraph)."""
    m = re.search(rf"^\s*{re.escape(name)}(?:\s*\([^)]*\))?\s*:\s*(.+(?:\n(?!\s*\w+(?:\s*\([^)]*\))?\s*:)\s+.+)*)", doc, re.M)
    return " ".join(m.group(1).split()) if m else ""


def hyper_class(entry: Entry, base: Mapping[str, Any]) -> type | None:
    """A frozen dataclass with one typed field per hyperparameter of ``entry`` (default: ``base``'s
    value, else the function's own); None when the function takes ``**kwargs``.

    Hyperparameters whose annotation no flag can carry (tensors, callables) are left out; they
    can still be set from Python (``AlgorithmConfig(loss={...})``).
    """
    accepted = entry_hyperparameters(entry)
    if accepted is None:
        return None
    target = _target(entry.fn)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    doc = inspect.getdoc(target) or ""
    where = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', entry.name)}"
    fields = []
    for name, default in accepted.items():
        annotation = hints.get(name, type(default))
        if not _flag_type(annotation):
            continue
        value = base.get(name, default)
        text = _arg_help(doc, name) or f"{name} of {where} (see its docstring)."
        fields.append((name, Annotated[annotation, tyro.conf.arg(help=text)], dataclasses.field(default=value)))
    what = entry.kind.replace("_", " ")
    ident = re.sub(r"\W", "_", entry.name)
    cls = dataclasses.make_dataclass(f"{entry.kind}_{ident}", fields, frozen=True)
    cls.__doc__ = f"Hyperparameters of {what} {entry.name!r} (defaults: the function's own)."
    return cls


def group_type(table: AlgorithmTable, field: str, name: str, base: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(type, default)`` of the hyperparameter group of name field ``field`` choosing ``name``."""
    _, kind = HYPER_FIELDS[field]
    try:
        cls = hyper_class(table.entry(kind, name), base)
    except UnknownNameError:  # resolution reports it, with the closest name
        cls = None
    if cls is None:
        return dict[str, HyperValue], dict(base)
    return cls, cls()


def to_mapping(value: Any, table: AlgorithmTable, field: str, name: str) -> dict[str, Any]:
    """The parsed group as the config's mapping: only values that differ from the function's own
    defaults (so a later change of a function's default is not hidden by a copy of the old one)."""
    if not dataclasses.is_dataclass(value):
        return dict(value)
    defaults = entry_hyperparameters(table.entry(HYPER_FIELDS[field][1], name)) or {}
    out = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if f.name not in defaults or v != defaults[f.name] or type(v) is not type(defaults[f.name]):
            out[f.name] = v
    return out


def check_group_flags(argv: Sequence[str], table: AlgorithmTable, names: Mapping[str, str]) -> None:
    """Raise ValueError for a ``--algorithm.<group>.<x>`` flag the chosen function does not take,
    naming the flag, the function and what it takes."""
    for field, (group, kind) in HYPER_FIELDS.items():
        prefix = flag(group) + "."
        try:
            cls = hyper_class(table.entry(kind, names[field]), {})
        except UnknownNameError:
            continue
        if cls is None:
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        for arg in argv:
            if not arg.startswith(prefix):
                continue
            key = arg[len(prefix):].split("=", 1)[0].replace("-", "_")
            if key not in known:
                takes = ", ".join(sorted(known)) or "none"
                raise ValueError(
                    f"{arg.split('=', 1)[0]}: {kind.replace('_', ' ')} {names[field]!r} takes no hyperparameter "
                    f"{key!r} (it takes: {takes})"
                )
