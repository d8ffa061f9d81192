"""How custom algorithms reach the launcher: four ways, all ending in one frozen table.

1. ``module:function`` or ``path/to/file.py:function`` as a name in the config
   (``--algorithm.advantage-estimator my_pkg.est:my_adv``): imported and registered under that
   exact string, with the kind of the config field it appears in.
2. A custom entry point: a script registers through the SkyRL-compat façade
   (``register_advantage_estimator``), then calls :func:`skyrl_fn.cli.main`; ``main``
   freezes the façade's registrations into the table before resolving names.
3. ``--plugin path/to/file.py`` or ``--plugin my_pkg.my_module`` (repeatable), imported before
   names are resolved. A plugin either registers through the compat façade at import time, or
   defines ``register(table: AlgorithmTable) -> AlgorithmTable`` (called with the current table;
   it must return the new one).
4. The entry-point group ``skyrl_fn.algorithms`` of pip-installed packages: each entry point
   loads a ``register(table) -> table`` callable.

Module names (``--plugin my_module``, ``my_module:function``) are searched in the *app dir*
first, as ``uvicorn module:app`` does: the working directory unless ``--app-dir DIR`` says
otherwise.

Ray workers (on this machine or on other nodes of a cluster) cannot import a plugin file, a module
from the app dir, or anything else that is not installed. Such modules are registered for pickling
by value with every cloudpickle in use: the standalone ``cloudpickle`` *and* Ray's vendored
``ray.cloudpickle``, which is what Ray serialises task and actor arguments with.
:func:`check_shippable` pickles a whole run the way Ray will, ships by value every non-installed
module the pickle would still reference by name, and turns what cannot be pickled at all into one
clear error, before Ray starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import importlib.metadata
import importlib.util
import io
import os
import sys
import sysconfig
import traceback
import types
from typing import Callable, Iterable, Mapping

import cloudpickle
import ray.cloudpickle

import skyrl_fn
from skyrl_fn import compat
from skyrl_fn.compat import advantage_estimators  # noqa: F401  (binds compat.advantage_estimators)
from skyrl_fn.core.table import AlgorithmTable

__all__ = [
    "ENTRY_POINT_GROUP",
    "NAME_FIELDS",
    "PluginError",
    "import_path_or_module",
    "ship_by_value",
    "check_shippable",
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

    roots.add(os.path.dirname(os.path.abspath(skyrl_fn.__file__)))
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


#: Every cloudpickle that may serialise a run: ours and Ray's vendored copy (its own registry).
_PICKLERS = tuple({id(m): m for m in (cloudpickle, ray.cloudpickle)}.values())


def _is_installed(module: types.ModuleType) -> bool:
    """True when every worker imports ``module`` by itself (no file, or a file under an
    installed root: site-packages, the standard library, ``skyrl_fn``)."""
    path = getattr(module, "__file__", None)
    return path is None or os.path.realpath(path).startswith(_installed_roots())


def ship_by_value(module: types.ModuleType) -> bool:
    """Pickle ``module``'s functions and classes by value when workers may not import it; True
    if so.

    Installed modules (site-packages, the standard library, ``skyrl_fn`` itself) and
    ``__main__`` (cloudpickle already ships it by value) are left alone. The module is registered
    with the standalone ``cloudpickle`` and with ``ray.cloudpickle``.
    """
    if module.__name__ == "__main__" or _is_installed(module):
        return False
    for pickler in _PICKLERS:
        pickler.register_pickle_by_value(module)
    return True


def _by_value(name: str) -> bool:
    registered = ray.cloudpickle.list_registry_pickle_by_value()
    parts = name.split(".")
    return any(".".join(parts[:i]) in registered for i in range(1, len(parts) + 1))


class _Census(ray.cloudpickle.CloudPickler):
    """Ray's pickler, noting every module a pickle refers to by name (for a function, a class
    or a module object) instead of carrying by value."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self.by_reference: set[str] = set()

    def reducer_override(self, obj):
        if isinstance(obj, types.ModuleType):
            name = obj.__name__
        elif isinstance(obj, (types.FunctionType, type)):
            name = getattr(obj, "__module__", None)
        else:
            name = None
        if name and name != "__main__" and not _by_value(name):
            self.by_reference.add(name)
        return super().reducer_override(obj)


def _pickle_error(obj: object) -> BaseException | None:
    try:
        ray.cloudpickle.dumps(obj)
    except Exception as err:  # noqa: BLE001 - any pickling failure is the user's object
        return err
    return None


def check_shippable(obj: object, *, what: str = "the run", parts: Mapping[str, object] | None = None) -> int:
    """Make ``obj`` (e.g. a ``ResolvedRun``) travel to Ray workers on any node.

    Pickles ``obj`` with Ray's cloudpickle; every module it refers to by name that is not
    installed (a module from the app dir, a helper a plugin or a custom entry point imported) is
    shipped by value, and the pickle is redone until nothing such is left.

    Args:
        obj: what Ray will pickle.
        what: how the error names ``obj``.
        parts: label -> piece of ``obj`` (e.g. each table entry's function); when ``obj`` cannot
            be pickled, the error names the parts that cannot.

    Returns:
        the size of the final pickle in bytes.

    Raises:
        PluginError: ``obj`` cannot be pickled (a lock, an open file, a generator in a custom
            function's closure or globals...), in one line naming the culprit.
    """
    for _ in range(16):
        buffer = io.BytesIO()
        census = _Census(buffer)
        try:
            census.dump(obj)
        except Exception as err:  # noqa: BLE001 - any pickling failure is the user's object
            bad = {label: e for label, e in ((k, _pickle_error(v)) for k, v in (parts or {}).items()) if e}
            label, err = next(iter(bad.items()), (what, err))
            raise PluginError(
                f"{label} cannot be sent to Ray workers: {type(err).__name__}: {err}. Custom functions must be "
                "picklable: define them at module level and keep locks, open files and generators out of "
                "their closures and globals (or run with --ray.no-use-ray)"
            ) from None
        shipped = [m for m in sorted(census.by_reference) if m in sys.modules and ship_by_value(sys.modules[m])]
        if not shipped:
            return buffer.getbuffer().nbytes
    raise PluginError(f"{what}: modules to ship by value kept changing; last: {shipped}")


