"""The policy-loss and aggregation batteries: ``check_policy_loss`` and ``check_aggregation``.

Notation: ``B`` rows, ``T`` tokens, ``l [B, T]`` the per-token loss, ``m [B, T]`` the loss mask.
Gradients are taken of ``sum(l)`` with respect to ``log_probs`` (losses) or of the aggregate with
respect to ``token_loss`` (aggregations).

Micro-batch invariance: the rows are split into contiguous micro-batches; each micro-batch loss is
aggregated with the totals of the whole batch (``global_tokens = max(sum m, 1)``,
``global_seqs = B``, ``max_seq_len = T``), and the concatenated micro-batch gradients must equal the
full-batch gradient (``rtol = 1e-4`` in float32, ``1e-9`` in float64, relative to
``max(1, max|grad|)``), and the summed losses the full-batch loss (the same tolerance relative to
the aggregate of ``|l|``): only summation order differs for a row-local loss.
"""

from __future__ import annotations

import functools
import inspect

from typing import Any, Callable, Mapping, Sequence

import attrs
import torch
from hypothesis import settings as Settings
from hypothesis import strategies as st

from skyrl_fn.losses.aggregation import group_token_totals
from skyrl_fn.core.properties import universal
from skyrl_fn.core.records import PolicyLossOutput
from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.testing._report import PropertyViolation, fmt, positions
from skyrl_fn.testing._resolve import Target, resolve
from skyrl_fn.testing._run import Case, kit_settings, run_property, select
from skyrl_fn.testing.strategies import microbatch_cuts, policy_loss_inputs, token_losses

__all__ = ["check_policy_loss", "check_aggregation", "reference_token_mean"]

_LOSS_FIELDS = ("log_probs", "old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs")


def reference_token_mean(token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None):
    """``sum_it m l / global_tokens`` (default ``max(sum m, 1)``): the aggregation the kit uses
    for micro-batch invariance when the table has none. [B, T] -> []."""
    n = global_tokens if global_tokens is not None else max(int(loss_mask.sum()), 1)
    return torch.where(loss_mask, token_loss, torch.zeros((), dtype=token_loss.dtype)).sum() / n


def _takes_groups(fn: Callable) -> bool:
    """True if the aggregation takes ``group_ids`` (``prompt_mean``): the kit then supplies each
    row's prompt and, under micro-batching, the whole batch's prompt totals."""
    try:
        return "group_ids" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _group_ids(b: int) -> torch.Tensor:
    """``[B]`` prompt ids of the kit's aggregation batches: three interleaved prompts, so
    micro-batches split prompts (the case a per-prompt normaliser must survive)."""
    return torch.arange(b) % 3


def _group_totals(fn: Callable, mask: torch.Tensor, cut: tuple[int, int] | None = None) -> dict[str, Any]:
    """The prompt keywords for ``fn`` (none unless it takes ``group_ids``): the rows' ids, and with
    ``cut`` the whole batch's ``group_tokens`` / ``global_groups`` sliced to that micro-batch."""
    if not _takes_groups(fn):
        return {}
    ids = _group_ids(mask.shape[0])
    if cut is None:
        return {"group_ids": ids}
    tokens, groups = group_token_totals(mask, ids)
    a, z = cut
    return {"group_ids": ids[a:z], "group_tokens": tokens[a:z], "global_groups": groups}


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


