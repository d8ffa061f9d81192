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
``token_logprobs_from_hidden`` never holds more than one ``[C, V]`` chunk (two with entropy):
forward keeps only ``lse [N]`` (and ``ent [N]``) and backward recomputes each chunk's logits
(the fused linear + cross-entropy idea of Liger-Kernel, Hsu et al. 2024, arXiv:2410.10989, and
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

from skyrl_fn._checks import as_mask, check_floating, check_tensor

__all__ = [
    "LogProbsAndEntropy",
    "token_logprobs_from_logits",
    "token_logprobs_from_hidden",
    "DEFAULT_CHUNK_ELEMENTS",
]

# One chunk of logits holds about this many elements (128 MiB in float32). On bench/logprobs.py
# (N=8192, V=32000, H=256, CPU) this gives 6 % of the naive peak memory; time hardly depends on
# it (chunks of 256 to 4096 rows were within 6 % of each other).
DEFAULT_CHUNK_ELEMENTS = 1 << 25


# Far below any log-prob whose exp is nonzero (float64 underflows at about -745).
_LOG_FLOOR = -1.0e4


class LogProbsAndEntropy(NamedTuple):
    """Selected-token log-probs and entropy, both shaped like ``targets`` ([N] or [B, T])."""

    log_probs: torch.Tensor
    entropy: torch.Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _resolve_chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size}")
    return chunk_size


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
# Per-chunk kernels shared by both paths. ``z`` is a [C, V] accumulation-dtype buffer we own.