def _module_name_for(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    digest = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]
    return f"skyrl_fn_plugin_{stem}_{digest}"


def _where(err: BaseException, path: str | None) -> str:
    """``file:line`` of ``err`` inside the user's code: the syntax error's place, else the
    innermost traceback frame in ``path`` (or the innermost frame at all)."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = list(traceback.extract_tb(err.__traceback__))
    mine = [f for f in frames if path and os.path.realpath(f.filename) == os.path.realpath(path)]
    frame = (mine or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else "?"


@contextlib.contextmanager
def _searched_first(app_dir: str | None):
    """``app_dir`` (default: the working directory) first on ``sys.path`` while importing."""
    path = os.path.abspath(app_dir or os.getcwd())
    added = path not in sys.path[:1]
    if added:
        sys.path.insert(0, path)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and sys.path and sys.path[0] == path:
            del sys.path[0]


def import_path_or_module(spec: str, *, app_dir: str | None = None) -> types.ModuleType:
    """Import ``spec``: a ``.py`` file path (loaded once under a stable private name) or a
    dotted module name, searched in ``app_dir`` (default: the working directory) first. Ships
    the module, and every module not installed that importing it brought in, by value.

    Raises:
        PluginError: the file or module does not exist, or importing it raised (the message
            names the file and line).
    """
    before = set(sys.modules)
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = os.path.abspath(spec)
        name = _module_name_for(path)
        module = sys.modules.get(name)  # loaded once: a second name from the same file reuses it
        if module is None:
            if not os.path.isfile(path):
                raise PluginError(f"plugin {spec!r}: expected an existing .py file, got no file at {path}")
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise PluginError(f"plugin {spec!r}: expected an importable .py file, got {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # register_pickle_by_value needs it in sys.modules
            try:
                loader_spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[name]
                raise PluginError(f"plugin {spec!r}: {_where(err, path)}: {type(err).__name__}: {err}") from err
    else:
        try:
            with _searched_first(app_dir):
                module = importlib.import_module(spec)
        except ModuleNotFoundError as err:
            if err.name is None or not (spec == err.name or spec.startswith(err.name + ".")):
                raise PluginError(f"plugin {spec!r}: {_where(err, None)}: {type(err).__name__}: {err}") from err
            where = os.path.abspath(app_dir or os.getcwd())
            raise PluginError(
                f"plugin {spec!r}: expected an importable module or a .py path, got {err} "
                f"(searched {where} first, then sys.path; --app-dir DIR changes the first place)"
            ) from None
        except Exception as err:
            path = getattr(sys.modules.get(spec), "__file__", None)
            raise PluginError(f"plugin {spec!r}: {_where(err, path)}: {type(err).__name__}: {err}") from err
    for new in set(sys.modules) - before:
        if isinstance(sys.modules.get(new), types.ModuleType):
            ship_by_value(sys.modules[new])
    ship_by_value(module)
    return module


def _call_register(what: str, register: Callable, table: AlgorithmTable) -> AlgorithmTable:
    try:
        new = register(table)
    except PluginError:
        raise
    except Exception as err:
        path = getattr(sys.modules.get(getattr(register, "__module__", "")), "__file__", None)
        raise PluginError(f"{what}: register(table) raised at {_where(err, path)}: {type(err).__name__}: {err}") from err
    if not isinstance(new, AlgorithmTable):
        raise PluginError(
            f"{what}: expected register(table) to return an AlgorithmTable, got {type(new).__name__}"
            " (tables are immutable: return table.register(...))"
        )
    return new


def load_plugin(spec: str, table: AlgorithmTable, *, app_dir: str | None = None) -> AlgorithmTable:
    """Import the plugin ``spec`` and apply its ``register(table) -> table`` if it defines one.

    A plugin that only registers through the compat façade returns ``table`` unchanged here;
    :func:`freeze_compat` picks its registrations up afterwards.
    """
    module = import_path_or_module(spec, app_dir=app_dir)
    register = getattr(module, "register", None)
    # Only a register defined in the plugin itself: ``from x import register`` is not a hook.
    if callable(register) and getattr(register, "__module__", None) == module.__name__:
        table = _call_register(f"plugin {spec!r}", register, table)
    return table


def load_plugins(specs: Iterable[str], table: AlgorithmTable, *, app_dir: str | None = None) -> AlgorithmTable:
    """:func:`load_plugin` for each spec, in order."""
    for spec in specs:
        table = load_plugin(spec, table, app_dir=app_dir)
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
    """``table`` plus everything registered through the SkyRL-compat façade."""
    return compat.freeze(base=table)


def register_import_names(
    names: dict[str, str], table: AlgorithmTable, *, app_dir: str | None = None
) -> AlgorithmTable:
    """Register each ``module:function`` / ``file.py:function`` name not yet in the table.

    Args:
        names: kind -> name, e.g. ``{"advantage_estimator": "my_pkg.est:my_adv"}``.
        table: the table to extend.
        app_dir: where module names are searched first (default: the working directory).

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
        module = import_path_or_module(target, app_dir=app_dir)
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
