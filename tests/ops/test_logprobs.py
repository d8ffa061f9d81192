"""Chunked log-probs / entropy equal the naive ``log_softmax(h @ W.T).gather`` in value and gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.ops import logprobs as lpmod
from skyrl_fn.ops.logprobs import (
    LogProbsAndEntropy,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)

F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-4, atol=1e-5)


def naive(logits, targets, temperature=1.0):
    """Reference: full [N, V] log-softmax, gather, and entropy."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0)).sum(-1)
    return lp, ent


def make(n, h, v, dtype=torch.float64, seed=0, lead=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    hidden = (torch.randn(*shape, h, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * h**-0.5).to(dtype).requires_grad_()
    bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, v, shape, generator=g)
    up_lp = torch.randn(shape, generator=g, dtype=torch.float64)
    up_ent = torch.randn(shape, generator=g, dtype=torch.float64)
    return hidden, weight, bias, targets, up_lp, up_ent


def grads(out_lp, out_ent, up_lp, up_ent, inputs):
    loss = (out_lp * up_lp.to(out_lp.dtype)).sum()
    if out_ent is not None:
        loss = loss + (out_ent * up_ent.to(out_ent.dtype)).sum()
    return torch.autograd.grad(loss, inputs)


def assert_close_all(got, want, tol):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


# -- fused linear path ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 17, 100, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("use_bias", [False, True])
def test_hidden_matches_naive_float64(chunk_size, temperature, use_bias):
    hidden, weight, bias, targets, up_lp, up_ent = make(17, 6, 29, seed=chunk_size or 0)
    b = bias if use_bias else None
    inputs = (hidden, weight) + ((bias,) if use_bias else ())
    logits = hidden @ weight.T + (bias if use_bias else 0)
    want_lp, want_ent = naive(logits, targets, temperature)
    out = token_logprobs_from_hidden(
        hidden, weight, targets, bias=b, chunk_size=chunk_size, temperature=temperature, with_entropy=True
    )
    assert isinstance(out, LogProbsAndEntropy)
    torch.testing.assert_close(out.log_probs, want_lp, **F64)
    torch.testing.assert_close(out.entropy, want_ent, **F64)
    got = grads(out.log_probs, out.entropy, up_lp, up_ent, inputs)
    want = grads(want_lp, want_ent, up_lp, up_ent, inputs)
    assert_close_all(got, want, F64)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_hidden_log_probs_only_and_one_row(chunk_size):
    for n in (1, 11):
        hidden, weight, bias, targets, up_lp, _ = make(n, 4, 13, seed=n)
        lp = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=chunk_size)
        assert isinstance(lp, torch.Tensor) and lp.shape == (n,)
        want_lp, _ = naive(hidden @ weight.T, targets)
        torch.testing.assert_close(lp, want_lp, **F64)
        assert_close_all(grads(lp, None, up_lp, None, (hidden, weight)),
                         grads(want_lp, None, up_lp, None, (hidden, weight)), F64)


def test_hidden_float32_bigger_vocab():
    hidden, weight, bias, targets, up_lp, up_ent = make(96, 32, 3001, dtype=torch.float32, scale=2.0)
    inputs = (hidden, weight, bias)
    want_lp, want_ent = naive(hidden @ weight.T + bias, targets, 0.9)
    out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=40, temperature=0.9,
                                     with_entropy=True)
    torch.testing.assert_close(out.log_probs, want_lp, **F32)
    torch.testing.assert_close(out.entropy, want_ent, **F32)
    assert_close_all(grads(*out, up_lp, up_ent, inputs), grads(want_lp, want_ent, up_lp, up_ent, inputs), F32)


def test_hidden_batched_shape_equals_flat():
    hidden, weight, _, targets, up_lp, up_ent = make(0, 5, 11, lead=(3, 4))
    out = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=5, with_entropy=True)
    assert out.log_probs.shape == (3, 4) and out.entropy.shape == (3, 4)
    flat = token_logprobs_from_hidden(hidden.reshape(12, 5), weight, targets.reshape(12), with_entropy=True)
    torch.testing.assert_close(out.log_probs.reshape(12), flat.log_probs, **F64)
    torch.testing.assert_close(out.entropy.reshape(12), flat.entropy, **F64)