@attrs.frozen
class _Ctx:
    target: Target
    hyper: Mapping[str, Any]
    aggregations: Sequence[tuple[str, Callable]]

    def fail(self, prop: str, detail: str, batch: Any, bad: torch.Tensor | None = None, extra=()) -> PropertyViolation:
        pos = positions(bad) if bad is not None else ()
        hyper = f"; hyperparameters {dict(self.hyper)}" if self.hyper else ""
        return PropertyViolation(prop, detail, function=self.target.label + hyper, batch=batch, positions=pos, extra=extra)

    def run(self, prop: str, batch: Any):
        """``(output, leaf)``: the output for ``batch`` with a fresh leaf tensor carrying the grad
        (``log_probs`` for a loss, ``token_loss`` for an aggregation)."""
        __tracebackhide__ = True
        extra: dict[str, Any] = {}
        if self.target.kind == "aggregation":
            leaf = batch[0].detach().clone().requires_grad_(True)
            args, want = (leaf, batch[1]), "a scalar tensor"
            extra = _group_totals(self.target.fn, batch[1])
        else:
            leaf = batch.log_probs.detach().clone().requires_grad_(True)
            args, want = (attrs.evolve(batch, log_probs=leaf),), "a PolicyLossOutput"
        try:
            out = self.target.fn(*args, **{**self.hyper, **extra})
        except Exception as err:
            raise self.fail(prop, f"raised {type(err).__name__}: {err}", batch) from err
        ok = isinstance(out, PolicyLossOutput) if self.target.kind == "policy_loss" else isinstance(out, torch.Tensor)
        if not ok:
            raise self.fail("shapes", f"expected {want}, got {type(out).__name__}", batch)
        return out, leaf

    def grad(self, prop: str, batch: Any, out: Any, leaf: torch.Tensor, scalar: torch.Tensor | None = None, *, retain: bool = False) -> torch.Tensor:
        """d(scalar)/d(leaf); ``scalar`` defaults to the sum of the token loss (or the aggregate);
        ``retain``: keep the graph for another scalar of the same output."""
        __tracebackhide__ = True
        if scalar is None:
            scalar = out.token_loss.sum() if isinstance(out, PolicyLossOutput) else out.sum()
        if not scalar.requires_grad:
            return torch.zeros_like(leaf)
        try:
            (g,) = torch.autograd.grad(scalar, leaf, allow_unused=True, retain_graph=retain)
        except Exception as err:
            raise self.fail(prop, f"backward raised {type(err).__name__}: {err}", batch) from err
        return torch.zeros_like(leaf) if g is None else g


def _loss_of(out: Any) -> torch.Tensor:
    return out.token_loss if isinstance(out, PolicyLossOutput) else out


def _mask_of(batch: Any) -> torch.Tensor:
    return batch[1] if isinstance(batch, tuple) else batch.loss_mask


