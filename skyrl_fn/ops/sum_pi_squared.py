"""``sum_v pi(v)^2`` of a softmax, chunked over rows (the optimal token baseline's ``q``).

For logits ``z`` at temperature ``tau`` and ``pi = softmax(z / tau)``::

    e = exp(z / tau - max_v z / tau),   q = sum_v pi(v)^2 = sum_v e_v^2 / (sum_v e_v)^2

in float32, one ``[C, V]`` chunk of rows at a time: no ``[B, T, V]`` probability tensor is kept
(verl's ``calculate_sum_pi_squared_from_logits`` squares a full softmax of the logits divided by the
temperature; the value is the same).
"""

from __future__ import annotations

import torch

from skyrl_fn.ops.logprobs import DEFAULT_CHUNK_ELEMENTS

__all__ = ["sum_pi_squared"]


@torch.no_grad()
def sum_pi_squared(logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """``q = sum_v softmax(logits / temperature)_v^2`` over the last axis (module docstring).

    Args:
        logits: ``[..., V]`` floating (``[B, T, V]`` for a batch of responses).
        temperature: ``tau`` > 0, the sampling temperature.
        chunk_size: rows per chunk (None: about ``DEFAULT_CHUNK_ELEMENTS`` elements per chunk).

    Returns:
        ``[...]`` float32 in ``[1/V, 1]``.

    Raises:
        ValueError: a non-positive temperature or chunk size.
        TypeError: integer logits.
    """
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating tensor, got {logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    n = rows.shape[0]
    chunk = max(1, DEFAULT_CHUNK_ELEMENTS // max(v, 1)) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size!r}")
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    for s in range(0, n, chunk):
        z = rows[s : s + chunk].float() / temperature
        e = (z - z.amax(-1, keepdim=True)).exp_()  # in [0, 1], the row max at 1: no overflow
        out[s : s + chunk] = torch.linalg.vecdot(e, e) / e.sum(-1).square()
    return out.reshape(logits.shape[:-1]).clamp(max=1.0)
