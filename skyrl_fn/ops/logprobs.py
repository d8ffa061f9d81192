"""Memory-light selected-token log-probs and entropy, chunked over rows.

Notation: ``N`` tokens (rows; ``[B, T]`` inputs are flattened to ``N = B*T``), ``H`` hidden size,
``V`` vocabulary. With temperature ``tau`` and (optional) bias ``b``, for row ``i`` and target
``y_i``::

    z_i       = (h_i W^T + b) / tau                     [V]   (or z_i = logits_i / tau)
    lse_i     = log sum_v exp(z_iv)
    log p_i   = z_i,y_i - lse_i                               selected-token log-prob
    ent_i     = -sum_v p_iv log p_iv = lse_i - sum_v p_iv z_iv

Gradients wrt the logits ``z_i`` (for upstream gradients ``g_i`` of ``log p_i`` and ``e_i`` of
``ent_i``)::

    d log p_i / d z_i = onehot(y_i) - p_i
    d ent_i   / d z_i = -p_i * (log p_i + ent_i)          (elementwise, log p_i the full row)
    dL / d z_i        = g_i (onehot(y_i) - p_i) - e_i p_i (log p_i + ent_i)

and by the chain rule ``dL/dh_i = (dL/dz_i) W / tau``, ``dL/dW = sum_i (dL/dz_i)^T h_i / tau``,
``dL/db = sum_i dL/dz_i / tau``.

The naive path ``log_softmax(h @ W.T).gather(...)`` holds several ``[N, V]`` tensors at once
(logits, log-softmax, and in backward a scattered one-hot gradient and the logits gradient).
``token_logprobs_from_hidden`` holds one ``[C, V]`` chunk at a time (two with entropy) plus at
most ``keep_bytes`` of forward chunks kept for backward: forward keeps ``lse [N]`` (and
``ent [N]``), backward uses the kept chunks and recomputes the logits of the others (the fused linear + cross-entropy idea of Liger-Kernel, Hsu et al. 2024, arXiv:2410.10989, and
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv:2411.09009).
``token_logprobs_from_logits`` avoids the log-softmax and one-hot copies when the logits already
exist (the ``[N, V]`` logits gradient itself is unavoidable there).

Half-precision inputs (bfloat16/float16): matrix products run in the input dtype; the softmax,
entropy and the accumulation of ``dL/dW`` and ``dL/db`` over chunks run in float32, and the
returned log-probs and entropy are float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from skyrl_fn.core._checks import as_mask, check_floating, check_tensor
from skyrl_fn.ops._linear_logprob import _acc_dtype, _chunk_grad, _chunk_stats, _LinearLogProb, _row_chunks

__all__ = [
    "LogProbsAndEntropy",
    "token_logprobs_from_logits",
    "token_logprobs_from_hidden",
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_KEEP_BYTES",
]

# One chunk of logits holds about this many elements (64 MiB in float32, 524 rows at V = 32,000).
# Time hardly depends on it (chunks of 256 to 4096 rows were within 6 % of each other); smaller
# chunks make ``keep_bytes`` finer-grained.
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# Bytes of forward softmax chunks ``token_logprobs_from_hidden`` keeps for backward, whose rows
# then skip the recomputation (one [C, H] x [H, V] product each). On bench/logprobs.py
# (N=8192, V=32000, H=256) 448 MiB keeps 7 of 16 chunks and peak memory is about 15 % of the
# naive path's.
DEFAULT_KEEP_BYTES = 448 << 20


class LogProbsAndEntropy(NamedTuple):
    """Selected-token log-probs and entropy, both shaped like ``targets`` ([N] or [B, T])."""

    log_probs: torch.Tensor
    entropy: torch.Tensor


def _resolve_chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size}")
    return chunk_size


def _resolve_keep(keep_bytes: int | None) -> int:
    if keep_bytes is None:
        return DEFAULT_KEEP_BYTES
    if isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int):
        raise TypeError(f"keep_bytes: expected a non-negative int or None, got {type(keep_bytes).__name__}")
    if keep_bytes < 0:
        raise ValueError(f"keep_bytes: expected a non-negative int or None, got {keep_bytes}")
    return keep_bytes


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a positive float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a positive finite float, got {temperature}")
    return float(temperature)


def _check_targets(
    targets: torch.Tensor, lead: tuple[int, ...], lead_names: str, vocab: int,
    ignore_index: int | None, mask: torch.Tensor | None, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flatten targets to [N] int64 and return them with the [N] valid-row mask (None if all valid)."""
    check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor of class indices, got {targets.dtype}")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead_names} = {lead}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets: expected device {device}, got {targets.device}")
    flat = targets.reshape(-1).long()
    valid = None
    if mask is not None:
        mask = as_mask("mask", mask)
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask: expected shape {lead_names} = {lead}, got {tuple(mask.shape)}")
        valid = mask.reshape(-1).to(device)
    if ignore_index is not None:
        kept = flat != ignore_index
        valid = kept if valid is None else valid & kept
    checked = flat if valid is None else flat[valid]
    bad = (checked < 0) | (checked >= vocab)
    if bool(bad.any()):
        value = int(checked[bad][0])
        pos = int(torch.nonzero((flat == value) if valid is None else (flat == value) & valid)[0, 0])
        allowed = f"[0, {vocab})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"targets: expected class indices in {allowed}, got {value} at flat position {pos}")
    if valid is not None and bool(valid.all()):
        valid = None
    return flat, valid


