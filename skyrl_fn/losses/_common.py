"""Shared pieces of the policy losses: safe ratios, masked statistics, the standard metrics, and
``run``, which calls a loss's tensor kernel (eagerly, or compiled inside ``compile_mode``).

Notation: ``B`` sequences, ``T`` response tokens. Every helper is a pure tensor function with no
device sync (no ``.item()``, no Python branching on tensor values), so kernels trace into one graph.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Mapping

import torch

from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput

__all__ = [
    "LOG_RATIO_CLAMP",
    "masked_mean",
    "masked_sum",
    "safe_ratio",
    "clean",
    "ratio_metrics",
    "run",
    "compile_mode",
    "compiling",
    "compiled_kernel",
    "check_nonnegative",
    "check_positive",
]

#: ``|log r|`` is clamped to this before ``exp`` (SkyRL-Train's ``safe_exp_delta``, verl's clamp).
LOG_RATIO_CLAMP = 20.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask)`` with ``torch.where`` so NaN/inf off the mask never leaks. [B, T] -> [] or [B]."""
    z = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / max(sum(mask), 1)``; 0 for an empty mask. [B, T] -> [] or [B]."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every off-mask entry replaced by 0 (padding may hold NaN/-inf log-probs).

    The gradient of the result is exactly zero off the mask.
    """
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def safe_ratio(log_ratio: torch.Tensor, clamp: float = LOG_RATIO_CLAMP) -> torch.Tensor:
    """``exp(clamp(log_ratio, -clamp, clamp))``: the importance ratio without overflow. [B, T]."""
    return torch.exp(torch.clamp(log_ratio, -clamp, clamp))


@torch.no_grad()
def ratio_metrics(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    clipped_low: torch.Tensor | None = None,
    clipped_high: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The standard policy-loss metrics, detached 0-dim tensors over the tokens where ``mask``.

    Args:
        log_ratio: ``[B, T]`` ``log pi - log pi_old``.
        mask: ``[B, T]`` bool.
        clipped_low / clipped_high: optional ``[B, T]`` bool, tokens whose gradient the loss clips
            on the low / high side.

    Returns:
        ``ratio_mean``, ``ratio_min``, ``ratio_max`` (of ``exp(log_ratio)``, 1 for an empty mask),
        ``approx_kl`` (k1 estimate of KL(pi_old || pi) = mean of ``-log_ratio``, verl's ``ppo_kl``),
        ``clip_frac_low``, ``clip_frac_high`` and ``clip_ratio`` (their sum, SkyRL-Train's name).
    """
    lr = log_ratio.detach()
    ratio = safe_ratio(lr)
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    inf = torch.full((), float("inf"), dtype=ratio.dtype, device=ratio.device)
    any_valid = mask.any()
    out = {
        "ratio_mean": torch.where(any_valid, masked_mean(ratio, mask), one),
        "ratio_min": torch.where(any_valid, torch.where(mask, ratio, inf).amin(), one),
        "ratio_max": torch.where(any_valid, torch.where(mask, ratio, -inf).amax(), one),
        "approx_kl": masked_mean(-lr, mask),
    }
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    low = masked_mean(clipped_low.to(ratio.dtype), mask) if clipped_low is not None else zero
    high = masked_mean(clipped_high.to(ratio.dtype), mask) if clipped_high is not None else zero
    out["clip_frac_low"] = low
    out["clip_frac_high"] = high
    out["clip_ratio"] = low + high
    return out


_MODE = threading.local()


def compiling() -> bool:
    """True inside a ``compile_loss`` call: ``run`` then sends kernels through torch.compile."""
    return getattr(_MODE, "compile", False)


class compile_mode:
    """Context manager: route every ``run`` kernel in this thread through ``torch.compile``."""

    def __init__(self, enabled: bool = True, backend: str = "inductor") -> None:
        self.enabled = enabled
        self.backend = backend

    def __enter__(self):
        self.previous = (compiling(), getattr(_MODE, "backend", "inductor"))
        _MODE.compile, _MODE.backend = self.enabled, self.backend
        return self

    def __exit__(self, *exc) -> None:
        _MODE.compile, _MODE.backend = self.previous


@functools.lru_cache(maxsize=None)
def compiled_kernel(kernel: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(kernel, dynamic=True, backend=backend)``, one artefact per kernel (sizes are
    symbolic, so a new ``B`` or ``T`` reuses it)."""
    return torch.compile(kernel, dynamic=True, backend=backend)


def run(kernel: Callable, batch: PolicyLossInput, *extra) -> PolicyLossOutput:
    """Call ``kernel(log_probs, old_log_probs, advantages, loss_mask, *extra) -> (token_loss,
    metrics)`` (compiled inside ``compile_mode``) and wrap the result in a ``PolicyLossOutput``.

    Kernels are pure tensor functions (no records, no ``.item()``), so they trace into one graph;
    the record is built outside the graph. The kernel must return the loss already masked (use
    ``clean``) and detached metrics.
    """
    fn = compiled_kernel(kernel, getattr(_MODE, "backend", "inductor")) if compiling() else kernel
    loss, metrics = fn(batch.log_probs, batch.old_log_probs, batch.advantages, batch.loss_mask, *extra)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the attrs-generated __init__ of a frozen record: build it outside
        # any graph. Looked up lazily: importing torch._dynamo costs seconds at start-up.
        return _output_outside_graph()(loss, metrics)
    return _output(loss, metrics)


def _output(token_loss: torch.Tensor, metrics: Mapping[str, torch.Tensor]) -> PolicyLossOutput:
    return PolicyLossOutput(token_loss=token_loss, metrics={k: v.detach() for k, v in metrics.items()})


@functools.lru_cache(maxsize=1)
def _output_outside_graph() -> Callable:
    return torch.compiler.disable(_output)


def check_batch(batch: PolicyLossInput) -> None:
    """Raise TypeError unless ``batch`` is a ``PolicyLossInput`` (every built-in loss calls this first)."""
    if not isinstance(batch, PolicyLossInput):
        raise TypeError(f"batch: expected a PolicyLossInput, got {type(batch).__name__}")


def check_nonnegative(name: str, value: float) -> float:
    """Raise ValueError unless ``value`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)