def _chunk_stats(
    z: torch.Tensor, tgt: torch.Tensor, scratch: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From logits ``z [C, V]`` (destroyed) return ``(lse [C], z_target [C], ent [C] or None)``.

    ``scratch [C, V]`` is needed only for entropy.
    """
    z_tgt = z.gather(1, tgt[:, None]).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of all -inf stays -inf
    z.sub_(m)
    if scratch is None:
        s = z.exp_().sum(dim=1)
        return s.log_().add_(m.squeeze(1)), z_tgt, None
    z.clamp_min_(_LOG_FLOOR)  # -inf logits (masked vocabulary): e = 0 and e * z = 0, not NaN
    e = torch.exp(z, out=scratch)
    s = e.sum(dim=1)
    # sum_v e_v (z_v - m), as a batched dot product so no third [C, V] tensor is made.
    ez = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).reshape(-1)
    log_s = s.log()
    return log_s + m.squeeze(1), z_tgt, log_s - ez / s


def _chunk_grad(
    z: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor, g_lp: torch.Tensor | None,
    ent: torch.Tensor | None, g_ent: torch.Tensor | None, scratch: torch.Tensor | None,
) -> torch.Tensor:
    """Turn logits ``z [C, V]`` (in place) into ``dL/dz [C, V]``; ``g_lp``/``g_ent`` are [C] or None."""
    z.sub_(lse[:, None])  # log p
    if g_ent is None:
        grad = z.exp_().mul_(-g_lp[:, None])  # -g p
    else:
        z.clamp_min_(_LOG_FLOOR)  # p = 0 there; keeps p * (log p + ent) at 0 rather than NaN
        p = torch.exp(z, out=scratch)
        # -p (e (log p + ent) + g)  ==  dL/dz off the target column
        coef = z.add_(ent[:, None]).mul_(g_ent[:, None])
        if g_lp is not None:
            coef.add_(g_lp[:, None])
        grad = coef.mul_(p).neg_()
    if g_lp is not None:
        grad.scatter_add_(1, tgt[:, None], g_lp[:, None].to(grad.dtype))
    return grad


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


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
        lse[s:e], z_tgt[s:e], ent_c = _chunk_stats(z, targets[s:e], None if scratch is None else scratch[: e - s])
        if ent is not None:
            ent[s:e] = ent_c
    return z_tgt - lse, lse, ent


# ----------------------------------------------------------------------------------------------
# Fused linear + log-prob (+ entropy)


class _LinearLogProb(torch.autograd.Function):
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``targets [N]`` -> log p [N] (, ent [N])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, inv_temp, with_entropy):
        half = _acc_dtype(hidden.dtype) != hidden.dtype
        blocks = ((s, e, (slice(s, e),)) for s, e in _row_chunks(hidden.shape[0], chunk))
        fill = lambda out, rows: _logits_into(out, hidden[rows], weight, bias, inv_temp, half)  # noqa: E731
        lp, lse, ent = _forward_pass(fill, blocks, targets, weight.shape[0], hidden, chunk, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.chunk, ctx.inv_temp, ctx.half = chunk, inv_temp, half
        ctx.set_materialize_grads(False)
        return (lp, ent) if with_entropy else lp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, v = hidden.shape[0], weight.shape[0]
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None, None
        acc, half, inv_t = lse.dtype, ctx.half, ctx.inv_temp
        # Fold 1/tau into the per-row upstream gradients: dL/dlogits = (dL/dz) / tau.
        g_lp = None if g_lp is None else g_lp.to(acc) * inv_t
        g_ent = None if g_ent is None else g_ent.to(acc) * inv_t
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        c = min(ctx.chunk, max(n, 1))
        buf = torch.empty(c, v, dtype=acc, device=hidden.device)
        scratch = torch.empty_like(buf) if g_ent is not None else None
        for s, e in _row_chunks(n, c):
            h_c = hidden[s:e]
            z = _logits_into(buf[: e - s], h_c, weight, bias, inv_t, half)
            grad = _chunk_grad(
                z, targets[s:e], lse[s:e], None if g_lp is None else g_lp[s:e],
                None if ent is None else ent[s:e], None if g_ent is None else g_ent[s:e],
                None if scratch is None else scratch[: e - s],
            )
            if grad_h is not None:
                if half:
                    grad_h[s:e] = grad.to(weight.dtype) @ weight
                else:
                    torch.mm(grad, weight, out=grad_h[s:e])
            if grad_w is not None:
                grad_w.addmm_(grad.T, h_c.to(acc) if half else h_c)
            if grad_b is not None:
                grad_b += grad.sum(dim=0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _logits_into(out, h_c, weight, bias, inv_temp, half):
    """``out [C, V] = (h_c W^T + b) * inv_temp`` in the accumulation dtype."""
    if half:
        z = h_c @ weight.T if bias is None else torch.addmm(bias, h_c, weight.T)
        out.copy_(z)
    elif bias is None:
        torch.mm(h_c, weight.T, out=out)
    else:
        torch.addmm(bias, h_c, weight.T, out=out)
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return out


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | LogProbsAndEntropy:
    """Log-prob of each target token (and the entropy) from hidden states and the LM-head weight.

    A fused linear + log-softmax + gather that never materialises ``[N, V]``::

        z_i = (h_i W^T + b) / tau,   log p_i = z_i,y_i - logsumexp(z_i),   ent_i = -sum_v p_iv log p_iv

    Forward computes ``C`` rows of logits at a time and keeps only ``lse [N]`` (and ``ent [N]``);
    backward recomputes each chunk and accumulates ``dL/dhidden``, ``dL/dweight`` and
    ``dL/dbias`` (formulas in the module docstring). Values and gradients equal
    ``log_softmax((hidden @ weight.T + bias) / tau).gather(-1, targets)`` up to rounding.
    Peak extra memory is one ``[C, V]`` chunk (two with entropy) plus ``[V, H]`` for the weight
    gradient, against several ``[N, V]`` tensors for the naive path; the cost is one extra
    ``[N, H] x [H, V]`` matrix product (the recomputation in backward).

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` floating hidden states.
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[N]`` or ``[B, T]`` integer token ids in ``[0, V)``.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: rows per chunk ``C``; None picks ``DEFAULT_CHUNK_ELEMENTS // V`` (about
            128 MiB of float32 logits per chunk).
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
            non-integer ``targets``, bad ``chunk_size``/``temperature`` types.
        ValueError: shape or device mismatch, targets out of range, ``chunk_size < 1``,
            ``temperature <= 0``.
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
    flat_t, valid = _check_targets(targets, lead, names, v, ignore_index, mask, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    if valid is not None:  # compute only the kept rows; autograd scatters their gradient back
        idx = torch.nonzero(valid).squeeze(1)
        h, flat_t = h.index_select(0, idx), flat_t.index_select(0, idx)
    out = _LinearLogProb.apply(h, weight, bias, flat_t, chunk, inv_t, bool(with_entropy))
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
        for s, e in _row_chunks(logits.shape[0], chunk):
            yield s, e, (slice(s, e),)
        return
    t = logits.shape[1]
    for b in range(logits.shape[0]):
        for s, e in _row_chunks(t, chunk):
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
