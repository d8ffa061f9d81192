"""Chunk kernels and the fused linear + log-prob (+ entropy) autograd function.

Private: ``skyrl_fn.ops.logprobs`` validates the inputs and re-exports the public functions;
the math and notation (``N`` rows, ``H`` hidden, ``V`` vocabulary, ``C`` rows per chunk) are in
its module docstring.

Backward without forming ``dL/dz``. For log-probs alone (``g_i`` the upstream gradient, already
divided by ``tau``) the logits gradient is a one-hot term plus a row-scaled softmax::

    dL/dlogits_i = g_i onehot(y_i) + r_i e_i,    e_i = exp(z_i - m_i),  r_i = -g_i / s_i

with ``s_i = sum_v e_iv``. So ``dL/dh_c = r * (E_c W) + g * W[y_c]`` and
``dL/dW += E_c^T (r * h_c) + index_add(y_c, g * h_c)``: two matrix products on the
``[C, V]`` tensor ``E_c`` and only ``[C, H]`` work besides (no elementwise pass over ``[C, V]``).
"""

from __future__ import annotations

import torch

# Far below any log-prob whose exp is nonzero (float64 underflows at about -745).
_LOG_FLOOR = -1.0e4


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _row_chunks(start: int, end: int, chunk: int):
    for s in range(start, end, chunk):
        yield s, min(s + chunk, end)


