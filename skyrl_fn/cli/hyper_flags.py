"""Typed command-line flags for the hyperparameters of the functions a run chooses.

Each name field of ``AlgorithmConfig`` has a hyperparameter mapping (``advantage_estimator`` ->
``estimator``, ``policy_loss`` -> ``loss``, ...; ``skyrl_fn.trainer.config.HYPER_FIELDS``). On the
command line that mapping becomes a group of typed flags built from the signature of the
function chosen by name, e.g. ``--algorithm.policy-loss sapo`` gives ``--algorithm.loss.tau-pos
FLOAT`` and ``--algorithm.loss.tau-neg FLOAT`` with the function's defaults and the help of its
docstring's ``Args:`` entries. Which function is chosen is read from the arguments before parsing
(:func:`chosen_names`), so ``--help`` lists exactly the chosen functions' hyperparameters.

The data group works the same way for the task and the reward a run chooses
(``--data.task parity`` gives ``--data.task-args.length INT`` from the task factory's signature;
``skyrl_fn.trainer.config.DATA_HYPER_FIELDS``): every function takes a ``section`` argument,
``"algorithm"`` or ``"data"`` (:data:`SECTIONS`).
The off-policy corrections are a chain of names (``--algorithm.off-policy-correction tis geo_mask``)
with one typed group per chosen name (``--algorithm.correction.geo-mask.low 0.98``).

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
from skyrl_fn.trainer.config import DATA_HYPER_FIELDS, HYPER_FIELDS, HyperValue

__all__ = [
    "SECTIONS", "chosen_names", "hyper_class", "to_mapping", "check_group_flags", "flag",
    "chosen_corrections", "correction_group_type", "correction_mapping", "check_correction_flags",
]

#: Config section -> its name fields (name field -> (hyperparameter field, table kind)).
SECTIONS: Mapping[str, Mapping[str, tuple[str, str]]] = {"algorithm": HYPER_FIELDS, "data": DATA_HYPER_FIELDS}

_SIMPLE = (bool, int, float, str, type(None))


def flag(field: str, section: str = "algorithm") -> str:
    """``--<section>.<field>`` as tyro spells it (hyphens)."""
    return f"--{section}." + field.replace("_", "-")


def chosen_names(argv: Sequence[str], defaults: Mapping[str, str], section: str = "algorithm") -> dict[str, str]:
    """Name field -> the name ``argv`` chooses (the last one given), else ``defaults``'s."""
    out = dict(defaults)
    for i, arg in enumerate(argv):
        for field in SECTIONS[section]:
            for spelling in (flag(field, section), f"--{section}." + field):
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
    """True for the types a flag can carry: bool, int, float, str, Literal, variable-length tuples
    of those (``tuple[str, ...]``: ``--flag a b``), and unions of them."""
    if annotation in _SIMPLE:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return True
    if origin is tuple:
        args = typing.get_args(annotation)
        return len(args) == 2 and args[1] is Ellipsis and args[0] in _SIMPLE[:-1]
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


def group_type(
    table: AlgorithmTable, field: str, name: str, base: Mapping[str, Any], section: str = "algorithm"
) -> tuple[Any, Any]:
    """``(type, default)`` of the hyperparameter group of name field ``field`` choosing ``name``."""
    _, kind = SECTIONS[section][field]
    try:
        cls = hyper_class(table.entry(kind, name), base)
    except UnknownNameError:  # resolution reports it, with the closest name
        cls = None
    if cls is None:
        return dict[str, HyperValue], dict(base)
    return cls, cls()


def to_mapping(value: Any, table: AlgorithmTable, field: str, name: str, section: str = "algorithm") -> dict[str, Any]:
    """The parsed group as the config's mapping: only values that differ from the function's own
    defaults (so a later change of a function's default is not hidden by a copy of the old one)."""
    if not dataclasses.is_dataclass(value):
        return dict(value)
    defaults = entry_hyperparameters(table.entry(SECTIONS[section][field][1], name)) or {}
    out = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if f.name not in defaults or v != defaults[f.name] or type(v) is not type(defaults[f.name]):
            out[f.name] = v
    return out


def check_group_flags(
    argv: Sequence[str], table: AlgorithmTable, names: Mapping[str, str], section: str = "algorithm"
) -> None:
    """Raise ValueError for a ``--<section>.<group>.<x>`` flag the chosen function does not take,
    naming the flag, the function and what it takes."""
    for field, (group, kind) in SECTIONS[section].items():
        prefix = flag(group, section) + "."
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


