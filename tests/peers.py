"""The peers' own code for numerical comparisons, when it is installed: verl 0.9.1 (``pip install
--no-deps --target DIR verl==0.9.1 omegaconf antlr4-python3-runtime==4.9.3 tensordict pyvers
codetiming orjson``) and SkyRL's ``skyrl.backends.skyrl_train.utils`` modules (from a checkout, with
``jaxtyping``). Point ``SKYRL_FN_PEERS`` at that directory; tests that need a peer skip without it.
Nothing of the peers is copied into this repository."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

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
