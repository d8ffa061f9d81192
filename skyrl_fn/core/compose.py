"""optax-style composition: build an advantage estimator from pieces with :func:`chain`.

A chain is a frozen value holding, in order::

    reward transforms     AdvantageInput -> AdvantageInput                    (applied first)
    one estimator         AdvantageInput -> AdvantageOutput                   (a built-in, or
                                                                               outcome_estimator(...))
    advantage transforms  (AdvantageOutput, AdvantageInput) -> AdvantageOutput (applied last)

so a new estimator is built and named in one call (what a piece reads besides the rewards, e.g.
critic values for ``gae``, carries over: see ``skyrl_fn.core.requires``)::

    table = DEFAULT_TABLE.register("clipped_grpo", chain(scale_rewards(2.0), grpo, clip_advantages(1.0)))

The chain is itself an advantage estimator: ``chain(...)(batch, **hyper)`` passes ``hyper`` to its
estimator, and its ``__signature__`` exposes exactly the estimator's hyperparameters, so
``AlgorithmTable.check_hyperparameters`` rejects unknown names. What the pieces need
(``skyrl_fn.core.requires``, e.g. critic ``values`` for GAE) the chain needs: ``chain(gae_raw,
clip_advantages(1.0))`` registered under any name is an entry with ``requires == {"values"}``. Transform hyperparameters are
fixed when the piece is built (``clip_advantages(1.0)``), as in optax.

Pieces never change their inputs: transforms derive new records with ``attrs.evolve``, which runs
every record validator again (shapes, dtypes, finiteness). Advantage transforms receive the batch
the estimator saw (after the reward transforms).

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import attrs
import torch

from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.requires import requirements
from skyrl_fn.core.table import hyperparameters, infer_kind

__all__ = ["RewardTransform", "AdvantageTransform", "Chain", "chain", "piece_name"]


def _check_callable(name: str):
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if not callable(value):
            raise TypeError(f"{name}: expected a callable, got {type(value).__name__}")

    return check


def _check_name(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"name: expected a string or None, got {type(value).__name__}")


def piece_name(fn: Callable) -> str:
    """A short readable name for a piece: ``grpo``, ``partial(grpo, norm_by_std=False)``, ..."""
    if isinstance(fn, functools.partial):
        args = [piece_name(fn.func)] + [repr(a) for a in fn.args]
        args += [f"{k}={v!r}" for k, v in fn.keywords.items()]
        return f"partial({', '.join(args)})"
    if isinstance(fn, (RewardTransform, AdvantageTransform, Chain)) or attrs.has(type(fn)):
        return repr(fn)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else repr(fn)


@attrs.frozen(eq=False)
class RewardTransform:
    """A piece applied before the estimator: ``fn(batch: AdvantageInput) -> AdvantageInput``.

    Wrap your own function to use it in :func:`chain`; the library's reward transforms
    (``scale_rewards``, ``shape_rewards``, ``weighted_sum``, ``length_penalty``) return one.

    Attributes:
        fn: the pure function; it must return a new ``AdvantageInput`` of the same ``[B, T]``
            (derive it with ``attrs.evolve``, never change the input).
        name: shown in reprs and errors; defaults to the function's name.
    """

    fn: Callable[[AdvantageInput], AdvantageInput] = attrs.field(validator=_check_callable("RewardTransform.fn"))
    name: str | None = attrs.field(default=None, validator=_check_name)

    @property
    def __skyrl_requires__(self) -> frozenset[str]:
        """The optional inputs ``fn`` declares (``skyrl_fn.core.requires``)."""
        return requirements(self.fn)

    def __call__(self, batch: AdvantageInput) -> AdvantageInput:
        out = self.fn(batch)
        if not isinstance(out, AdvantageInput):
            raise TypeError(f"reward transform {self!r}: expected it to return an AdvantageInput, got {type(out).__name__}")
        if out.token_level_rewards.shape != batch.token_level_rewards.shape:
            raise ValueError(
                f"reward transform {self!r}: expected token_level_rewards of shape [B, T] = "
                f"{tuple(batch.token_level_rewards.shape)} (as its input), got {tuple(out.token_level_rewards.shape)}"
            )
        if not torch.equal(out.response_mask, batch.response_mask):
            raise ValueError(f"reward transform {self!r}: expected the response_mask unchanged, got a different mask")
        return out

    def __repr__(self) -> str:
        return self.name if self.name is not None else f"RewardTransform({piece_name(self.fn)})"


@attrs.frozen(eq=False)
class AdvantageTransform:
    """A piece applied after the estimator:
    ``fn(out: AdvantageOutput, batch: AdvantageInput) -> AdvantageOutput``.

    ``batch`` is the input the estimator saw (after any reward transforms). The library's
    advantage transforms (``whiten``, ``clip_advantages``, ``normalize_by_length``,
    ``group_normalize_std``) return one.

    Attributes:
        fn: the pure function; it must return a new ``AdvantageOutput`` (``attrs.evolve``).
        name: shown in reprs and errors; defaults to the function's name.
    """

    fn: Callable[[AdvantageOutput, AdvantageInput], AdvantageOutput] = attrs.field(
        validator=_check_callable("AdvantageTransform.fn")
    )
    name: str | None = attrs.field(default=None, validator=_check_name)

    @property
    def __skyrl_requires__(self) -> frozenset[str]:
        """The optional inputs ``fn`` declares (``skyrl_fn.core.requires``)."""
        return requirements(self.fn)

    def __call__(self, out: AdvantageOutput, batch: AdvantageInput) -> AdvantageOutput:
        new = self.fn(out, batch)
        if not isinstance(new, AdvantageOutput):
            raise TypeError(f"advantage transform {self!r}: expected it to return an AdvantageOutput, got {type(new).__name__}")
        if new.advantages.shape != out.advantages.shape:
            raise ValueError(
                f"advantage transform {self!r}: expected advantages of shape [B, T] = "
                f"{tuple(out.advantages.shape)} (as its input), got {tuple(new.advantages.shape)}"
            )
        return new

    def __repr__(self) -> str:
        return self.name if self.name is not None else f"AdvantageTransform({piece_name(self.fn)})"


class _ChainSignature:
    """``Chain.__signature__``: the estimator's hyperparameters, computed on access (never stored,
    so pickles hold only the pieces). On the class itself it is None, so ``inspect`` falls back to
    the constructor."""

    def __get__(self, obj: "Chain | None", cls: type) -> inspect.Signature | None:
        if obj is None:
            return None
        batch = inspect.Parameter("batch", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=AdvantageInput)
        params = [batch]
        accepted = hyperparameters(obj.estimator, "advantage_estimator")
        if accepted is None:
            params.append(inspect.Parameter("hyper", inspect.Parameter.VAR_KEYWORD))
        else:
            params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in accepted.items()]
        return inspect.Signature(params, return_annotation=AdvantageOutput)


@attrs.frozen(eq=False)
class Chain:
    """An advantage estimator made of pieces; build it with :func:`chain`.

    Calling it runs ``reward_transforms`` in order, then ``estimator(batch, **hyper)``, then
    ``advantage_transforms`` in order, under ``torch.no_grad``.

    Attributes:
        reward_transforms: tuple of :class:`RewardTransform`.
        estimator: the one advantage estimator.
        advantage_transforms: tuple of :class:`AdvantageTransform`.
    """

    reward_transforms: tuple[RewardTransform, ...]
    estimator: Callable[..., AdvantageOutput]
    advantage_transforms: tuple[AdvantageTransform, ...]

    __skyrl_kind__ = "advantage_estimator"
    __signature__ = _ChainSignature()

    def __attrs_post_init__(self) -> None:
        # Built directly rather than by chain(): check the same rules.
        if not isinstance(self.reward_transforms, tuple) or not all(isinstance(p, RewardTransform) for p in self.reward_transforms):
            raise TypeError(f"reward_transforms: expected a tuple of RewardTransform, got {self.reward_transforms!r}")
        if not isinstance(self.advantage_transforms, tuple) or not all(isinstance(p, AdvantageTransform) for p in self.advantage_transforms):
            raise TypeError(f"advantage_transforms: expected a tuple of AdvantageTransform, got {self.advantage_transforms!r}")
        if _role(0, self.estimator) != "estimator":
            raise TypeError(f"estimator: expected an advantage estimator, got {piece_name(self.estimator)}")

    @torch.no_grad()
    def __call__(self, batch: AdvantageInput, **hyper: Any) -> AdvantageOutput:
        if not isinstance(batch, AdvantageInput):
            raise TypeError(f"batch: expected an AdvantageInput, got {type(batch).__name__}")
        for transform in self.reward_transforms:
            batch = transform(batch)
        out = self.estimator(batch, **hyper)
        if not isinstance(out, AdvantageOutput):
            raise TypeError(
                f"estimator {piece_name(self.estimator)}: expected it to return an AdvantageOutput, got {type(out).__name__}"
            )
        for transform in self.advantage_transforms:
            out = transform(out, batch)
        return out

    @property
    def pieces(self) -> tuple[Callable, ...]:
        """Every piece, in the order they run."""
        return (*self.reward_transforms, self.estimator, *self.advantage_transforms)

    @property
    def __skyrl_requires__(self) -> frozenset[str]:
        """The optional inputs any piece reads (``skyrl_fn.core.requires``): a chain around an
        estimator that reads critic ``values`` needs them too, so ``Entry.requires`` of a
        registered chain says so."""
        return frozenset().union(*(requirements(p) for p in self.pieces))

    def __repr__(self) -> str:
        return f"chain({', '.join(piece_name(p) for p in self.pieces)})"


def _role(position: int, piece: Any) -> str:
    """``"reward"``, ``"estimator"`` or ``"advantage"``; raises TypeError for anything else."""
    if isinstance(piece, RewardTransform):
        return "reward"
    if isinstance(piece, AdvantageTransform):
        return "advantage"
    if not callable(piece):
        raise TypeError(
            f"chain: piece {position} expected a RewardTransform, an advantage estimator or an "
            f"AdvantageTransform, got {type(piece).__name__} ({piece!r})"
        )
    kind = infer_kind(piece)
    if kind == "advantage_estimator":
        return "estimator"
    if kind is None:
        raise TypeError(
            f"chain: piece {position} ({piece_name(piece)}) declares no kind; expected a RewardTransform, "
            f"an AdvantageTransform, or an advantage estimator (annotate its first parameter as "
            f"AdvantageInput). Wrap a plain function with RewardTransform(fn) or AdvantageTransform(fn)"
        )
    raise TypeError(
        f"chain: piece {position} ({piece_name(piece)}) expected a RewardTransform, an advantage "
        f"estimator or an AdvantageTransform, got a {kind}"
    )


def chain(*pieces: Callable) -> Chain:
    """Build one advantage estimator from pieces, optax-style.

    Order: any number of :class:`RewardTransform`, then exactly one advantage estimator, then any
    number of :class:`AdvantageTransform`::

        chain(r_1, ..., r_k, est, a_1, ..., a_m)(batch, **hyper)
            = a_m(... a_1(est(b', **hyper), b') ..., b')        with b' = r_k(... r_1(batch))

    Args:
        pieces: the pieces in the order they run. The estimator is any callable of kind
            ``advantage_estimator`` (a built-in such as ``skyrl_fn.estimators.grpo``, a
            ``functools.partial`` of one, ``outcome_estimator(baseline=...)``, another chain, or
            your function with its first parameter annotated ``AdvantageInput``).

    Returns:
        A frozen, picklable :class:`Chain` (kind ``advantage_estimator``) whose signature exposes
        the estimator's keyword hyperparameters.

    Raises:
        ValueError: no pieces, no estimator, two or more estimators, or a transform on the wrong
            side of the estimator (reward transforms before, advantage transforms after).
        TypeError: a piece that is not callable or is of another kind (e.g. a policy loss).
    """
    if not pieces:
        raise ValueError(
            "chain: expected reward transforms, exactly one advantage estimator, then advantage "
            "transforms, got nothing"
        )
    roles = [_role(i, p) for i, p in enumerate(pieces)]
    at = [i for i, r in enumerate(roles) if r == "estimator"]
    if not at:
        raise ValueError(
            f"chain: expected exactly one advantage estimator, got none among "
            f"{[piece_name(p) for p in pieces]}; add one, e.g. skyrl_fn.estimators.grpo or "
            f"outcome_estimator(baseline=group_mean)"
        )
    if len(at) > 1:
        found = ", ".join(f"{piece_name(pieces[i])} (piece {i})" for i in at)
        raise ValueError(f"chain: expected exactly one advantage estimator, got {len(at)}: {found}")
    e = at[0]
    for i, (role, piece) in enumerate(zip(roles, pieces)):
        if role == "reward" and i > e:
            raise ValueError(
                f"chain: reward transform {piece_name(piece)} (piece {i}) comes after the estimator "
                f"{piece_name(pieces[e])} (piece {e}); expected reward transforms before the estimator"
            )
        if role == "advantage" and i < e:
            raise ValueError(
                f"chain: advantage transform {piece_name(piece)} (piece {i}) comes before the estimator "
                f"{piece_name(pieces[e])} (piece {e}); expected advantage transforms after the estimator"
            )
    return Chain(reward_transforms=tuple(pieces[:e]), estimator=pieces[e], advantage_transforms=tuple(pieces[e + 1 :]))