def test_entropy_only_and_log_probs_only_gradients():
    """Only one of the two outputs reaches the loss: the other gets no gradient (None upstream)."""
    hidden, weight, _, targets, up_lp, up_ent = make(9, 4, 10)
    want_lp, want_ent = naive(hidden @ weight.T, targets, 1.3)
    out = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=4, temperature=1.3, with_entropy=True)
    got = torch.autograd.grad((out.entropy * up_ent).sum(), (hidden, weight), retain_graph=True)
    assert_close_all(got, torch.autograd.grad((want_ent * up_ent).sum(), (hidden, weight), retain_graph=True), F64)
    got = torch.autograd.grad((out.log_probs * up_lp).sum(), (hidden, weight))
    assert_close_all(got, torch.autograd.grad((want_lp * up_lp).sum(), (hidden, weight)), F64)


def test_gradcheck_hidden_weight_bias():
    hidden, weight, bias, targets, _, _ = make(5, 3, 7, seed=3)
    fn = lambda h, w, b: tuple(  # noqa: E731
        token_logprobs_from_hidden(h, w, targets, bias=b, chunk_size=2, temperature=0.8, with_entropy=True)
    )
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    fn_lp = lambda h, w: token_logprobs_from_hidden(h, w, targets, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn_lp, (hidden, weight))


def test_saves_no_n_by_v_tensor():
    """Autograd keeps only [N, H], [V, H], [V], [N]-sized tensors: never a [N, V] one."""
    n, h, v = 64, 4, 50
    hidden, weight, bias, targets, _, _ = make(n, h, v)
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=8, with_entropy=True)
    assert sizes and max(sizes) <= max(n * h, v * h)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    # The naive path does keep one (sanity check that the hook sees saved tensors).
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive(hidden @ weight.T, targets)
    assert max(sizes) >= n * v


def test_mask_and_ignore_index():
    hidden, weight, bias, targets, up_lp, up_ent = make(10, 4, 12, seed=5)
    targets = targets.clone()
    targets[2] = -100
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 7]] = False
    targets[7] = 999  # padding under the mask: never range-checked
    keep = mask & (targets != -100)
    out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=3, with_entropy=True,
                                     mask=mask.long())
    assert torch.all(out.log_probs[~keep] == 0) and torch.all(out.entropy[~keep] == 0)
    want_lp, want_ent = naive(hidden[keep] @ weight.T + bias, targets[keep])
    torch.testing.assert_close(out.log_probs[keep], want_lp, **F64)
    torch.testing.assert_close(out.entropy[keep], want_ent, **F64)
    got = grads(*out, up_lp, up_ent, (hidden, weight, bias))
    assert torch.all(got[0][~keep] == 0)
    want = torch.autograd.grad(
        (want_lp * up_lp[keep]).sum() + (want_ent * up_ent[keep]).sum(), (hidden, weight, bias)
    )
    assert_close_all(got, want, F64)


def test_bfloat16_accumulates_in_float32():
    hidden, weight, bias, targets, up_lp, up_ent = make(24, 16, 300, dtype=torch.bfloat16)
    out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=7, with_entropy=True)
    assert out.log_probs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    ref = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    want_lp, want_ent = naive(ref[0] @ ref[1].T + ref[2], targets)
    torch.testing.assert_close(out.log_probs, want_lp, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.entropy, want_ent, rtol=2e-2, atol=5e-2)
    got = grads(*out, up_lp, up_ent, (hidden, weight, bias))
    want = grads(want_lp, want_ent, up_lp, up_ent, ref)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_inputs_not_mutated_and_no_grad_inference():
    hidden, weight, bias, targets, _, _ = make(8, 4, 9)
    before = [t.detach().clone() for t in (hidden, weight, bias, targets)]
    with torch.no_grad():
        lp = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=3)
    assert not lp.requires_grad
    for a, b in zip((hidden, weight, bias, targets), before):
        assert torch.equal(a.detach(), b)


