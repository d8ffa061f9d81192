"""The advantage-estimator battery and ``check_estimator``.

Notation: ``B`` rows, ``T`` tokens, ``P`` groups; ``s_i = sum_t r_it m_it`` the outcome score.

Tolerances. Properties that compare two outputs run on float64 "grid" batches (see
``skyrl_fn.testing.strategies``). Permutation equivariance and group locality change nothing a
correct estimator computes, so they allow only reordering round-off (``rtol=1e-7``). Shift/scale
invariance is exact only without an epsilon: ``(s - mean) / (std + eps)`` moves by a relative
``eps / std`` under scaling; on grid data a non-constant group has ``std >= 1/8`` and scale factors
are ``>= 1/4``, so with ``eps <= 1e-6`` the change is below ``1e-4`` (the default ``rtol``).
Every tolerance is relative to ``max(1, max|advantages|)``.
"""

from __future__ import annotations

import functools

from typing import Any, Callable, Mapping

import attrs
import torch
from hypothesis import settings as Settings
from hypothesis import strategies as st

from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.testing._report import PropertyViolation, fmt, positions
from skyrl_fn.testing._resolve import Target, resolve
from skyrl_fn.testing._run import Case, kit_settings, run_property, select
from skyrl_fn.testing.strategies import advantage_inputs, decode

__all__ = ["check_estimator"]

_EXACT_RTOL = 1e-7
_EXACT_ATOL = 1e-9
_SCALES = (0.25, 0.5, 2.0, 3.0, 4.0)


@attrs.frozen
class _Ctx:
    target: Target
    hyper: Mapping[str, Any]
    rtol: float
    atol: float
    min_group_size: int

    def call(self, prop: str, batch: AdvantageInput) -> AdvantageOutput:
        """Run the estimator; an exception or a wrong return type is a violation of ``prop``."""
        __tracebackhide__ = True
        try:
            out = self.target.fn(batch, **self.hyper)
        except Exception as err:
            raise self.fail(prop, f"raised {type(err).__name__}: {err}", batch) from err
        if not isinstance(out, AdvantageOutput):
            raise self.fail("shapes", f"expected an AdvantageOutput, got {type(out).__name__}", batch)
        return out

    def fail(self, prop: str, detail: str, batch: Any, bad: torch.Tensor | None = None, extra=()) -> PropertyViolation:
        pos = positions(bad) if bad is not None else ()
        hyper = f"; hyperparameters {dict(self.hyper)}" if self.hyper else ""
        return PropertyViolation(prop, detail, function=self.target.label + hyper, batch=batch, positions=pos, extra=extra)


def _fields(out: AdvantageOutput, advantages_only: bool = False):
    return [("advantages", out.advantages)] if advantages_only else [("advantages", out.advantages), ("returns", out.returns)]


def _compare(ctx: _Ctx, prop: str, batch, expected: AdvantageOutput, got: AdvantageOutput, rows=None, *, rtol: float, atol: float, what: str, advantages_only=False, extra=()):
    """Fail ``prop`` where ``got`` differs from ``expected`` (on ``rows`` [B] bool if given)."""
    __tracebackhide__ = True
    for field, e in _fields(expected, advantages_only):
        g = getattr(got, field)
        if g.shape != e.shape:
            raise ctx.fail("shapes", f"{field} shape changed from {tuple(e.shape)} to {tuple(g.shape)}", batch)
        scale = max(1.0, float(e.detach().abs().max())) if e.numel() else 1.0
        bad = ~torch.isclose(g.detach().double(), e.detach().double(), rtol=rtol, atol=atol * scale, equal_nan=True)
        if rows is not None:
            bad &= rows[:, None]
        if bool(bad.any()):
            pos = positions(bad)
            vals = [f"{p}: expected {fmt(float(e[p]))}, got {fmt(float(g[p]))}" for p in pos[:4]]
            raise ctx.fail(prop, f"{field} {what}", batch, bad, extra=list(extra) + vals)


# -- universal ------------------------------------------------------------------------------------
def _finite(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    out = ctx.call("finite", case.batch)
    for field, x in _fields(out):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            raise ctx.fail("finite", f"{field} hold NaN/inf", case.batch, bad)


def _shapes(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch = case.batch
    out = ctx.call("shapes", batch)
    want = tuple(batch.token_level_rewards.shape)
    for field, x in _fields(out):
        if tuple(x.shape) != want:
            raise ctx.fail("shapes", f"{field} expected shape [B, T] = {want}, got {tuple(x.shape)}", batch)
        if x.dtype != batch.token_level_rewards.dtype:
            raise ctx.fail("shapes", f"{field} expected dtype {batch.token_level_rewards.dtype} (as the rewards), got {x.dtype}", batch)


def _with_padding(batch: AdvantageInput, value: float) -> AdvantageInput:
    m = batch.response_mask
    fill = lambda x: torch.where(m, x, torch.full_like(x, value))  # noqa: E731
    return attrs.evolve(batch, token_level_rewards=fill(batch.token_level_rewards), values=None if batch.values is None else fill(batch.values))


def _mask(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch = case.batch
    out = ctx.call("mask", batch)
    for field, x in _fields(out):
        bad = (x != 0) & ~batch.response_mask
        if bool(bad.any()):
            raise ctx.fail("mask", f"{field} are non-zero where response_mask is 0", batch, bad)
    zero, junk = _with_padding(batch, 0.0), _with_padding(batch, 512.0)
    _compare(
        ctx, "mask", zero, ctx.call("mask", zero), ctx.call("mask", junk), rtol=_EXACT_RTOL, atol=_EXACT_ATOL,
        what="changed when only the rewards/values at masked positions changed (0 -> 512)",
    )


def _inputs(batch: AdvantageInput) -> dict[str, torch.Tensor]:
    named = {"token_level_rewards": batch.token_level_rewards, "response_mask": batch.response_mask, "group_ids": batch.group_ids}
    for field in ("values", "reward_baselines"):
        if getattr(batch, field) is not None:
            named[field] = getattr(batch, field)
    named.update({f"extras[{k!r}]": v for k, v in batch.extras.items()})
    return named


def _no_mutation(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch = case.batch
    before = {k: v.clone() for k, v in _inputs(batch).items()}
    copy = {k: v.clone() for k, v in before.items()}  # shown in the message: the batch as generated
    ctx.call("no_mutation", batch)
    for key, now in _inputs(batch).items():
        if not torch.equal(now, before[key]):
            bad = now != before[key]
            shown = attrs.evolve(batch, **{k: v for k, v in copy.items() if "[" not in k})
            raise ctx.fail("no_mutation", f"{key} was changed in place", shown, bad if bad.dim() else None)


def _deterministic(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch = case.batch
    first, second = ctx.call("deterministic", batch), ctx.call("deterministic", batch)
    for field, a in _fields(first):
        b = getattr(second, field)
        if a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            bad = a != b if a.shape == b.shape else None
            raise ctx.fail("deterministic", f"{field} differ between two calls on the same batch", batch, bad)


# -- promised ---------------------------------------------------------------------------------------
def _rejects_singleton_groups(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    try:
        out = ctx.target.fn(case.batch, **ctx.hyper)
    except ValueError:
        return
    except Exception as err:
        raise ctx.fail("rejects_singleton_groups", f"expected ValueError on a size-1 group, got {type(err).__name__}: {err}", case.batch) from err
    raise ctx.fail("rejects_singleton_groups", f"expected ValueError on a size-1 group, got a {type(out).__name__}", case.batch)


def _rows(batch: AdvantageInput, index: torch.Tensor, group_ids: list) -> AdvantageInput:
    return AdvantageInput(
        token_level_rewards=batch.token_level_rewards[index],
        response_mask=batch.response_mask[index],
        group_ids=group_ids,
        values=None if batch.values is None else batch.values[index],
        reward_baselines=None if batch.reward_baselines is None else batch.reward_baselines[index],
        extras={k: v[index] for k, v in batch.extras.items()},
    )


def _permutation(n: int, swaps) -> list[int]:
    """The permutation of ``range(n)`` made by the transpositions ``swaps`` (taken modulo ``n``)."""
    perm = list(range(n))
    for i, j in swaps:
        perm[i % n], perm[j % n] = perm[j % n], perm[i % n]
    return perm


def _permutation_equivariant(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch, perm = case.batch, torch.tensor(case.extra["perm"])
    ids = batch.group_ids.tolist()
    permuted = _rows(batch, perm, [ids[i] for i in perm.tolist()])
    out, out_p = ctx.call("permutation_equivariant", batch), ctx.call("permutation_equivariant", permuted)
    expected = AdvantageOutput(advantages=out.advantages[perm], returns=out.returns[perm])
    _compare(ctx, "permutation_equivariant", batch, expected, out_p, rtol=_EXACT_RTOL, atol=_EXACT_ATOL,
             what="of the permuted batch are not the permuted advantages", extra=[f"permutation (new row i = old row perm[i]): {perm.tolist()}"])


def _group_local(ctx: _Ctx, case: Case) -> None:
    __tracebackhide__ = True
    batch, g, new = case.batch, case.extra["group"] % case.batch.num_groups, case.extra["new_rewards"]
    in_g = batch.group_ids == g
    t = batch.token_level_rewards.shape[1]
    fresh = torch.tensor([new[i % len(new)] for i in range(batch.batch_size * t)], dtype=batch.token_level_rewards.dtype).reshape(-1, t)
    changed = attrs.evolve(batch, token_level_rewards=torch.where(in_g[:, None], fresh, batch.token_level_rewards))
    out, out_c = ctx.call("group_local", batch), ctx.call("group_local", changed)
    _compare(ctx, "group_local", batch, out, out_c, ~in_g, rtol=_EXACT_RTOL, atol=_EXACT_ATOL, advantages_only=True,
             what=f"outside group {g} changed when only group {g}'s rewards changed",
             extra=[f"group {g} rows got rewards: {[[fmt(v) for v in r] for r in changed.token_level_rewards[in_g].tolist()]}"])


def _last_valid(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the last valid token of every row (rows are drawn with one at least)."""
    t = mask.shape[1]
    pos = torch.where(mask, torch.arange(t), -1).amax(dim=1)
    return torch.arange(t)[None, :] == pos[:, None]


def _invariance(prop: str, per_group: bool, shift: bool):
    def check(ctx: _Ctx, case: Case) -> None:
        __tracebackhide__ = True
        batch, consts = case.batch, case.extra["constants"]
        c = torch.tensor(consts, dtype=batch.token_level_rewards.dtype)
        c = c[batch.group_ids % len(consts)] if per_group else c[:1].expand(batch.batch_size)
        r = batch.token_level_rewards
        moved = r + c[:, None] * _last_valid(batch.response_mask) if shift else r * c[:, None]
        changed = attrs.evolve(batch, token_level_rewards=moved)
        verb = "adding" if shift else "multiplying by"
        what = f"changed after {verb} {'a per-group constant' if per_group else 'one constant'}"
        _compare(ctx, prop, batch, ctx.call(prop, batch), ctx.call(prop, changed), rtol=ctx.rtol, atol=ctx.atol, advantages_only=True,
                 what=what, extra=[f"constants per row: {[fmt(v) for v in c.tolist()]}"])

    return check


_CHECKS: dict[str, Callable[[_Ctx, Case], None]] = {
    "finite": _finite,
    "shapes": _shapes,
    "mask": _mask,
    "no_mutation": _no_mutation,
    "deterministic": _deterministic,
    "rejects_singleton_groups": _rejects_singleton_groups,
    "permutation_equivariant": _permutation_equivariant,
    "group_local": _group_local,
    "shift_invariant": _invariance("shift_invariant", True, True),
    "scale_invariant": _invariance("scale_invariant", True, False),
    "batch_shift_invariant": _invariance("batch_shift_invariant", False, True),
    "batch_scale_invariant": _invariance("batch_scale_invariant", False, False),
}


def _strategy(prop: str, min_group_size: int) -> st.SearchStrategy[Case]:
    general = advantage_inputs(min_group_size=min_group_size)
    grid = lambda **kw: advantage_inputs(dtypes=(torch.float64,), values="grid", **{"min_group_size": min_group_size, **kw})  # noqa: E731
    if prop == "rejects_singleton_groups":
        return advantage_inputs(singleton=True).map(Case)
    if prop == "permutation_equivariant":
        swaps = st.binary(min_size=2, max_size=8).map(lambda xs: list(zip(xs[0::2], xs[1::2])))
        return st.tuples(grid(), swaps).map(lambda bs: Case(bs[0], perm=_permutation(bs[0].batch_size, bs[1])))
    if prop == "group_local":
        rewards = st.binary(min_size=1, max_size=8).map(lambda xs: [decode(x, "grid") for x in xs])
        return st.tuples(grid(), st.integers(0, 3), rewards).map(lambda bgr: Case(bgr[0], group=bgr[1], new_rewards=bgr[2]))
    if prop in ("shift_invariant", "batch_shift_invariant", "scale_invariant", "batch_scale_invariant"):
        consts = st.integers(-8, 8).map(lambda k: k / 2) if "shift" in prop else st.sampled_from(_SCALES)
        # Size-1 groups are excluded: an estimator gives them a fixed baseline (GRPO: mean 0, std 1),
        # so they are not invariant by design; every row has a valid token to carry the shift.
        sizes = dict(min_group_size=max(2, min_group_size), min_valid=1)
        return st.tuples(grid(**sizes), st.lists(consts, min_size=1, max_size=4)).map(lambda bc: Case(bc[0], constants=bc[1]))
    return general.map(Case)


def check_estimator(
    estimator: Any,
    *,
    table: AlgorithmTable | None = None,
    properties: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Check an advantage estimator against its property battery; raise on the first failure.

    Each property is a hypothesis search over generated batches (``skyrl_fn.testing.strategies``):
    on failure hypothesis shrinks the batch, and a ``PropertyViolation`` names the property, the
    function, the offending ``(row, token)`` positions and prints the minimal batch.

    Args:
        estimator: a registered name (looked up in ``table``), a native estimator
            ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput`` or a SkyRL-style keyword
            function ``fn(token_level_rewards, response_mask, index, **kw) -> (adv, returns)``.
        table: where names are looked up; ``DEFAULT_TABLE`` by default.
        properties: property names to check (``skyrl_fn.core.properties``); None means the universal
            ones plus what the table entry promises (a bare function promises nothing more).
        hyperparameters: keyword hyperparameters passed on every call.
        settings: hypothesis settings per property (e.g. ``settings(max_examples=500)``); by
            default the loaded profile's, with ``DEFAULT_MAX_EXAMPLES`` under hypothesis's default.
        rtol / atol: tolerance of shift/scale invariance (see the module docstring).

    Raises:
        PropertyViolation: an ``AssertionError`` whose message starts with the property name.
        ValueError: a selected property does not apply to estimators.
        UnknownNameError: an unknown name.
    """
    __tracebackhide__ = True
    target = resolve(estimator, "advantage_estimator", table)
    chosen = select("advantage_estimator", target.promises, properties)
    # An estimator that rejects size-1 groups is checked on groups of 2 or more otherwise.
    min_size = 2 if "rejects_singleton_groups" in chosen else 1
    ctx = _Ctx(target=target, hyper=dict(hyperparameters or {}), rtol=rtol, atol=atol, min_group_size=min_size)
    config = kit_settings(settings)
    for prop in chosen:
        run_property(prop, _strategy(prop, min_size), functools.partial(_CHECKS[prop], ctx), config)
