"""The peers' own code for numerical comparisons, when it is installed in a scratch directory DIR
(never in the project's environment, never in this repository):

* verl 0.9.1 and TRL: ``pip install --no-deps --target DIR verl==0.9.1 omegaconf
  antlr4-python3-runtime==4.9.3 tensordict pyvers codetiming orjson jaxtyping wadler_lindig trl``
  (then delete ``DIR/tests``: verl's wheel ships a top-level ``tests`` package that would shadow
  this one);
* SkyRL 0.3.0: the ``skyrl/`` tree of a NovaSky-AI/SkyRL checkout at its 0.3.0 release (commit
  f5bc3b78) copied to ``DIR/skyrl`` (and its ``examples/train/algorithms/dapo/main_dapo.py`` to
  the same path under DIR), with its package ``__init__`` files down to
  ``skyrl/backends/skyrl_train/utils/`` emptied (they import SkyRL's whole stack, which needs
  Python 3.12). Modules whose imports go further (the trainer utilities) are loaded from their
  files by :func:`peer_modules` / :func:`peer_function`, with the unused imports left absent.

Point ``SKYRL_FN_PEERS`` at DIR (modules that are imported by name, e.g. ``verl``, are then found
there; ``tests/estimators/test_verl_peer.py`` also wants DIR on ``PYTHONPATH``). Tests that need a
peer skip without it, so CI, which has none, skips them. The tests run the peers' files as they
are; nothing of them is copied here."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Iterator, Mapping

import pytest

PEERS_ENV = "SKYRL_FN_PEERS"


def peer(module: str) -> ModuleType:
    """Import ``module`` from the environment or from ``$SKYRL_FN_PEERS``; skip the test if neither has it."""
    path = os.environ.get(PEERS_ENV)
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)  # after the project's own packages: a peer never shadows them
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a peer import that fails on a missing optional dependency
        pytest.skip(f"peer module {module} not importable ({type(err).__name__}: {err}); set {PEERS_ENV}")


def peer_file(relpath: str) -> Path:
    """``$SKYRL_FN_PEERS/relpath`` (a peer's source file, e.g. from a SkyRL checkout); skip the test
    when the variable or the file is missing."""
    root = os.environ.get(PEERS_ENV)
    path = Path(root, relpath) if root else None
    if path is None or not path.is_file():
        pytest.skip(f"peer source {relpath} not found; set {PEERS_ENV} to a directory that has it")
    return path


class _Absent:
    """Stands in for any name of a peer's heavy import that the compared functions never touch:
    every attribute is itself, calling it returns itself (so ``logger.info(...)`` is a no-op)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Absent":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> "_Absent":
        return self

    def __repr__(self) -> str:
        return f"<absent {self._name}>"


class _AbsentModule(ModuleType):
    def __getattr__(self, attr: str) -> _Absent:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}")


@contextlib.contextmanager
def peer_modules(files: Mapping[str, str], *, absent: Iterable[str] = ()) -> Iterator[dict[str, ModuleType]]:
    """Load a peer's own source files as the modules they are in the peer, for the duration of the
    block: ``files`` maps a module name to its path under ``$SKYRL_FN_PEERS`` (loaded in order, each
    registered under its name so the others' imports find it); each module in ``absent`` that is
    not already imported is replaced by an empty stand-in (imports of the peer's that the compared
    functions do not use: its Ray actors, data loaders, logger). ``sys.modules`` is restored on
    exit; the loaded modules stay usable. Skips the test when a file is missing."""
    paths = {name: peer_file(rel) for name, rel in files.items()}
    with pytest.MonkeyPatch.context() as mp:
        for name in absent:
            if name not in sys.modules:
                mp.setitem(sys.modules, name, _AbsentModule(name))
        loaded = {}
        for name, path in paths.items():
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, name, module)
            spec.loader.exec_module(module)
            loaded[name] = module
        yield loaded


def peer_function(relpath: str, qualname: str, namespace: Mapping[str, object]) -> Callable:
    """One function or class of a peer's source file (``name``, or ``Class.name`` for a static
    method), run from that file's own text with the globals in ``namespace`` (for peers whose
    module imports far more than it needs, e.g. TRL's trainer, or an example script's trainer
    subclass: ``namespace`` then supplies its base class). Skips when the file is missing."""
    path = peer_file(relpath)
    tree = ast.parse(path.read_text(), filename=str(path))
    *outer, name = qualname.split(".")
    body = tree.body
    for cls in outer:
        body = next(n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls)
    node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
    if node is None:
        pytest.skip(f"peer function {qualname} not in {relpath}")
    if isinstance(node, ast.FunctionDef):
        node.decorator_list = []  # @staticmethod and the like: the plain function is what is compared
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)  # noqa: S102 - the peer's own text
    return scope[name]


#: SkyRL 0.3.0's batch-side functions (dynamic sampling, zero-variance filter, overlong filtering)
#: from its source (``$SKYRL_FN_PEERS/skyrl/...``, a checkout of NovaSky-AI/SkyRL at the 0.3.0
#: release, f5bc3b78), with the imports those functions never use left absent.
SKYRL_BATCH_FILES = {
    "skyrl.train.generators.base": "skyrl/train/generators/base.py",
    "skyrl.train.generators.utils": "skyrl/train/generators/utils.py",
    "skyrl.train.utils.trainer_utils": "skyrl/train/utils/trainer_utils.py",
}
SKYRL_BATCH_ABSENT = (
    "loguru", "ray", "ray.util", "ray.util.scheduling_strategies", "torchdata", "torchdata.stateful_dataloader",
    "transformers", "skyrl_gym", "skyrl_gym.metrics", "skyrl.backends.skyrl_train.inference_servers.base",
    "skyrl.train.config", "skyrl.train.dataset", "skyrl.backends.skyrl_train.utils.io",
    "skyrl.backends.skyrl_train.workers.worker", "skyrl.backends.skyrl_train.workers.worker_utils",
)


@contextlib.contextmanager
def skyrl_batch_utils() -> Iterator[tuple[ModuleType, ModuleType]]:
    """``(trainer_utils, generators.utils)`` of SkyRL 0.3.0, usable inside the block (their lazy
    imports of each other resolve there); skips the test without ``$SKYRL_FN_PEERS``."""
    with peer_modules(SKYRL_BATCH_FILES, absent=SKYRL_BATCH_ABSENT) as mods:
        yield mods["skyrl.train.utils.trainer_utils"], mods["skyrl.train.generators.utils"]