@given(
    n=st.integers(1, 12), v=st.integers(1, 20), h=st.integers(1, 5), chunk=st.integers(1, 14),
    tau=st.floats(0.25, 4.0), seed=st.integers(0, 2**16),
)
def test_property_hidden_equals_naive(n, v, h, chunk, tau, seed):
    hidden, weight, bias, targets, up_lp, up_ent = make(n, h, v, seed=seed, scale=3.0)
    want_lp, want_ent = naive(hidden @ weight.T + bias, targets, tau)
    out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=chunk, temperature=tau,
                                     with_entropy=True)
    torch.testing.assert_close(out.log_probs, want_lp, **F64)
    torch.testing.assert_close(out.entropy, want_ent, **F64)
    inputs = (hidden, weight, bias)
    assert_close_all(grads(*out, up_lp, up_ent, inputs), grads(want_lp, want_ent, up_lp, up_ent, inputs), F64)


# -- logits path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 13, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_logits_matches_naive(chunk_size, temperature, dtype, tol):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(13, 31, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 31, (13,), generator=g)
    up_lp, up_ent = torch.randn(13, generator=g, dtype=dtype), torch.randn(13, generator=g, dtype=dtype)
    out = token_logprobs_from_logits(logits, targets, chunk_size=chunk_size, temperature=temperature,
                                     with_entropy=True)
    want_lp, want_ent = naive(logits, targets, temperature)
    torch.testing.assert_close(out.log_probs, want_lp, **tol)
    torch.testing.assert_close(out.entropy, want_ent, **tol)
    assert_close_all(grads(*out, up_lp, up_ent, (logits,)), grads(want_lp, want_ent, up_lp, up_ent, (logits,)), tol)


def test_logits_strided_batch_slice_and_gradcheck():
    """``logits[:, :-1]`` cannot be viewed as [N, V]; it is walked per sequence, not copied."""
    g = torch.Generator().manual_seed(2)
    full = torch.randn(3, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 8, (3, 5), generator=g)
    out = token_logprobs_from_logits(full[:, :-1], targets, chunk_size=2, with_entropy=True)
    want_lp, want_ent = naive(full[:, :-1], targets)
    torch.testing.assert_close(out.log_probs, want_lp, **F64)
    torch.testing.assert_close(out.entropy, want_ent, **F64)
    up = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out.log_probs * up).sum() + out.entropy.sum(), full)[0]
    want = torch.autograd.grad((want_lp * up).sum() + want_ent.sum(), full)[0]
    torch.testing.assert_close(got, want, **F64)
    assert torch.all(got[:, -1] == 0)
    fn = lambda z: tuple(token_logprobs_from_logits(z, targets[0], chunk_size=2, temperature=1.7,  # noqa: E731
                                                    with_entropy=True))
    assert torch.autograd.gradcheck(fn, (full[0, :-1].detach().clone().requires_grad_(),))


def test_logits_masked_vocabulary_entropy_is_finite():
    logits = torch.randn(4, 6, dtype=torch.float64)
    logits[:, 4:] = float("-inf")
    logits.requires_grad_()
    targets = torch.tensor([0, 1, 2, 3])
    out = token_logprobs_from_logits(logits, targets, with_entropy=True)
    want_lp, want_ent = naive(logits, targets)
    torch.testing.assert_close(out.entropy, want_ent, **F64)
    torch.testing.assert_close(out.log_probs, want_lp, **F64)
    g = torch.autograd.grad(out.entropy.sum() + out.log_probs.sum(), logits)[0]
    assert torch.isfinite(g).all() and torch.all(g[:, 4:] == 0)


