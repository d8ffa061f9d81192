"""The KL-estimator battery: ``check_kl_estimator``.

Notation: ``B`` rows, ``T`` tokens, ``k = fn(log_probs, ref_log_probs) [B, T]`` the per-token
estimate of ``KL(pi || pi_ref)``. Gradients are taken of ``sum(k)`` with respect to ``log_probs``
(the KL loss term backpropagates into the policy only).

Token locality compares a block of rows and tokens computed alone with the same block of the
full output, to round-off (``rtol = 1e-5`` in float32, ``1e-12`` in float64, relative to
``max(1, |k|)``): only a function that couples tokens or rows (a mean over the batch, a
normaliser) fails it. ``zero_at_reference`` allows the same absolute round-off.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import attrs
import torch
from hypothesis import settings as Settings
from hypothesis import strategies as st

from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.testing._report import PropertyViolation, fmt, positions
from skyrl_fn.testing._resolve import Target, resolve
from skyrl_fn.testing._run import Case, kit_settings, run_property, select
from skyrl_fn.testing.strategies import LogProbPair, log_prob_pairs

__all__ = ["check_kl_estimator"]


def _tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


@attrs.frozen
class _Ctx:
    target: Target
    hyper: Mapping[str, Any]

    def fail(self, prop: str, detail: str, pair: Any, bad: torch.Tensor | None = None, extra=()) -> PropertyViolation:
        pos = positions(bad) if bad is not None else ()
        hyper = f"; hyperparameters {dict(self.hyper)}" if self.hyper else ""
        return PropertyViolation(prop, detail, function=self.target.label + hyper, batch=pair, positions=pos, extra=extra)

    def run(self, prop: str, pair: LogProbPair) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, leaf)``: the estimate on ``pair`` with a fresh ``log_probs`` leaf carrying the grad."""
        __tracebackhide__ = True
        leaf = pair.log_probs.detach().clone().requires_grad_(True)
        try:
            out = self.target.fn(leaf, pair.ref_log_probs, **self.hyper)
        except Exception as err:
            raise self.fail(prop, f"raised {type(err).__name__}: {err}", pair) from err
        if not isinstance(out, torch.Tensor):
            raise self.fail("shapes", f"expected a [B, T] tensor, got {type(out).__name__}", pair)
        return out, leaf

    def grad(self, prop: str, pair: LogProbPair, out: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        __tracebackhide__ = True
        if not out.requires_grad:  # a constant (e.g. detached) estimate: zero gradient
            return torch.zeros_like(leaf)
        try:
            (g,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
        except Exception as err:
            raise self.fail(prop, f"backward raised {type(err).__name__}: {err}", pair) from err
        return torch.zeros_like(leaf) if g is None else g


def _shapes(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    pair = case.batch
    out, _ = ctx.run("shapes", pair)
    if tuple(out.shape) != pair.shape:
        raise ctx.fail("shapes", f"expected shape [B, T] = {pair.shape}, got {tuple(out.shape)}", pair)
    if out.dtype != pair.log_probs.dtype:
        raise ctx.fail("shapes", f"expected dtype {pair.log_probs.dtype} (as log_probs), got {out.dtype}", pair)


def _finite(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    pair = case.batch
    out, leaf = ctx.run("finite", pair)
    bad = ~torch.isfinite(out.detach())
    if bool(bad.any()):
        raise ctx.fail("finite", "the estimate holds NaN/inf", pair, bad if bad.shape == pair.shape else None)
    g = ctx.grad("finite", pair, out, leaf)
    bad = ~torch.isfinite(g)
    if bool(bad.any()):
        raise ctx.fail("finite", "the gradient w.r.t. log_probs holds NaN/inf", pair, bad)


def _no_mutation(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    pair = case.batch
    before = LogProbPair(log_probs=pair.log_probs.clone(), ref_log_probs=pair.ref_log_probs.clone())
    _, leaf = ctx.run("no_mutation", pair)
    for name, now in (("log_probs", leaf.detach()), ("ref_log_probs", pair.ref_log_probs)):
        was = getattr(before, name)
        if not torch.equal(now, was):
            raise ctx.fail("no_mutation", f"{name} was changed in place", before, now != was)


def _deterministic(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    pair = case.batch
    (o1, l1), (o2, l2) = ctx.run("deterministic", pair), ctx.run("deterministic", pair)
    a, b = torch.nan_to_num(o1.detach()), torch.nan_to_num(o2.detach())
    if a.shape != b.shape or not torch.equal(a, b):
        raise ctx.fail("deterministic", "the estimate differs between two calls on the same input", pair, (a != b) if a.shape == b.shape == pair.shape else None)
    g1, g2 = ctx.grad("deterministic", pair, o1, l1), ctx.grad("deterministic", pair, o2, l2)
    if not torch.equal(torch.nan_to_num(g1), torch.nan_to_num(g2)):
        raise ctx.fail("deterministic", "the gradient differs between two calls on the same input", pair, g1 != g2)


def _token_local(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    pair, (r0, r1, c0, c1) = case.batch, case.extra["block"]
    full, _ = ctx.run("token_local", pair)
    block = LogProbPair(log_probs=pair.log_probs[r0:r1, c0:c1], ref_log_probs=pair.ref_log_probs[r0:r1, c0:c1])
    part, _ = ctx.run("token_local", block)
    want = full.detach()[r0:r1, c0:c1]
    got = part.detach()
    if got.shape != want.shape:
        raise ctx.fail("token_local", f"a [{r1 - r0}, {c1 - c0}] block gave shape {tuple(got.shape)}", pair)
    tol = _tol(want.dtype)
    bad = ~torch.isclose(got, want, rtol=tol, atol=tol)
    if bool(bad.any()):
        at = [(r0 + int(i), c0 + int(j)) for i, j in torch.nonzero(bad)]
        vals = [f"{p}: in the full batch {fmt(float(want[p[0] - r0, p[1] - c0]))}, in the block alone {fmt(float(got[p[0] - r0, p[1] - c0]))}" for p in at[:4]]
        full_bad = torch.zeros(pair.shape, dtype=torch.bool)
        full_bad[r0:r1, c0:c1] = bad
        raise ctx.fail("token_local", f"rows [{r0}, {r1}) x tokens [{c0}, {c1}) computed alone differ from the full output", pair, full_bad, extra=vals)


def _zero_at_reference(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    lp = case.batch.log_probs
    same = LogProbPair(log_probs=lp, ref_log_probs=lp.clone())
    out, _ = ctx.run("zero_at_reference", same)
    k = out.detach()
    bad = ~torch.isclose(k, torch.zeros_like(k), rtol=0.0, atol=_tol(k.dtype))
    if bool(bad.any()):
        vals = [f"{p}: {fmt(float(k[p]))}" for p in positions(bad)[:4]]
        raise ctx.fail("zero_at_reference", "the estimate is non-zero where log_probs == ref_log_probs", same, bad, extra=vals)


def _non_negative(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    pair = case.batch
    out, _ = ctx.run("non_negative", pair)
    k = out.detach()
    bad = k < 0
    if bool(bad.any()):
        vals = [f"{p}: {fmt(float(k[p]))}" for p in positions(bad)[:4]]
        raise ctx.fail("non_negative", "the estimate is negative", pair, bad, extra=vals)


_CHECKS: dict[str, Callable[[_Ctx, Case], None]] = {
    "shapes": _shapes,
    "finite": _finite,
    "no_mutation": _no_mutation,
    "deterministic": _deterministic,
    "token_local": _token_local,
    "zero_at_reference": _zero_at_reference,
    "non_negative": _non_negative,
}


@st.composite
def _with_block(draw, pairs: st.SearchStrategy[LogProbPair]) -> Case:
    pair = draw(pairs)
    b, t = pair.shape
    r0 = draw(st.integers(0, b - 1))
    r1 = draw(st.integers(r0 + 1, b))
    c0 = draw(st.integers(0, t - 1))
    c1 = draw(st.integers(c0 + 1, t))
    return Case(pair, block=(r0, r1, c0, c1))


def check_kl_estimator(
    estimator: Any,
    *,
    table: AlgorithmTable | None = None,
    properties: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> None:
    """Check a KL estimator ``fn(log_probs [B, T], ref_log_probs [B, T], **hyper) -> [B, T]`` (or a
    registered name) against its battery; raise on the first failure.

    Universal for the kind (``skyrl_fn.core.properties.universal("kl_estimator")``): shape and dtype,
    finite values and gradients (log-ratios up to +-20), no input changed in place, deterministic,
    token-local, 0 at the reference; plus what the entry promises (``non_negative``).

    Args:
        estimator: a registered ``kl_estimator`` name (looked up in ``table``) or a function.
        table: where names are looked up; ``DEFAULT_TABLE`` when None.
        properties: property names to check; None means the universal ones plus the promised.
        hyperparameters: keyword hyperparameters passed on every call.
        settings: hypothesis settings per property (see ``check_estimator``).

    Raises:
        PropertyViolation: an ``AssertionError`` whose message starts with the property name.
        ValueError: a selected property does not apply to KL estimators.
    """
    __tracebackhide__ = True
    table = DEFAULT_TABLE if table is None else table
    target = resolve(estimator, "kl_estimator", table)
    chosen = select("kl_estimator", target.promises, properties)
    ctx = _Ctx(target=target, hyper=dict(hyperparameters or {}))
    config = kit_settings(settings)
    pairs = log_prob_pairs()
    for prop in chosen:
        strategy = _with_block(pairs) if prop == "token_local" else pairs.map(Case)
        run_property(prop, strategy, functools.partial(_CHECKS[prop], ctx), config)
