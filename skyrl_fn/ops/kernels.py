"""Loss kernels and the chunked log-prob path on CUDA: inductor options, bf16 in / fp32 math.

Notation: ``B`` sequences, ``T`` response tokens, ``N = B*T`` rows, ``V`` vocabulary, ``C`` rows
per log-prob chunk.

* :func:`compile_kwargs` — arguments of ``torch.compile`` for a compile mode on a device type.
  Modes: ``default`` (fast compile), ``max-autotune-no-cudagraphs`` (the CUDA default here:
  autotuned Triton kernels, no CUDA graphs, so ``dynamic=True`` keeps one artefact for every
  ``B``/``T``), ``max-autotune`` and ``reduce-overhead`` (CUDA graphs: one graph per new shape,
  worth it only with fixed shapes, e.g. padded micro-batches). On CPU every mode compiles as
  ``default``.
* :func:`upcast_kernel` — a loss kernel ``(log_probs, old_log_probs, advantages, loss_mask, *extra)``
  whose half-precision floating inputs are cast to float32 *inside* the function, so under
  inductor the cast fuses into the loads: bf16 tensors are read at half the bandwidth while every
  exp/log/sum runs and accumulates in float32.
* :func:`compile_kernel` — ``torch.compile(upcast_kernel(kernel), **compile_kwargs(...))``, cached
  per (kernel, mode, device type).
* :func:`fp32_accumulation` — context manager forbidding reduced-precision reductions in bf16/fp16
  cuBLAS matmuls (the ``[C, H] x [H, V]`` products of the chunked log-prob path).
* :func:`logprob_chunk_rows` / :func:`token_logprobs_on_device` — rows per chunk so the ``[C, V]``
  float32 working set of ``skyrl_fn.ops.logprobs.token_logprobs_from_hidden`` fits a share of the free
  GPU memory.

Nothing here needs CUDA to import; the CPU tests check the math and the option plumbing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Literal

import torch

from skyrl_fn.ops.logprobs import token_logprobs_from_hidden

__all__ = [
    "COMPILE_MODES",
    "CompileMode",
    "default_compile_mode",
    "compile_kwargs",
    "upcast_kernel",
    "compile_kernel",
    "fp32_accumulation",
    "logprob_chunk_rows",
    "token_logprobs_on_device",
]

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_HALF = (torch.bfloat16, torch.float16)


def default_compile_mode(device_type: str) -> str:
    """``max-autotune-no-cudagraphs`` on CUDA, ``default`` elsewhere."""
    return "max-autotune-no-cudagraphs" if device_type == "cuda" else "default"


def compile_kwargs(*, mode: str | None = None, device_type: str = "cuda", dynamic: bool = True) -> dict:
    """Keyword arguments of ``torch.compile`` (inductor) for ``mode`` on ``device_type``.

    Args:
        mode: one of :data:`COMPILE_MODES`; None picks :func:`default_compile_mode`.
        device_type: ``cuda`` or ``cpu`` (autotuning and CUDA graphs are CUDA-only).
        dynamic: symbolic sizes (one artefact for every ``B``/``T``).

    Raises:
        ValueError: an unknown mode (the message lists them).
    """
    if mode is None:
        mode = default_compile_mode(device_type)
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode: expected one of {list(COMPILE_MODES)}, got {mode!r}")
    if device_type != "cuda":
        mode = "default"
    # torch.compile rejects mode together with options, so the mode alone carries the choice.
    return {"backend": "inductor", "mode": mode, "dynamic": bool(dynamic), "fullgraph": False}


def upcast_kernel(kernel: Callable) -> Callable:
    """``kernel`` with bfloat16/float16 tensor arguments cast to float32 first (fp32 math).

    The result of ``upcast_kernel(k)(*bf16_args)`` equals ``k(*[a.float() for a in args])``:
    bf16 inputs, float32 arithmetic and accumulation, float32 outputs. Integer and bool tensors
    (masks) and non-tensors pass through unchanged.
    """

    @functools.wraps(kernel)
    def upcast(*args, **kwargs):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a for a in args)
        kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype in _HALF else v) for k, v in kwargs.items()}
        return kernel(*args, **kwargs)

    return upcast


@functools.lru_cache(maxsize=None)
def compile_kernel(kernel: Callable, *, mode: str | None = None, device_type: str = "cuda") -> Callable:
    """``torch.compile`` of :func:`upcast_kernel` ``(kernel)`` with :func:`compile_kwargs`; cached.

    Compilation is lazy (first call); a platform without inductor support raises there, and
    ``skyrl_fn.ops.compile.compile_loss`` is the wrapper with the eager fallback.
    """
    return torch.compile(upcast_kernel(kernel), **compile_kwargs(mode=mode, device_type=device_type))


@contextlib.contextmanager
def fp32_accumulation():
    """Within the block, bf16/fp16 cuBLAS matmuls accumulate in float32 (no reduced-precision
    reductions); the previous settings are restored on exit. A no-op for CPU matmuls."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


def logprob_chunk_rows(vocab: int, *, free_bytes: int, fraction: float = 0.25, with_entropy: bool = False,
                       multiple: int = 8, max_rows: int = 1 << 16) -> int:
    """Rows ``C`` per chunk so the chunk's float32 ``[C, V]`` buffers use <= ``fraction * free_bytes``.

    The chunked path holds one ``[C, V]`` float32 logits chunk plus its softmax (two with
    entropy: three), so ``C = fraction * free / (k * 4 * V)``, rounded down to a multiple of
    ``multiple`` (tensor-core friendly), clamped to ``[1, max_rows]``.

    Raises:
        ValueError: non-positive ``vocab``/``free_bytes`` or ``fraction`` outside (0, 1].
    """
    if vocab < 1 or free_bytes < 1:
        raise ValueError(f"vocab/free_bytes: expected positive ints, got {vocab}, {free_bytes}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected in (0, 1], got {fraction}")
    k = 3 if with_entropy else 2
    rows = int(fraction * free_bytes) // (k * 4 * vocab)
    if rows >= multiple:
        rows = rows // multiple * multiple
    return max(1, min(rows, max_rows))


def token_logprobs_on_device(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, with_entropy: bool = False, fraction: float = 0.25,
                             mask: torch.Tensor | None = None):
    """``skyrl_fn.ops.logprobs.token_logprobs_from_hidden`` with a chunk size from the free device memory.

    On CUDA the chunk is sized by :func:`logprob_chunk_rows` from ``torch.cuda.mem_get_info`` and
    the matmuls run under :func:`fp32_accumulation`; elsewhere the library default chunk is used.
    ``hidden [B, T, H]`` or ``[N, H]`` (bf16 allowed), ``weight [V, H]``, ``targets [B, T]``/``[N]``;
    returns float32 log-probs (and entropy) shaped like ``targets``.
    """

    chunk = None
    if hidden.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(hidden.device)
        chunk = logprob_chunk_rows(weight.shape[0], free_bytes=free, fraction=fraction, with_entropy=with_entropy)
    with fp32_accumulation():
        return token_logprobs_from_hidden(
            hidden, weight, targets, chunk_size=chunk, temperature=temperature, with_entropy=with_entropy,
            ignore_index=None, mask=mask,
        )