def test_logits_bfloat16_and_mask():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 5, 40, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 40, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = token_logprobs_from_logits(logits, targets, chunk_size=3, with_entropy=True, mask=mask)
    assert out.log_probs.dtype == torch.float32
    ref = logits.detach().float().requires_grad_()
    want_lp, want_ent = naive(ref, targets)
    torch.testing.assert_close(out.log_probs, torch.where(mask, want_lp, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, torch.where(mask, want_ent, 0), rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.log_probs.sum(), logits)[0]
    want = torch.autograd.grad(torch.where(mask, want_lp, 0).sum(), ref)[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


# -- errors --------------------------------------------------------------------------------------


def _ok():
    return torch.randn(4, 3), torch.randn(7, 3), torch.tensor([0, 1, 6, 2])


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(weight=torch.randn(7, 2)), ValueError, "weight: expected shape"),
        (dict(weight=torch.randn(7, 3, dtype=torch.float64)), TypeError, "weight: expected dtype"),
        (dict(hidden=torch.randn(3)), ValueError, "hidden: expected shape"),
        (dict(hidden=torch.ones(4, 3, dtype=torch.long)), TypeError, "hidden: expected a floating"),
        (dict(targets=torch.tensor([0, 1, 2])), ValueError, r"targets: expected shape \[N\]"),
        (dict(targets=torch.tensor([0, 1, 7, 2])), ValueError, r"targets: expected class indices in \[0, 7\).*got 7"),
        (dict(targets=torch.tensor([0, -1, 2, 2])), ValueError, "got -1 at flat position 1"),
        (dict(targets=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "targets: expected an integer"),
        (dict(targets=[0, 1, 2, 3]), TypeError, "targets: expected a torch.Tensor"),
        (dict(bias=torch.randn(6)), ValueError, "bias: expected shape"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask: expected shape"),
        (dict(mask=torch.full((4,), 2)), ValueError, "mask: expected only 0 and 1"),
    ],
)
def test_hidden_errors_name_the_argument(change, exc, match):
    hidden, weight, targets = _ok()
    kw = dict(hidden=hidden, weight=weight, targets=targets)
    kw.update(change)
    with pytest.raises(exc, match=match):
        token_logprobs_from_hidden(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def test_logits_errors_name_the_argument():
    with pytest.raises(ValueError, match="logits: expected shape"):
        token_logprobs_from_logits(torch.randn(5), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"targets: expected shape \[B, T\]"):
        token_logprobs_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets: expected class indices"):
        token_logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="targets: expected an integer"):
        token_logprobs_from_logits(torch.randn(2, 5), torch.tensor([True, False]))
    # ignore_index=None: -100 is then out of range.
    with pytest.raises(ValueError, match="got -100"):
        token_logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, -100]), ignore_index=None)


def test_default_chunk_follows_the_element_budget():
    assert lpmod._resolve_chunk(None, 32000) == lpmod.DEFAULT_CHUNK_ELEMENTS // 32000
    assert lpmod._resolve_chunk(None, 10**9) == 1


# -- keep_bytes: forward chunks kept for backward -----------------------------------------------


def _fused_node(t):
    """The ``_LinearLogProb`` backward node behind an output (through reshape views)."""
    node = t.grad_fn
    while not hasattr(node, "kept"):
        node = node.next_functions[0][0]
    return node


def _kept_rows(node):
    return sum(e - s for s, e, _, _ in node.kept)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("keep_rows", [0, 1, 4, 9, 17])
def test_keep_bytes_matches_naive_and_respects_budget(with_entropy, keep_rows):
    """Any budget (0 = pure recompute, 17 rows = everything) gives the naive values and gradients."""
    n, v, chunk = 17, 29, 4
    hidden, weight, bias, targets, up_lp, up_ent = make(n, 6, v, seed=keep_rows)
    budget = keep_rows * v * 8  # float64 rows
    out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=chunk, keep_bytes=budget,
                                     temperature=0.8, with_entropy=with_entropy)
    node = _fused_node(out.log_probs if with_entropy else out)
    kept = _kept_rows(node)
    # Whole chunks of the last rows, within the budget, and as many as fit.
    assert kept * v * 8 <= budget and (kept == 0 or (n - kept) % chunk == 0) and kept > keep_rows - chunk
    assert all(z.shape == (e - s, v) for s, e, z, _ in node.kept)
    want_lp, want_ent = naive(hidden @ weight.T + bias, targets, 0.8)
    lp = out.log_probs if with_entropy else out
    torch.testing.assert_close(lp, want_lp, **F64)
    inputs = (hidden, weight, bias)
    if with_entropy:
        torch.testing.assert_close(out.entropy, want_ent, **F64)
        got, want = grads(*out, up_lp, up_ent, inputs), grads(want_lp, want_ent, up_lp, up_ent, inputs)
    else:
        got, want = grads(lp, None, up_lp, None, inputs), grads(want_lp, None, up_lp, None, inputs)
    assert_close_all(got, want, F64)
    assert node.kept is None  # released by backward, not when the graph dies


