"""The compiled path: same values and gradients as eager, one graph for many shapes, eager fallback.

Uses the ``aot_eager`` backend (dynamo tracing + AOT autograd, no C++ code generation) to stay
fast; the inductor path is exercised by ``bench/losses.py`` and the slow test below.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.ops import compile as compile_mod
from skyrl_fn.algorithm import compute_policy_loss
from skyrl_fn.ops.compile import compile_loss
from loss_batches import make_batch


def _grads(fn, batch):
    out = fn(batch)
    (g,) = torch.autograd.grad(out.token_loss.sum(), batch.log_probs)
    return out, g


def test_compiled_matches_eager_without_recompiles(name="regular"):
    from torch._dynamo.utils import counters

    eager = DEFAULT_TABLE.policy_loss(name)
    compiled = compile_loss(eager, backend="aot_eager")
    assert compile_loss(eager, backend="aot_eager") is compiled  # cached per function
    before = None
    for b, t in ((4, 8), (4, 11), (5, 13)):
        batch = make_batch(b, t, seed=t)
        (oe, ge), (oc, gc) = _grads(eager, batch), _grads(compiled, batch)
        torch.testing.assert_close(oc.token_loss, oe.token_loss)
        torch.testing.assert_close(gc, ge)
        for key in oe.metrics:
            torch.testing.assert_close(oc.metrics[key], oe.metrics[key])
        if before is None:
            before = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] - before <= 1


def test_fallback_warns_once_and_runs_eager(monkeypatch):
    monkeypatch.setattr(compile_mod, "compile_unavailable_reason", lambda: "no compiler here")
    fn = DEFAULT_TABLE.policy_loss("cispo")
    wrapped = compile_mod.compile_loss(fn, backend="eager")
    batch = make_batch(2, 3)
    with pytest.warns(RuntimeWarning, match="torch.compile unavailable for cispo .no compiler here.; running eager"):
        out = wrapped(batch)
    torch.testing.assert_close(out.token_loss, fn(batch).token_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(batch)  # no second warning


def test_broken_backend_falls_back_but_input_errors_still_raise():
    fn = DEFAULT_TABLE.policy_loss("sapo")
    wrapped = compile_loss(fn, backend="no_such_backend")
    batch = make_batch(2, 3)
    with pytest.raises(ValueError, match="tau_pos"):
        wrapped(batch, tau_pos=-1.0)
    with pytest.warns(RuntimeWarning, match="running eager"):
        out = wrapped(batch)
    torch.testing.assert_close(out.token_loss, fn(batch).token_loss)


def test_compute_policy_loss_compile_flag():
    batch = make_batch(3, 5, seed=9)
    # "regular" under aot_eager is already compiled by the first test: no new compile here
    eager = compute_policy_loss(DEFAULT_TABLE, "regular", batch, aggregation="sequence_mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = compute_policy_loss(DEFAULT_TABLE, "regular", batch, aggregation="sequence_mean", compile="aot_eager")
    torch.testing.assert_close(comp.loss, eager.loss)


@pytest.mark.slow
def test_inductor_regular_matches_eager():
    fn = DEFAULT_TABLE.policy_loss("regular")
    compiled = compile_loss(fn)
    batch = make_batch(4, 16, seed=1, dtype=torch.float32)
    (oe, ge), (oc, gc) = _grads(fn, batch), _grads(compiled, batch)
    torch.testing.assert_close(oc.token_loss, oe.token_loss)
    torch.testing.assert_close(gc, ge)
