"""The off-policy correction battery: ``check_correction``.

A correction ``fn(batch: PolicyLossInput, **hyper) -> OffPolicyCorrection`` is checked on
generated batches that carry ``rollout_log_probs``: universal properties (shapes and dtypes of
``weights`` / ``loss_mask``, finite weights and metrics, zero weights and a False mask off the
input mask with no dependence on the padding's values, no mutation, determinism) plus the
promised ones: ``identity_on_policy`` (``log_probs == old_log_probs == rollout_log_probs`` gives
weights 1 and the input mask) and ``row_local`` (any block of rows gives that block of the full
output). Notation: ``B`` rows, ``T`` tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import attrs
import torch
from hypothesis import settings as Settings
from hypothesis import strategies as st

from skyrl_fn.losses.off_policy import OffPolicyCorrection
from skyrl_fn.core.records import PolicyLossInput
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.testing._report import PropertyViolation, positions
from skyrl_fn.testing._resolve import Target, resolve
from skyrl_fn.testing._run import Case, kit_settings, run_property, select
from skyrl_fn.testing.strategies import microbatch_cuts, policy_loss_inputs

__all__ = ["check_correction", "correction_inputs"]

_FIELDS = ("log_probs", "old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs")


def correction_inputs() -> st.SearchStrategy[PolicyLossInput]:
    """``policy_loss_inputs`` that always carry ``rollout_log_probs`` (drawn near ``old_log_probs``
    when the base strategy has none)."""
    return policy_loss_inputs().map(
        lambda b: b if b.rollout_log_probs is not None else attrs.evolve(b, rollout_log_probs=b.old_log_probs - 0.25 * (b.old_log_probs - b.log_probs))
    )


@attrs.frozen
class _Ctx:
    target: Target
    hyper: Mapping[str, Any]

    def fail(self, prop: str, detail: str, batch: Any, bad: torch.Tensor | None = None) -> PropertyViolation:
        hyper = f"; hyperparameters {dict(self.hyper)}" if self.hyper else ""
        pos = positions(bad) if bad is not None else ()
        return PropertyViolation(prop, detail, function=self.target.label + hyper, batch=batch, positions=pos)

    def run(self, prop: str, batch: PolicyLossInput) -> OffPolicyCorrection:
        __tracebackhide__ = True
        try:
            out = self.target.fn(batch, **self.hyper)
        except Exception as err:
            raise self.fail(prop, f"raised {type(err).__name__}: {err}", batch) from err
        if not isinstance(out, OffPolicyCorrection):
            raise self.fail("shapes", f"expected an OffPolicyCorrection, got {type(out).__name__}", batch)
        return out


def _finite(ctx: _Ctx, case: Case) -> None:
    out = ctx.run("finite", case.batch)
    for name, x in (("weights", out.weights), ("kl_weights", out.kl_weights), *((f"metrics[{k!r}]", v) for k, v in out.metrics.items())):
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ctx.fail("finite", f"{name} holds NaN/inf", case.batch, ~torch.isfinite(x) if x.dim() == 2 else None)


def _shapes(ctx: _Ctx, case: Case) -> None:
    b = case.batch
    out = ctx.run("shapes", b)
    shape = tuple(b.log_probs.shape)
    for name, x, dtype in (("weights", out.weights, b.log_probs.dtype), ("loss_mask", out.loss_mask, torch.bool), ("kl_weights", out.kl_weights, b.log_probs.dtype)):
        if x is None:
            continue
        if tuple(x.shape) != shape:
            raise ctx.fail("shapes", f"{name}: expected shape [B, T] = {list(shape)}, got {tuple(x.shape)}", b)
        if x.dtype != dtype:
            raise ctx.fail("shapes", f"{name}: expected dtype {dtype}, got {x.dtype}", b)


def _padded(batch: PolicyLossInput, value: float) -> PolicyLossInput:
    m = batch.loss_mask
    fill = lambda x: None if x is None else torch.where(m, x, torch.full_like(x, value))  # noqa: E731
    return attrs.evolve(batch, **{f: fill(getattr(batch, f)) for f in _FIELDS})


def _mask(ctx: _Ctx, case: Case) -> None:
    b = case.batch
    out = ctx.run("mask", b)
    m = b.loss_mask
    if bool((out.loss_mask & ~m).any()):
        raise ctx.fail("mask", "the new loss_mask is True where the input loss_mask is False", b, out.loss_mask & ~m)
    for name, x in (("weights", out.weights), ("kl_weights", out.kl_weights)):
        if x is not None and bool(((x != 0) & ~m).any()):
            raise ctx.fail("mask", f"{name} is non-zero where loss_mask is 0", b, (x != 0) & ~m)
    a, z = ctx.run("mask", _padded(b, 0.0)), ctx.run("mask", _padded(b, -7.5))
    if not torch.equal(a.loss_mask, z.loss_mask):
        raise ctx.fail("mask", "the new loss_mask changed when only the inputs at masked positions changed (0 -> -7.5)", b, a.loss_mask != z.loss_mask)
    if not torch.allclose(a.weights.detach(), z.weights.detach(), rtol=1e-6, atol=1e-9):
        raise ctx.fail("mask", "the weights changed when only the inputs at masked positions changed (0 -> -7.5)", b, a.weights != z.weights)


def _no_mutation(ctx: _Ctx, case: Case) -> None:
    b = case.batch
    tensors = {f: getattr(b, f) for f in _FIELDS if getattr(b, f) is not None} | {"loss_mask": b.loss_mask}
    before = {k: v.clone() for k, v in tensors.items()}
    ctx.run("no_mutation", b)
    for key, now in tensors.items():
        if not torch.equal(now, before[key]):
            raise ctx.fail("no_mutation", f"{key} was changed in place", b, now != before[key])


def _deterministic(ctx: _Ctx, case: Case) -> None:
    o1, o2 = ctx.run("deterministic", case.batch), ctx.run("deterministic", case.batch)
    if not torch.equal(o1.loss_mask, o2.loss_mask) or not torch.equal(o1.weights, o2.weights):
        raise ctx.fail("deterministic", "the weights or mask differ between two calls on the same batch", case.batch)


def _identity_on_policy(ctx: _Ctx, case: Case) -> None:
    b = case.batch
    lp = b.log_probs
    on = attrs.evolve(b, old_log_probs=lp.clone(), rollout_log_probs=lp.clone())
    out = ctx.run("identity_on_policy", on)
    m = on.loss_mask
    if not torch.equal(out.loss_mask, m):
        raise ctx.fail("identity_on_policy", "tokens were masked although the batch is on-policy", on, out.loss_mask != m)
    for name, x in (("weights", out.weights), ("kl_weights", out.kl_weights)):
        if x is not None:
            bad = m & ~torch.isclose(x.detach(), torch.ones_like(x), rtol=0.0, atol=1e-6)
            if bool(bad.any()):
                raise ctx.fail("identity_on_policy", f"{name} differ from 1 although the batch is on-policy", on, bad)


def _row_local(ctx: _Ctx, case: Case) -> None:
    b, cuts = case.batch, case.extra["cuts"]
    full = ctx.run("row_local", b)
    for start, stop in cuts:
        sub = attrs.evolve(b, loss_mask=b.loss_mask[start:stop], **{f: getattr(b, f)[start:stop] for f in _FIELDS if getattr(b, f) is not None})
        part = ctx.run("row_local", sub)
        if not torch.equal(part.loss_mask, full.loss_mask[start:stop]):
            raise ctx.fail("row_local", f"rows [{start}, {stop}) alone give another mask than in the full batch", b)
        if not torch.allclose(part.weights.detach(), full.weights[start:stop].detach(), rtol=1e-6, atol=1e-12):
            raise ctx.fail("row_local", f"rows [{start}, {stop}) alone give other weights than in the full batch", b)


_CHECKS = {
    "finite": _finite,
    "shapes": _shapes,
    "mask": _mask,
    "no_mutation": _no_mutation,
    "deterministic": _deterministic,
    "identity_on_policy": _identity_on_policy,
    "row_local": _row_local,
}


def check_correction(
    correction: Any,
    *,
    table: AlgorithmTable | None = None,
    properties: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> None:
    """Check an off-policy correction (a registered name of kind ``off_policy_correction``, or
    ``fn(batch: PolicyLossInput, **hyper) -> OffPolicyCorrection``, e.g. a ``compose_corrections``
    chain) against its property battery; raise on the first failure.

    Args:
        correction: the name or the function.
        table: where a name is looked up (``DEFAULT_TABLE``).
        properties: property names to check; None: the universal ones plus the entry's promises.
        hyperparameters: keyword hyperparameters passed on every call.
        settings: hypothesis settings per property.

    Raises:
        PropertyViolation: an ``AssertionError`` whose message starts with the property name.
    """
    __tracebackhide__ = True
    target = resolve(correction, "off_policy_correction", table)
    chosen = select(target.kind, target.promises, properties)
    ctx = _Ctx(target=target, hyper=dict(hyperparameters or {}))
    config = kit_settings(settings)
    records = correction_inputs()
    for prop in chosen:
        strategy = records.flatmap(lambda b: microbatch_cuts(b.loss_mask.shape[0]).map(lambda c: Case(b, cuts=c))) if prop == "row_local" else records.map(Case)
        run_property(prop, strategy, functools.partial(_CHECKS[prop], ctx), config)