def test_keep_everything_skips_recomputation_and_zero_recomputes_all(monkeypatch):
    from skyrl_fn.ops import _linear_logprob as fused

    calls = []
    real = fused._logits_into
    monkeypatch.setattr(fused, "_logits_into", lambda out, h_c, *a: calls.append(h_c.shape[0]) or real(out, h_c, *a))
    hidden, weight, _, targets, up_lp, _ = make(10, 3, 7)
    want = grads(naive(hidden @ weight.T, targets)[0], None, up_lp, None, (hidden, weight))
    for keep, recomputed in ((10 * 7 * 8, 0), (0, 10)):
        lp = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=3, keep_bytes=keep)
        assert sum(calls) == 10  # forward computes every row once
        calls.clear()
        assert_close_all(grads(lp, None, up_lp, None, (hidden, weight)), want, F64)
        assert sum(calls) == recomputed
        calls.clear()


@pytest.mark.parametrize("with_entropy", [False, True])
def test_keep_bytes_survives_retain_graph(with_entropy):
    """A retained graph keeps its chunks intact: a second backward gives the same gradients."""
    hidden, weight, _, targets, up_lp, up_ent = make(9, 4, 11, seed=7)
    out = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=2, keep_bytes=6 * 11 * 8,
                                     with_entropy=with_entropy)
    outs = (out.log_probs, out.entropy) if with_entropy else (out, None)
    loss = (outs[0] * up_lp).sum() + (0 if outs[1] is None else (outs[1] * up_ent).sum())
    g1 = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    assert _kept_rows(_fused_node(outs[0])) == 5  # rows [4, 9): the cut moves up to a chunk edge
    g2 = torch.autograd.grad(loss, (hidden, weight))
    assert_close_all(g1, g2, dict(rtol=0, atol=0))
    want_lp, want_ent = naive(hidden @ weight.T, targets)
    want_loss = (want_lp * up_lp).sum() + ((want_ent * up_ent).sum() if with_entropy else 0)
    assert_close_all(g1, torch.autograd.grad(want_loss, (hidden, weight)), F64)


def test_keep_bytes_without_grad_and_argument_checks():
    hidden, weight, _, targets, _, _ = make(6, 3, 5)
    lp = token_logprobs_from_hidden(hidden.detach(), weight.detach(), targets, keep_bytes=1 << 30)
    assert lp.grad_fn is None
    with pytest.raises(ValueError, match="keep_bytes: expected a non-negative int"):
        token_logprobs_from_hidden(hidden, weight, targets, keep_bytes=-1)
    with pytest.raises(TypeError, match="keep_bytes: expected a non-negative int or None, got float"):
        token_logprobs_from_hidden(hidden, weight, targets, keep_bytes=1.5)
    assert lpmod._resolve_keep(None) == lpmod.DEFAULT_KEEP_BYTES


@pytest.mark.parametrize("use", ["log_probs", "entropy"])
def test_keep_bytes_with_entropy_when_only_one_output_is_used(use):
    hidden, weight, bias, targets, up_lp, up_ent = make(11, 3, 13, seed=11)
    out = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=3, keep_bytes=5 * 13 * 8,
                                     with_entropy=True)
    want = dict(zip(("log_probs", "entropy"), naive(hidden @ weight.T + bias, targets)))
    up = up_lp if use == "log_probs" else up_ent
    inputs = (hidden, weight, bias)
    got = torch.autograd.grad((getattr(out, use) * up).sum(), inputs)
    assert_close_all(got, torch.autograd.grad((want[use] * up).sum(), inputs), F64)