def _chunk_stats(
    z: torch.Tensor, tgt: torch.Tensor, scratch: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """From logits ``z [C, V]`` return ``(lse [C], z_target [C], ent [C] or None, log s [C])``.

    ``z`` is overwritten: with ``e = exp(z - m)`` when ``scratch`` is None, otherwise (entropy)
    with ``z - m`` clamped at ``_LOG_FLOOR`` (``scratch [C, V]``, same layout as ``z``, is
    clobbered); ``m`` is the row max and ``s = sum_v e``.
    """
    z_tgt = z.gather(1, tgt[:, None]).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of all -inf stays -inf
    z.sub_(m)
    if scratch is None:
        log_s = z.exp_().sum(dim=1).log_()
        return log_s + m.squeeze(1), z_tgt, None, log_s
    z.clamp_min_(_LOG_FLOOR)  # -inf logits (masked vocabulary): e = 0 and e * z = 0, not NaN
    e = torch.exp(z, out=scratch)
    s = e.sum(dim=1)
    ez = e.mul_(z).sum(dim=1)  # sum_v e_v (z_v - m); scratch is not needed afterwards
    log_s = s.log()
    return log_s + m.squeeze(1), z_tgt, log_s - ez / s, log_s


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


def _chunk_view(flat: torch.Tensor, rows: int, v: int) -> torch.Tensor:
    """A ``[rows, V]`` view of the start of the 1-D buffer ``flat`` (a reusable chunk buffer).

    (Writing ``W h_c^T`` vocabulary-major, ``[V, C]``, made the product ~10 % faster on CPU but
    the row reductions 3-4x slower: a whole chunk was 4 % slower, so rows stay contiguous.)
    """
    return flat[: rows * v].view(rows, v)


def _logits_into(out, h_c, weight, bias, inv_temp, half):
    """``out [C, V] = (h_c W^T + b) * inv_temp`` in the accumulation dtype."""
    if half:
        out.copy_(h_c @ weight.T if bias is None else torch.addmm(bias, h_c, weight.T))
    elif bias is None:
        torch.mm(h_c, weight.T, out=out)
    else:
        torch.addmm(bias, h_c, weight.T, out=out)
    if inv_temp != 1.0:
        out.mul_(inv_temp)
    return out


def _keeps_graph() -> bool:
    """Whether the running backward was asked to retain the graph (True if torch cannot say)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


class _Grads:
    """Gradient accumulators of one backward call and the two ways of feeding them a chunk."""

    def __init__(self, hidden, weight, bias, needs, acc, half):
        need_h, need_w, need_b = needs
        self.hidden, self.weight, self.acc, self.half = hidden, weight, acc, half
        self.h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_b and bias is not None) else None

    def add_dense(self, s, e, grad):
        """Rows ``[s, e)`` with ``dL/dlogits = grad [C, V]``."""
        h_c, w = self.hidden[s:e], self.weight
        if self.h is not None:
            if self.half:
                self.h[s:e] = grad.to(w.dtype) @ w
            else:
                torch.mm(grad, w, out=self.h[s:e])
        if self.w is not None:
            self.w.addmm_(grad.T, h_c.to(self.acc) if self.half else h_c)
        if self.b is not None:
            self.b += grad.sum(dim=0)

    def add_scaled(self, s, e, ex, r, g, tgt):
        """Rows ``[s, e)`` with ``dL/dlogits = g onehot(tgt) + r[:, None] * ex`` (``ex [C, V]``)."""
        h_c, w, acc = self.hidden[s:e], self.weight, self.acc
        if self.h is not None:
            w_tgt = w.index_select(0, tgt)
            if self.half:
                prod = (ex.to(w.dtype) @ w).to(acc).mul_(r[:, None])
                self.h[s:e] = prod.addcmul_(w_tgt.to(acc), g[:, None])
            else:
                out = torch.mm(ex, w, out=self.h[s:e])
                out.mul_(r[:, None]).addcmul_(w_tgt, g[:, None])
        if self.w is not None:
            h_acc = h_c.to(acc)
            self.w.addmm_(ex.T, h_acc * r[:, None])
            self.w.index_put_((tgt,), h_acc * g[:, None], accumulate=True)  # far faster than index_add_ on CPU
        if self.b is not None:
            self.b.addmv_(ex.T, r)
            self.b.index_put_((tgt,), g, accumulate=True)

    def result(self, bias):
        w = None if self.w is None else self.w.to(self.weight.dtype)
        b = None if self.b is None else self.b.to(bias.dtype)
        return self.h, w, b


class _LinearLogProb(torch.autograd.Function):
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, ``targets [N]`` -> log p [N] (, ent [N]).

    The last ``K <= keep_bytes // (V * itemsize)`` rows (whole chunks) keep their forward chunk (``e``,
    or ``z - m`` with entropy) for backward, which then skips their recomputation; rows
    ``[0, N - K)`` are recomputed chunk by chunk. Kept chunks live on ``ctx`` (not
    ``save_for_backward``) so backward can free each one as soon as it is used.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, inv_temp, with_entropy, keep_bytes):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        half = acc != hidden.dtype
        row_bytes = max(v, 1) * torch.finfo(acc).bits // 8
        keep = min(n, keep_bytes // row_bytes) if any(ctx.needs_input_grad[:3]) else 0
        cut = min(n, -(-(n - keep) // chunk) * chunk)  # kept rows [cut, N) start on a chunk edge
        new = lambda rows: torch.empty(rows * v, dtype=acc, device=hidden.device)  # noqa: E731
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        z_tgt = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        scratch = new(min(chunk, max(n, 1))) if with_entropy else None
        buf = new(min(chunk, cut)) if cut else None
        kept = []
        for s, e in _row_chunks(0, n, chunk):
            if s < cut:
                out = buf
            else:  # a kept chunk: hand over the working buffer once, then fresh buffers
                out = buf if buf is not None and buf.numel() == (e - s) * v else new(e - s)
                buf = None
            z = _logits_into(_chunk_view(out, e - s, v), hidden[s:e], weight, bias, inv_temp, half)
            sc = None if scratch is None else _chunk_view(scratch, e - s, v)
            lse[s:e], z_tgt[s:e], ent_c, log_s = _chunk_stats(z, targets[s:e], sc)
            if ent is not None:
                ent[s:e] = ent_c
            if s >= cut:
                kept.append((s, e, z, log_s))
            out = z = None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.kept, ctx.cut = kept, cut
        ctx.chunk, ctx.inv_temp, ctx.half, ctx.with_entropy = chunk, inv_temp, half, with_entropy
        ctx.set_materialize_grads(False)
        return (z_tgt - lse, ent) if with_entropy else z_tgt - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        kept = list(ctx.kept)
        if not _keeps_graph():
            ctx.kept = None  # freed as backward goes rather than when the graph dies
        if g_lp is None and g_ent is None:
            return (None,) * 8
        n, v = hidden.shape[0], weight.shape[0]
        acc, half, inv_t, cut = lse.dtype, ctx.half, ctx.inv_temp, ctx.cut
        # Fold 1/tau into the per-row upstream gradients: dL/dlogits = (dL/dz) / tau.
        g_lp = None if g_lp is None else g_lp.to(acc) * inv_t
        g_ent = None if g_ent is None else g_ent.to(acc) * inv_t
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3], acc, half)
        c = min(ctx.chunk, max(n, 1))
        new = lambda rows: torch.empty(rows * v, dtype=acc, device=hidden.device)  # noqa: E731
        scratch = new(c) if g_ent is not None else None

        def dense(s, e, z, lse_c):  # z: logits minus some row shift, lse_c: lse minus that shift
            grad = _chunk_grad(z, targets[s:e], lse_c, None if g_lp is None else g_lp[s:e], ent[s:e], g_ent[s:e],
                               None if scratch is None else _chunk_view(scratch, e - s, v))
            grads.add_dense(s, e, grad)

        # Without retain_graph the kept chunks are ours to overwrite and free one by one; with it
        # they are only read (a copy is overwritten) so a second backward finds them intact.
        reuse = not _keeps_graph()
        buf = None

        def writable(z):
            nonlocal buf
            if reuse:
                return z
            if buf is None:
                buf = new(c)
            return _chunk_view(buf, z.shape[0], v).copy_(z)

        while kept:  # kept chunks first (last rows first)
            s, e, z, log_s = kept.pop()
            if ctx.with_entropy:  # the entropy forward stored z - m
                z = writable(z)
                if g_ent is not None:
                    dense(s, e, z, log_s)
                else:
                    z.exp_()
            if g_ent is None:  # z holds e = exp(z - m): dL/dlogits = g onehot - (g / s) e
                grads.add_scaled(s, e, z, -g_lp[s:e] * torch.exp(-log_s), g_lp[s:e], targets[s:e])
            if reuse and z.shape[0] == min(c, cut):
                buf = z.view(-1)  # its storage becomes the working buffer
            z = None
        if cut and buf is None:
            buf = new(min(c, cut))
        for s, e in _row_chunks(0, cut, c):
            z = _logits_into(_chunk_view(buf, e - s, v), hidden[s:e], weight, bias, inv_t, half)
            if g_ent is not None:
                dense(s, e, z, lse[s:e])
            else:
                p = z.sub_(lse[s:e, None]).exp_()
                grads.add_scaled(s, e, p, -g_lp[s:e], g_lp[s:e], targets[s:e])
        return grads.result(bias) + (None,) * 5
