"""Typed command-line flags for the batch transforms a run chooses.

``--algorithm.batch-transforms overlong_penalty dynamic_sampling`` chooses the transforms (in
order); each chosen one gets a group of typed flags built from its signature, as the other
hyperparameter groups (``skyrl_fn.cli.hyper_flags``)::

    --algorithm.transform.overlong-penalty.overlong-buffer-len 2
    --algorithm.transform.dynamic-sampling.type replace

The choice is read from the arguments before parsing (:func:`chosen_transforms`), so ``--help``
lists exactly the chosen transforms' hyperparameters; a flag for a transform not chosen, or one
the transform does not take, is an error naming it (:func:`check_transform_flags`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Mapping, Sequence

import tyro

from skyrl_fn.algorithm import entry_hyperparameters
from skyrl_fn.cli.hyper_flags import hyper_class
from skyrl_fn.core.table import AlgorithmTable, UnknownNameError

__all__ = ["NAMES_FLAG", "GROUP_FLAG", "chosen_transforms", "transforms_type", "transforms_mapping", "check_transform_flags"]

NAMES_FLAG = "--algorithm.batch-transforms"
GROUP_FLAG = "--algorithm.transform"


def chosen_transforms(argv: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    """The transform names ``argv`` chooses (the last ``--algorithm.batch-transforms`` given: the
    words after it up to the next flag), else ``default``."""
    out = tuple(default)
    for i, arg in enumerate(argv):
        for spelling in (NAMES_FLAG, "--algorithm.batch_transforms"):
            if arg == spelling:
                words = []
                for w in argv[i + 1:]:
                    if w.startswith("--"):
                        break
                    words.append(w)
                out = tuple(words)
            elif arg.startswith(spelling + "="):
                out = tuple(w for w in arg.split("=", 1)[1].replace(",", " ").split())
    return out


def _entry_class(table: AlgorithmTable, name: str, base: Mapping[str, Any]) -> type | None:
    try:
        return hyper_class(table.entry("batch_transform", name), base)
    except UnknownNameError:  # resolution reports it, with the closest name
        return None


def transforms_type(table: AlgorithmTable, names: Sequence[str], base: Mapping[str, Mapping[str, Any]]) -> tuple[type, Any]:
    """``(type, default)`` of the ``transform`` group: one sub-group of typed flags per chosen
    transform (defaults: ``base``'s values, else the function's own)."""
    fields = []
    for name in dict.fromkeys(names):
        cls = _entry_class(table, name, base.get(name, {}))
        if cls is None or not dataclasses.fields(cls):
            continue
        doc = f"Hyperparameters of batch transform {name!r} (set only those to change)."
        fields.append((name, Annotated[cls, tyro.conf.arg(help=doc)], dataclasses.field(default_factory=cls)))
    cls = dataclasses.make_dataclass("batch_transforms", fields, frozen=True)
    cls.__doc__ = "Hyperparameters of the chosen batch transforms (--algorithm.batch-transforms)."
    return cls, cls()


def transforms_mapping(value: Any, table: AlgorithmTable) -> dict[str, dict[str, Any]]:
    """The parsed group as the config's mapping: per transform, only values that differ from the
    function's own defaults."""
    if not dataclasses.is_dataclass(value):
        return {k: dict(v) for k, v in dict(value).items()}
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(value):
        group = getattr(value, f.name)
        defaults = entry_hyperparameters(table.entry("batch_transform", f.name)) or {}
        changed = {}
        for g in dataclasses.fields(group):
            v = getattr(group, g.name)
            if g.name not in defaults or v != defaults[g.name] or type(v) is not type(defaults[g.name]):
                changed[g.name] = v
        if changed:
            out[f.name] = changed
    return out


def check_transform_flags(argv: Sequence[str], table: AlgorithmTable, names: Sequence[str]) -> None:
    """Raise ValueError for a ``--algorithm.transform.<name>.<x>`` flag whose transform is not
    chosen, or that the chosen transform does not take."""
    prefix = GROUP_FLAG + "."
    chosen = {n.replace("_", "-"): n for n in names}
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        flag = arg.split("=", 1)[0]
        name_part, _, key = flag[len(prefix):].partition(".")
        name = chosen.get(name_part.replace("_", "-"))
        if name is None:
            raise ValueError(f"{flag}: batch transform {name_part.replace('-', '_')!r} is not chosen (--algorithm.batch-transforms: {list(names) or 'none'})")
        cls = _entry_class(table, name, {})
        if cls is None:
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        if key.replace("-", "_") not in known:
            takes = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{flag}: batch transform {name!r} takes no hyperparameter {key.replace('-', '_')!r} (it takes: {takes})")