# -- off-policy corrections: a chain of names, one typed group per chosen name -----------------

#: The ``AlgorithmConfig`` field naming the chain, its hyperparameter field, and the kind.
CORRECTION_FIELD, CORRECTION_GROUP, CORRECTION_KIND = "off_policy_correction", "correction", "off_policy_correction"


def chosen_corrections(argv: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    """The correction names ``argv`` chooses (``--algorithm.off-policy-correction A B ...``, the
    last occurrence wins), else ``default``."""
    out = tuple(default)
    spellings = (flag(CORRECTION_FIELD), "--algorithm." + CORRECTION_FIELD)
    for i, arg in enumerate(argv):
        if arg in spellings:
            names = []
            for nxt in argv[i + 1:]:
                if nxt.startswith("--"):
                    break
                names.append(nxt)
            out = tuple(names)
        elif arg.startswith(tuple(s + "=" for s in spellings)):
            out = (arg.split("=", 1)[1],)
    return out


def _ident(name: str) -> str | None:
    return name if name.isidentifier() else None


def correction_group_type(table: AlgorithmTable, names: Sequence[str], base: Mapping[str, Mapping[str, Any]]) -> tuple[Any, Any]:
    """``(type, default)`` of ``--algorithm.correction``: a dataclass with one typed group per
    chosen correction (``--algorithm.correction.NAME.HYPER VALUE``); an untyped
    ``name -> {key: value}`` mapping when a name is unknown, not an identifier, or takes ``**kwargs``."""
    fields = []
    untyped = dict[str, dict[str, HyperValue]], {k: dict(v) for k, v in base.items()}
    if len(set(names)) != len(names):  # resolution reports the repeated name
        return untyped
    for name in names:
        try:
            cls = hyper_class(table.entry(CORRECTION_KIND, name), dict(base.get(name, {})))
        except UnknownNameError:  # resolution reports it, with the closest name
            cls = None
        if cls is None or _ident(name) is None:
            return untyped
        doc = f"Hyperparameters of the off-policy correction {name!r}."
        fields.append((name, Annotated[cls, tyro.conf.arg(help=doc)], dataclasses.field(default_factory=cls)))
    group = dataclasses.make_dataclass("correction", fields, frozen=True)
    group.__doc__ = "Hyperparameters of the chosen off-policy corrections (defaults: each function's own)."
    return group, group()


def correction_mapping(value: Any, table: AlgorithmTable, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The parsed correction group as ``name -> {hyperparameter: value}``, only values that differ
    from each function's own defaults (a correction left at its defaults has no entry)."""
    if not dataclasses.is_dataclass(value):
        return {k: dict(v) for k, v in dict(value).items()}
    out = {}
    for name in names:
        defaults = entry_hyperparameters(table.entry(CORRECTION_KIND, name)) or {}
        sub = getattr(value, name)
        changed = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)
                   if getattr(sub, f.name) != defaults.get(f.name) or type(getattr(sub, f.name)) is not type(defaults.get(f.name))}
        if changed:
            out[name] = changed
    return out


def check_correction_flags(argv: Sequence[str], table: AlgorithmTable, names: Sequence[str]) -> None:
    """Raise ValueError for ``--algorithm.correction.NAME.KEY`` naming a correction the chain does
    not choose, or a hyperparameter that correction does not take."""
    prefix = flag(CORRECTION_GROUP) + "."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        name, _, key = arg[len(prefix):].split("=", 1)[0].partition(".")
        match = [n for n in names if n.replace("_", "-") == name.replace("_", "-")]
        if not match:
            raise ValueError(f"{arg.split('=', 1)[0]}: {name!r} is not a chosen off-policy correction "
                             f"(--algorithm.off-policy-correction chooses {list(names)})")
        try:
            cls = hyper_class(table.entry(CORRECTION_KIND, match[0]), {})
        except UnknownNameError:
            continue
        if cls is None:
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        if key.replace("-", "_") not in known:
            raise ValueError(f"{arg.split('=', 1)[0]}: off-policy correction {match[0]!r} takes no hyperparameter "
                             f"{key.replace('-', '_')!r} (it takes: {', '.join(sorted(known)) or 'none'})")
