"""Run a loss under ``torch.compile`` with dynamic shapes, falling back to eager with one warning.

``compile_loss(fn)`` returns a function with ``fn``'s call convention. The built-in losses keep
their math in pure tensor kernels called through ``skyrl_fn.losses._common.run``; under
``compile_loss`` those kernels (not the record plumbing around them, which dynamo cannot trace)
are compiled, so each loss is one graph. Any other function is compiled whole. Compilation uses
``dynamic=True``, so a new batch size or sequence length reuses the same kernel instead of
recompiling every step (the default "automatic dynamic" recompiles once per new shape until the
recompile limit, 8, is hit, after which dynamo *silently* runs eager). If compilation is not
possible (no dynamo support on this platform, no C++ compiler for inductor, a backend error), the
first call warns once and the function keeps running eager. Input errors are raised unchanged (a
failing compiled call is retried eagerly; only if eager succeeds is the compiler blamed).
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable

import torch

from skyrl_fn.losses._common import compile_mode

__all__ = ["compile_loss", "compile_unavailable_reason"]

_CACHE: dict[tuple, Callable] = {}
# Modules whose functions keep their math in ``run`` kernels (compiled without the record
# plumbing); the policy objective calls the losses, so compiling it compiles their kernels.
_KERNEL_MODULES = frozenset({"skyrl_fn.losses.ppo", "skyrl_fn.losses.pg", "skyrl_fn.losses.cov", "skyrl_fn.losses.objective"})
_LOCK = threading.Lock()


def compile_unavailable_reason() -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can (checked without compiling)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
            return "torch._dynamo is not supported on this Python/platform"
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"torch._dynamo unavailable ({type(exc).__name__}: {exc})"
    return None


def _name(fn: Callable) -> str:
    inner = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(inner, "__qualname__", type(inner).__name__)


def compile_loss(fn: Callable, *, dynamic: bool = True, backend: str = "inductor") -> Callable:
    """Return ``fn`` compiled with ``torch.compile(dynamic=dynamic)``, with an eager fallback.

    The wrapper is cached per ``fn`` object, so calling ``compile_loss`` every step is cheap and
    reuses one compiled artefact. Works for any kind (policy losses, aggregations, estimators).

    Args:
        fn: the function to compile.
        dynamic: mark sizes dynamic up front (recommended: no recompiles when ``B`` / ``T`` change).
        backend: the ``torch.compile`` backend (``"aot_eager"`` traces without generating code:
            quick, for tests).

    Returns:
        A callable with ``fn``'s signature and ``__wrapped__ = fn``.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    key = (fn, dynamic, backend)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    state: dict = {"compiled": None, "eager": False}
    inner = fn.func if isinstance(fn, functools.partial) else fn
    uses_kernels = getattr(inner, "__module__", "") in _KERNEL_MODULES

    def _fallback(reason: str) -> None:
        state["eager"] = True
        warnings.warn(f"skyrl_fn: torch.compile unavailable for {_name(fn)} ({reason}); running eager", RuntimeWarning, stacklevel=3)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if state["eager"]:
            return fn(*args, **kwargs)
        if state["compiled"] is None and not state.get("checked"):
            state["checked"] = True
            reason = compile_unavailable_reason()
            if reason is not None:
                _fallback(reason)
                return fn(*args, **kwargs)
        try:
            if state["compiled"] is None:
                state["compiled"] = (
                    _kernel_mode(fn, backend) if uses_kernels else torch.compile(fn, dynamic=dynamic, backend=backend)
                )
            return state["compiled"](*args, **kwargs)
        except Exception as exc:  # the loss is pure, so retry eagerly:
            out = fn(*args, **kwargs)  # an input error raises here again, unchanged
            # eager worked, so the compiler failed: warn once and stay eager
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            _fallback(f"{type(exc).__name__}: {first}")
            return out

    run.__wrapped__ = fn
    run.__skyrl_compiled__ = True
    with _LOCK:
        _CACHE.setdefault(key, run)
        return _CACHE[key]


def _kernel_mode(fn: Callable, backend: str) -> Callable:
    def call(*args, **kwargs):
        with compile_mode(True, backend):
            return fn(*args, **kwargs)

    return call