# ----------------------------------------------------------------------------------------------
# Shared forward loop


def _forward_pass(fill, blocks, targets, vocab, like, chunk, with_entropy):
    """Run ``_chunk_stats`` over ``blocks`` of ``(start, end, rows)``; ``fill(buf, rows)`` writes
    that block's logits into a reused ``[C, V]`` buffer. Returns ``(log p [N], lse [N], ent [N] | None)``."""
    n = targets.shape[0]
    acc = _acc_dtype(like.dtype)
    lse = torch.empty(n, dtype=acc, device=like.device)
    z_tgt = torch.empty_like(lse)
    ent = torch.empty_like(lse) if with_entropy else None
    buf = torch.empty(min(chunk, max(n, 1)), vocab, dtype=acc, device=like.device)
    scratch = torch.empty_like(buf) if with_entropy else None
    for s, e, rows in blocks:
        z = fill(buf[: e - s], rows)
        lse[s:e], z_tgt[s:e], ent_c, _ = _chunk_stats(z, targets[s:e], None if scratch is None else scratch[: e - s])
        if ent is not None:
            ent[s:e] = ent_c
    return z_tgt - lse, lse, ent


# ----------------------------------------------------------------------------------------------
# Fused linear + log-prob (+ entropy)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    keep_bytes: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | LogProbsAndEntropy:
    """Log-prob of each target token (and the entropy) from hidden states and the LM-head weight.

    A fused linear + log-softmax + gather that never materialises ``[N, V]``::

        z_i = (h_i W^T + b) / tau,   log p_i = z_i,y_i - logsumexp(z_i),   ent_i = -sum_v p_iv log p_iv

    Forward computes ``C`` rows of logits at a time and keeps ``lse [N]`` (and ``ent [N]``) plus,
    within ``keep_bytes``, the softmax chunks of the last ``K`` rows; backward uses those kept
    chunks, recomputes the other ``N - K`` rows chunk by chunk, and accumulates ``dL/dhidden``,
    ``dL/dweight`` and ``dL/dbias`` (formulas in the module docstring). Values and gradients equal
    ``log_softmax((hidden @ weight.T + bias) / tau).gather(-1, targets)`` up to rounding.
    Peak extra memory is about ``max(keep_bytes, one [C, V] chunk)`` (plus one chunk with
    entropy) and ``[V, H]`` for the weight gradient, against several ``[N, V]`` tensors for the
    naive path; the cost is an extra ``[N - K, H] x [H, V]`` product (the recomputation).

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` floating hidden states.
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[N]`` or ``[B, T]`` integer token ids in ``[0, V)``.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: rows per chunk ``C``; None picks ``DEFAULT_CHUNK_ELEMENTS // V`` (about
            64 MiB of float32 logits per chunk).
        keep_bytes: budget for forward chunks kept for backward (whole chunks of the last rows,
            ``K = keep_bytes // (V * 4)`` rows at most in float32); 0 recomputes every chunk,
            None picks ``DEFAULT_KEEP_BYTES`` (448 MiB). Nothing is kept when no input needs a
            gradient.
        temperature: ``tau > 0``, divides the logits (sampling temperature).
        with_entropy: also return the entropy of each row's distribution.
        ignore_index: rows whose target equals it get log-prob 0, entropy 0 and no gradient
            (None: no ignored value).
        mask: optional ``[N]`` / ``[B, T]`` bool (or 0/1) tensor; rows where it is False are
            treated like ignored rows, and their targets are not range-checked (padding).

    Returns:
        ``log_probs`` shaped like ``targets``, or ``LogProbsAndEntropy(log_probs, entropy)`` if
        ``with_entropy``; float32 for half-precision inputs, otherwise the input dtype.

    Raises:
        TypeError: non-tensor or non-floating ``hidden``/``weight``/``bias``, dtype mismatch,
            non-integer ``targets``, bad ``chunk_size``/``keep_bytes``/``temperature`` types.
        ValueError: shape or device mismatch, targets out of range, ``chunk_size < 1``,
            ``keep_bytes < 0``, ``temperature <= 0``.
    """
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape [V, H] with H = {hidden.shape[-1]} (from hidden), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (as hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device} (as hidden), got {weight.device}")
    v = weight.shape[0]
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias: expected shape [V] = ({v},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias: expected {hidden.dtype} on {hidden.device} (as hidden), got {bias.dtype} on {bias.device}")
    lead = tuple(hidden.shape[:-1])
    names = "[N]" if len(lead) == 1 else "[B, T]"
    inv_t = 1.0 / _check_temperature(temperature)
    chunk = _resolve_chunk(chunk_size, v)
    keep = _resolve_keep(keep_bytes)
    flat_t, valid = _check_targets(targets, lead, names, v, ignore_index, mask, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if valid is not None:  # compute only the kept rows; autograd scatters their gradient back
        idx = torch.nonzero(valid).squeeze(1)
        h, flat_t = h.index_select(0, idx), flat_t.index_select(0, idx)
    out = _LinearLogProb.apply(h, weight, bias, flat_t, chunk, inv_t, bool(with_entropy), keep)
    return _finish(out, valid, lead, bool(with_entropy))


def _finish(out, valid, lead, with_entropy):
    outs = out if with_entropy else (out,)
    if valid is not None:
        idx = torch.nonzero(valid).squeeze(1)
        outs = tuple(
            torch.zeros(valid.shape[0], dtype=o.dtype, device=o.device).index_put((idx,), o) for o in outs
        )
    outs = tuple(o.reshape(lead) for o in outs)
    return LogProbsAndEntropy(*outs) if with_entropy else outs[0]


# ----------------------------------------------------------------------------------------------
# From existing logits


def _logit_blocks(logits: torch.Tensor, chunk: int):
    """Yield ``(start, end, index)``: flat rows ``[start, end)`` are ``logits[index]`` ([C, V]).

    ``logits`` is ``[N, V]`` or a ``[B, T, V]`` that cannot be viewed as ``[N, V]`` (e.g. the
    slice ``logits[:, :-1]``); the latter is walked sequence by sequence so it is never copied.
    """
    if logits.dim() == 2:
        for s, e in _row_chunks(0, logits.shape[0], chunk):
            yield s, e, (slice(s, e),)
        return
    t = logits.shape[1]
    for b in range(logits.shape[0]):
        for s, e in _row_chunks(0, t, chunk):
            yield b * t + s, b * t + e, (b, slice(s, e))


class _LogitsLogProb(torch.autograd.Function):
    """``logits [N, V]`` (or strided ``[B, T, V]``), ``targets [N]`` -> log p [N] (, ent [N])."""

    @staticmethod
    def forward(ctx, logits, targets, chunk, inv_temp, with_entropy):

        def fill(out, rows):
            out.copy_(logits[rows])
            return out.mul_(inv_temp) if inv_temp != 1.0 else out

        blocks = _logit_blocks(logits, chunk)
        lp, lse, ent = _forward_pass(fill, blocks, targets, logits.shape[-1], logits, chunk, with_entropy)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.chunk, ctx.inv_temp = chunk, inv_temp
        ctx.set_materialize_grads(False)
        return (lp, ent) if with_entropy else lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        logits, targets, lse, ent = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return None, None, None, None, None
        v = logits.shape[-1]
        acc, inv_t = lse.dtype, ctx.inv_temp
        g_lp = None if g_lp is None else g_lp.to(acc) * inv_t
        g_ent = None if g_ent is None else g_ent.to(acc) * inv_t
        grad_logits = torch.empty_like(logits)
        half = acc != logits.dtype
        c = min(ctx.chunk, max(targets.shape[0], 1))
        buf = torch.empty(c, v, dtype=acc, device=logits.device) if half else None
        scratch = torch.empty(c, v, dtype=acc, device=logits.device) if g_ent is not None else None
        for s, e, rows in _logit_blocks(logits, c):
            # Work directly in the output slice when dtypes agree (no extra chunk buffer).
            z = buf[: e - s] if half else grad_logits[rows]
            z.copy_(logits[rows])
            if inv_t != 1.0:
                z.mul_(inv_t)
            grad = _chunk_grad(
                z, targets[s:e], lse[s:e], None if g_lp is None else g_lp[s:e],
                None if ent is None else ent[s:e], None if g_ent is None else g_ent[s:e],
                None if scratch is None else scratch[: e - s],
            )
            if half:
                grad_logits[rows] = grad
        return grad_logits, None, None, None, None


def token_logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | LogProbsAndEntropy:
    """Log-prob of each target token (and the entropy) from logits, chunked over rows.

    ::

        z_i = logits_i / tau,   log p_i = z_i,y_i - logsumexp(z_i),   ent_i = -sum_v p_iv log p_iv

    Equals ``log_softmax(logits / tau).gather(-1, targets)`` in value and gradient, without the
    ``[N, V]`` log-softmax output or the ``[N, V]`` one-hot gradient of ``gather``: forward keeps
    ``lse [N]`` (and ``ent [N]``), backward writes ``dL/dlogits`` chunk by chunk.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]`` floating logits.
        targets: ``[N]`` or ``[B, T]`` integer token ids in ``[0, V)``.
        chunk_size: rows per chunk ``C``; None picks ``DEFAULT_CHUNK_ELEMENTS // V``.
        temperature: ``tau > 0``, divides the logits.
        with_entropy: also return the entropy of each row's distribution.
        ignore_index: rows whose target equals it get log-prob 0, entropy 0 and no gradient.
        mask: optional ``[N]`` / ``[B, T]`` bool (or 0/1); False rows are treated as ignored.

    Returns:
        ``log_probs`` shaped like ``targets``, or ``LogProbsAndEntropy(log_probs, entropy)``;
        float32 for half-precision logits, otherwise the logits dtype.

    Raises:
        TypeError: non-floating ``logits``, non-integer ``targets``, bad argument types.
        ValueError: shape or device mismatch, targets out of range, bad ``chunk_size`` or
            ``temperature`` values.
    """
    check_floating("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape [N, V] or [B, T, V], got {tuple(logits.shape)}")
    v = logits.shape[-1]
    lead = tuple(logits.shape[:-1])
    names = "[N]" if len(lead) == 1 else "[B, T]"
    inv_t = 1.0 / _check_temperature(temperature)
    chunk = _resolve_chunk(chunk_size, v)
    flat_t, valid = _check_targets(targets, lead, names, v, ignore_index, mask, logits.device)
    try:
        z = logits.view(-1, v)
    except RuntimeError:  # a strided [B, T, V] slice: walk it per sequence rather than copy it
        z = logits
    if valid is not None:
        # Keep the full logits (no [N_kept, V] copy); point ignored rows at class 0 and drop them below.
        flat_t = torch.where(valid, flat_t, 0)
    out = _LogitsLogProb.apply(z, flat_t, chunk, inv_t, bool(with_entropy))
    outs = out if with_entropy else (out,)
    if valid is not None:
        outs = tuple(torch.where(valid, o, 0) for o in outs)
    outs = tuple(o.reshape(lead) for o in outs)
    return LogProbsAndEntropy(*outs) if with_entropy else outs[0]