def _finite(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    out, leaf = ctx.run("finite", case.batch)
    loss = _loss_of(out)
    if not bool(torch.isfinite(loss).all()):
        raise ctx.fail("finite", "the loss holds NaN/inf", case.batch, ~torch.isfinite(loss) if loss.dim() else None)
    for key, value in (out.metrics.items() if isinstance(out, PolicyLossOutput) else ()):
        if not bool(torch.isfinite(value).all()):
            raise ctx.fail("finite", f"metrics[{key!r}] is {fmt(float(value))}", case.batch)
    g = ctx.grad("finite", case.batch, out, leaf)
    if not bool(torch.isfinite(g).all()):
        raise ctx.fail("finite", "the gradient holds NaN/inf", case.batch, ~torch.isfinite(g))


def _shapes(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    out, leaf = ctx.run("shapes", case.batch)
    loss = _loss_of(out)
    want = () if ctx.target.kind == "aggregation" else tuple(leaf.shape)
    if tuple(loss.shape) != want:
        raise ctx.fail("shapes", f"expected shape {list(want) or '[] (a scalar)'}, got {tuple(loss.shape)}", case.batch)
    if loss.dtype != leaf.dtype:
        raise ctx.fail("shapes", f"expected dtype {leaf.dtype} (as the input), got {loss.dtype}", case.batch)


def _masked_grad_zero(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    out, leaf = ctx.run("masked_grad_zero", case.batch)
    g = ctx.grad("masked_grad_zero", case.batch, out, leaf)
    bad = (g != 0) & ~_mask_of(case.batch)
    if bool(bad.any()):
        vals = [f"{p}: gradient {fmt(float(g[p]))}" for p in positions(bad)[:4]]
        raise ctx.fail("masked_grad_zero", "the gradient is non-zero at masked tokens", case.batch, bad, extra=vals)


def _with_padding(batch: Any, value: float) -> Any:
    m = _mask_of(batch)
    fill = lambda x: None if x is None else torch.where(m, x, torch.full_like(x, value))  # noqa: E731
    if isinstance(batch, tuple):
        return fill(batch[0]), m
    return attrs.evolve(batch, **{f: fill(getattr(batch, f)) for f in _LOSS_FIELDS})


def _mask(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch, m = case.batch, _mask_of(case.batch)
    out, _ = ctx.run("mask", batch)
    loss = _loss_of(out)
    if loss.dim() == 2 and bool(((loss != 0) & ~m).any()):
        raise ctx.fail("mask", "token_loss is non-zero where loss_mask is 0", batch, (loss != 0) & ~m)
    a, b = _with_padding(batch, 0.0), _with_padding(batch, -7.5)
    out_a, out_b = ctx.run("mask", a)[0], ctx.run("mask", b)[0]
    la, lb = _loss_of(out_a).detach(), _loss_of(out_b).detach()
    tol = _tol(la.dtype)
    scale = max(1.0, float(la.abs().max())) if la.numel() else 1.0
    bad = ~torch.isclose(la, lb, rtol=tol, atol=tol * scale, equal_nan=True)
    if bool(bad.any()):
        raise ctx.fail("mask", "the loss changed when only the inputs at masked positions changed (0 -> -7.5)", a, bad if bad.dim() else None)
    if isinstance(out_a, PolicyLossOutput):
        for key, va in out_a.metrics.items():
            vb = out_b.metrics.get(key)
            if vb is not None and not bool(torch.isclose(va.double(), vb.double(), rtol=tol, atol=tol, equal_nan=True)):
                raise ctx.fail("mask", f"metrics[{key!r}] changed ({fmt(float(va))} -> {fmt(float(vb))}) when only the inputs at masked positions changed (0 -> -7.5)", a)


def _tensors(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, tuple):
        return {"token_loss": batch[0], "loss_mask": batch[1]}
    named = {f: getattr(batch, f) for f in _LOSS_FIELDS if getattr(batch, f) is not None}
    named["loss_mask"] = batch.loss_mask
    return named


def _no_mutation(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch = case.batch
    if isinstance(batch, tuple):  # the aggregation gets this very tensor (run() would copy it)
        before = {k: v.clone() for k, v in _tensors(batch).items()}
        try:
            ctx.target.fn(batch[0], batch[1], **ctx.hyper, **_group_totals(ctx.target.fn, batch[1]))
        except Exception as err:
            raise ctx.fail("no_mutation", f"raised {type(err).__name__}: {err}", batch) from err
        shown = (before["token_loss"], before["loss_mask"])
    else:
        before = {k: v.clone() for k, v in _tensors(batch).items()}
        out, leaf = ctx.run("no_mutation", batch)
        if not torch.equal(leaf.detach(), before["log_probs"]):
            raise ctx.fail("no_mutation", "log_probs was changed in place", batch, leaf.detach() != before["log_probs"])
        shown = attrs.evolve(batch, **{k: v for k, v in before.items()})
    for key, now in _tensors(batch).items():
        if not torch.equal(now, before[key]):
            raise ctx.fail("no_mutation", f"{key} was changed in place", shown, now != before[key])


def _deterministic(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    (o1, l1), (o2, l2) = ctx.run("deterministic", case.batch), ctx.run("deterministic", case.batch)
    a, b = _loss_of(o1).detach(), _loss_of(o2).detach()
    if not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
        raise ctx.fail("deterministic", "the loss differs between two calls on the same batch", case.batch, (a != b) if a.dim() else None)
    g1, g2 = ctx.grad("deterministic", case.batch, o1, l1), ctx.grad("deterministic", case.batch, o2, l2)
    if not torch.equal(torch.nan_to_num(g1), torch.nan_to_num(g2)):
        raise ctx.fail("deterministic", "the gradient differs between two calls on the same batch", case.batch, g1 != g2)


def _zero_grad(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    b = case.batch
    lp = b.log_probs
    at_one = attrs.evolve(
        b, old_log_probs=lp.clone(), advantages=torch.zeros_like(lp),
        ref_log_probs=None if b.ref_log_probs is None else lp.clone(),
        rollout_log_probs=None if b.rollout_log_probs is None else lp.clone(),
    )
    out, leaf = ctx.run("zero_grad_at_ratio_one_zero_adv", at_one)
    g = ctx.grad("zero_grad_at_ratio_one_zero_adv", at_one, out, leaf)
    bad = ~torch.isclose(g, torch.zeros_like(g), rtol=0.0, atol=_tol(g.dtype) * 1e-2)
    if bool(bad.any()):
        vals = [f"{p}: gradient {fmt(float(g[p]))}" for p in positions(bad)[:4]]
        raise ctx.fail("zero_grad_at_ratio_one_zero_adv", "the gradient is non-zero with ratio 1 and zero advantages", at_one, bad, extra=vals)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, tuple):
        return batch[0][start:stop], batch[1][start:stop]
    return attrs.evolve(batch, **{f: getattr(batch, f)[start:stop] for f in _LOSS_FIELDS if getattr(batch, f) is not None}, loss_mask=batch.loss_mask[start:stop])


def _microbatch_invariant(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch, cuts = case.batch, case.extra["cuts"]
    m = _mask_of(batch)
    totals = {"global_tokens": max(int(m.sum()), 1), "global_seqs": m.shape[0], "max_seq_len": m.shape[1]}
    aggs = [("(the aggregation itself)", None)] if ctx.target.kind == "aggregation" else ctx.aggregations

    def aggregate(agg, sub, cut, run, last):
        out, leaf = run
        if agg is None:  # checking an aggregation: its own call with the totals
            groups = _group_totals(ctx.target.fn, m, cut)
            call = lambda x: ctx.target.fn(x, _mask_of(sub), **{**ctx.hyper, **totals, **groups})  # noqa: E731
            token_loss = leaf
        else:
            groups = _group_totals(agg, m, cut)
            call = lambda x: agg(x, _mask_of(sub), **totals, **groups)  # noqa: E731
            token_loss = out.token_loss
        value = call(token_loss)
        with torch.no_grad():  # the same reduction of |l|: the size of what is summed
            size = float(call(token_loss.detach().abs()))
        return value, ctx.grad("microbatch_invariant", sub, out, leaf, value, retain=not last), size

    # One loss call per (micro-)batch, shared by the aggregations (each takes its own gradient).
    subs = [(batch, (0, m.shape[0]))] + [(_slice(batch, a, z), (a, z)) for a, z in cuts]
    runs = [ctx.run("microbatch_invariant", sub) for sub, _ in subs]
    for k, (name, agg) in enumerate(aggs):
        last = k == len(aggs) - 1
        full_value, full_grad, full_size = aggregate(agg, batch, subs[0][1], runs[0], last)
        parts = [aggregate(agg, sub, cut, run, last) for (sub, cut), run in zip(subs[1:], runs[1:])]
        value = sum(float(v.detach()) for v, _, _ in parts)
        grad = torch.cat([g for _, g, _ in parts])
        tol = _tol(full_grad.dtype)
        scale = max(1.0, float(full_grad.abs().max()))
        bad = ~torch.isclose(grad, full_grad, rtol=tol, atol=tol * scale)
        full_value = full_value.detach()
        # Round-off of a sum scales with the summed magnitudes, not with the (possibly cancelled)
        # result: 1e6 - 1e6 + 0.1 in float32 differs by 0.04 between summation orders.
        vscale = max(1.0, abs(float(full_value)), full_size, *(abs(s) for _, _, s in parts))
        if bool(bad.any()) or abs(value - float(full_value)) > tol * vscale:
            vals = [f"{p}: full batch {fmt(float(full_grad[p]))}, micro-batches {fmt(float(grad[p]))}" for p in positions(bad)[:4]]
            extra = [f"aggregation: {name} with {totals}", f"micro-batches (rows [start, stop)): {cuts}",
                     f"aggregated loss: full batch {fmt(float(full_value))}, sum over micro-batches {fmt(value)}"] + vals
            raise ctx.fail("microbatch_invariant", "the micro-batch gradients do not add up to the full-batch gradient", batch, bad, extra=extra)


_CHECKS: dict[str, Callable[[_Ctx, Case], None]] = {
    "finite": _finite,
    "shapes": _shapes,
    "masked_grad_zero": _masked_grad_zero,
    "mask": _mask,
    "no_mutation": _no_mutation,
    "deterministic": _deterministic,
    "zero_grad_at_ratio_one_zero_adv": _zero_grad,
    "microbatch_invariant": _microbatch_invariant,
}


def _strategy(prop: str, records: st.SearchStrategy) -> st.SearchStrategy[Case]:
    if prop == "microbatch_invariant":
        return records.flatmap(lambda b: microbatch_cuts(_mask_of(b).shape[0]).map(lambda c: Case(b, cuts=c)))
    return records.map(Case)


def _run(target: Target, properties: Any, hyper: Mapping[str, Any] | None, aggs, settings: Settings | None, records) -> None:
    __tracebackhide__ = True
    chosen = select(target.kind, target.promises, properties)
    ctx = _Ctx(target=target, hyper=dict(hyper or {}), aggregations=aggs)
    config = kit_settings(settings)
    for prop in chosen:
        run_property(prop, _strategy(prop, records), functools.partial(_CHECKS[prop], ctx), config)


def _aggregations(table: AlgorithmTable, aggregations: Any) -> list[tuple[str, Callable]]:
    if aggregations is None:
        # Every aggregation of the table that is itself exact under micro-batching (not
        # token_mean_legacy, whose value depends on the micro-batch size by definition).
        names = [n for n in table.names("aggregation") if "microbatch_invariant" in table.entry("aggregation", n).promises]
        if not names:
            return [("reference_token_mean", reference_token_mean)]
        return [(n, table.get("aggregation", n)) for n in names]
    if isinstance(aggregations, str) or callable(aggregations):
        aggregations = [aggregations]
    out = []
    for agg in aggregations:
        out.append((agg, table.get("aggregation", agg)) if isinstance(agg, str) else (getattr(agg, "__name__", repr(agg)), agg))
    return out


def check_policy_loss(
    loss: Any,
    *,
    table: AlgorithmTable | None = None,
    properties: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    aggregations: Any = None,
    settings: Settings | None = None,
) -> None:
    """Check a policy loss against its property battery; raise on the first failure.

    Args:
        loss: a registered name (looked up in ``table``), a native loss ``fn(batch:
            PolicyLossInput, **hyper) -> PolicyLossOutput`` or a SkyRL-style function
            ``fn(log_probs, old_log_probs, advantages, config, loss_mask) -> (loss, clip_ratio)``
            (its scalar loss ``L`` is checked as the per-token loss ``L * mask``; ``config`` holds
            SkyRL's defaults updated with ``hyperparameters``).
        table: where names (of the loss and the aggregations) are looked up; ``DEFAULT_TABLE``.
        properties: property names to check; None means the universal ones for a policy loss
            (``skyrl_fn.core.properties.universal("policy_loss")``) plus what the entry promises.
        hyperparameters: keyword hyperparameters passed on every call.
        aggregations: for ``microbatch_invariant``: names or functions of kind ``aggregation``;
            None means every aggregation in ``table`` that promises ``microbatch_invariant``
            (``reference_token_mean`` if none does).
        settings: hypothesis settings per property (see ``check_estimator``).

    Raises:
        PropertyViolation: an ``AssertionError`` whose message starts with the property name.
        ValueError: a selected property does not apply to policy losses.
    """
    __tracebackhide__ = True
    table = DEFAULT_TABLE if table is None else table
    target = resolve(loss, "policy_loss", table)
    _run(target, properties, hyperparameters, _aggregations(table, aggregations), settings, policy_loss_inputs())


def check_aggregation(
    aggregation: Any,
    *,
    table: AlgorithmTable | None = None,
    properties: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> None:
    """Check an aggregation ``fn(token_loss [B, T], loss_mask [B, T], *, global_tokens=None,
    global_seqs=None, max_seq_len=None) -> []`` (or a registered name): universal properties,
    zero gradient at masked tokens, and (when promised) exact micro-batching with the global
    totals (always for a bare function, which promises nothing; for a registered name when its
    entry promises ``microbatch_invariant``). An aggregation that takes ``group_ids`` (``prompt_mean``) gets three interleaved
    prompts, and under micro-batching the whole batch's ``group_tokens`` / ``global_groups``.

    Raises:
        PropertyViolation: an ``AssertionError`` whose message starts with the property name.
    """
    __tracebackhide__ = True
    target = resolve(aggregation, "aggregation", table)
    if properties is None and target.style != "table":
        # A bare function declares nothing: check the contract the kind exists for. A table entry's
        # promises decide (token_mean_legacy is micro-batch dependent by definition).
        properties = universal("aggregation") | {"microbatch_invariant"}
    _run(target, properties, hyperparameters, (), settings, token_losses())
