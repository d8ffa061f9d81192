"""How custom algorithms reach the launcher: four ways, all ending in one frozen table.

1. ``module:function`` or ``path/to/file.py:function`` as a name in the config
   (``--algorithm.advantage-estimator my_pkg.est:my_adv``): imported and registered under that
   exact string, with the kind of the config field it appears in.
2. A custom entry point: a script registers through the SkyRL-compat façade
   (``register_advantage_estimator``), then calls :func:`skyrl_fn.launcher.main`; ``main``
   freezes the façade's registrations into the table before resolving names.
3. ``--plugin path/to/file.py`` or ``--plugin my_pkg.my_module`` (repeatable), imported before
   names are resolved. A plugin either registers through the compat façade at import time, or
   defines ``register(table: AlgorithmTable) -> AlgorithmTable`` (called with the current table;
   it must return the new one).
4. The entry-point group ``skyrl_fn.algorithms`` of pip-installed packages: each entry point
   loads a ``register(table) -> table`` callable.

Modules Ray workers could not import by themselves (a plugin file, a module found only through a
driver-side ``sys.path`` edit) are registered with ``cloudpickle.register_pickle_by_value`` so
the functions in the shipped table travel by value.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
import types
from typing import Callable, Iterable

import cloudpickle

from skyrl_fn.table import AlgorithmTable

__all__ = [
    "ENTRY_POINT_GROUP",
    "NAME_FIELDS",
    "PluginError",
    "import_path_or_module",
    "ship_by_value",
    "load_plugin",
    "load_plugins",
    "load_entry_points",
    "freeze_compat",
    "register_import_names",
]

#: The entry-point group pip-installed packages declare (``[project.entry-points."skyrl_fn.algorithms"]``).
ENTRY_POINT_GROUP = "skyrl_fn.algorithms"

#: ``AlgorithmConfig`` field -> the table kind its name is looked up in.
NAME_FIELDS = {
    "advantage_estimator": "advantage_estimator",
    "policy_loss": "policy_loss",
    "loss_reduction": "aggregation",
    "kl_estimator": "kl_estimator",
}


class PluginError(ValueError):
    """A plugin, entry point or ``module:function`` name could not be loaded (a user error)."""


def _installed_roots() -> tuple[str, ...]:
    """Directories whose modules every worker on this machine imports by itself."""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    import skyrl_fn

    roots.add(os.path.dirname(os.path.abspath(skyrl_fn.__file__)))
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def ship_by_value(module: types.ModuleType) -> bool:
    """Pickle ``module``'s functions by value when workers may not import it; True if so.

    Installed modules (site-packages, the standard library, ``skyrl_fn`` itself) and
    ``__main__`` (cloudpickle already ships it by value) are left alone.
    """
    name = module.__name__
    path = getattr(module, "__file__", None)
    if name == "__main__" or path is None:
        return False
    if os.path.realpath(path).startswith(_installed_roots()):
        return False
    cloudpickle.register_pickle_by_value(module)
    return True


def _module_name_for(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    digest = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]
    return f"skyrl_fn_plugin_{stem}_{digest}"


def import_path_or_module(spec: str) -> types.ModuleType:
    """Import ``spec``: a ``.py`` file path (loaded once under a stable private name) or a
    dotted module name. Ships the module by value when workers cannot import it.

    Raises:
        PluginError: the file does not exist or the module cannot be imported.
    """
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise PluginError(f"plugin {spec!r}: expected an existing .py file, got no file at {path}")
        name = _module_name_for(path)
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise PluginError(f"plugin {spec!r}: expected an importable .py file, got {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # register_pickle_by_value needs it in sys.modules
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as err:
            raise PluginError(f"plugin {spec!r}: expected an importable module or a .py path, got {err}") from None
    ship_by_value(module)
    return module


def _call_register(what: str, register: Callable, table: AlgorithmTable) -> AlgorithmTable:
    new = register(table)
    if not isinstance(new, AlgorithmTable):
        raise PluginError(
            f"{what}: expected register(table) to return an AlgorithmTable, got {type(new).__name__}"
            " (tables are immutable: return table.register(...))"
        )
    return new


def load_plugin(spec: str, table: AlgorithmTable) -> AlgorithmTable:
    """Import the plugin ``spec`` and apply its ``register(table) -> table`` if it defines one.

    A plugin that only registers through the compat façade returns ``table`` unchanged here;
    :func:`freeze_compat` picks its registrations up afterwards.
    """
    module = import_path_or_module(spec)
    register = getattr(module, "register", None)
    # Only a register defined in the plugin itself: ``from x import register`` is not a hook.
    if callable(register) and getattr(register, "__module__", None) == module.__name__:
        table = _call_register(f"plugin {spec!r}", register, table)
    return table


def load_plugins(specs: Iterable[str], table: AlgorithmTable) -> AlgorithmTable:
    """:func:`load_plugin` for each spec, in order."""
    for spec in specs:
        table = load_plugin(spec, table)
    return table


def load_entry_points(table: AlgorithmTable, *, group: str = ENTRY_POINT_GROUP) -> AlgorithmTable:
    """Apply every installed ``group`` entry point (a ``register(table) -> table``), sorted by name."""
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as err:
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) in group {group!r}: could not load: {err}") from err
        module = sys.modules.get(ep.module)
        if module is not None:
            ship_by_value(module)
        if not callable(register):
            raise PluginError(f"entry point {ep.name!r} ({ep.value}): expected a callable register(table), got {type(register).__name__}")
        table = _call_register(f"entry point {ep.name!r} ({ep.value})", register, table)
    return table


def freeze_compat(table: AlgorithmTable) -> AlgorithmTable:
    """``table`` plus everything registered through the SkyRL-compat façade (if it is present)."""
    try:
        from skyrl_fn.compat import freeze
    except ImportError:
        return table
    return freeze(base=table)


def register_import_names(names: dict[str, str], table: AlgorithmTable) -> AlgorithmTable:
    """Register each ``module:function`` / ``file.py:function`` name not yet in the table.

    Args:
        names: kind -> name, e.g. ``{"advantage_estimator": "my_pkg.est:my_adv"}``.
        table: the table to extend.

    Returns:
        A new table with each such name registered under the full string.

    Raises:
        PluginError: the module or the function cannot be found.
    """
    for kind, name in names.items():
        if ":" not in name or (kind, name) in table:
            continue
        target, _, attr = name.rpartition(":")
        if not target or not attr:
            raise PluginError(f"{kind} {name!r}: expected 'module:function' or 'path/file.py:function'")
        module = import_path_or_module(target)
        fn = getattr(module, attr, None)
        if fn is None:
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise PluginError(f"{kind} {name!r}: {target!r} has no attribute {attr!r}; callables there: {public}")
        table = table.register(name, _native(kind, name, fn), kind=kind)
    return table


def _native(kind: str, name: str, fn: Callable) -> Callable:
    """``fn`` itself, or wrapped by the compat façade when it is written in SkyRL's keyword style
    (an estimator taking ``token_level_rewards`` or an ``AdvantageEstimator`` subclass; a loss
    taking ``config``)."""
    import inspect

    try:
        from skyrl_fn import compat
        from skyrl_fn.compat import advantage_estimators  # noqa: F401  (binds compat.advantage_estimators)
    except ImportError:
        return fn
    if kind == "advantage_estimator":
        class_based = compat.advantage_estimators.AdvantageEstimator  # the seed's base class
        if inspect.isclass(fn) and issubclass(fn, class_based):
            return compat.NativeFromSkyRL(name, fn())
        if isinstance(fn, class_based) or _params(fn)[:1] == ["token_level_rewards"]:
            return compat.NativeFromSkyRL(name, fn)
    if kind == "policy_loss" and "config" in _params(fn):
        return compat.NativeFromSkyRLLoss(name, fn)
    return fn


def _params(fn: Callable) -> list[str]:
    import inspect

    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []
