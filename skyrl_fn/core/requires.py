"""What a function reads beyond the fields every record has: declared once, on the function.

A training run builds models only for what its pieces read: a critic when the advantage
estimator reads ``AdvantageInput.values`` (GAE), a reference model when a policy loss reads
``PolicyLossInput.ref_log_probs``. The fact is declared on the function with :func:`requires`
and read back with :func:`requirements`, which looks through ``functools.partial`` and through
any object that defines ``__skyrl_requires__`` itself (``skyrl_fn.core.compose.Chain`` unions its
pieces'), so ``chain(gae, clip_advantages(1.0))`` registered under a new name still needs a
critic. ``AlgorithmTable.register`` stores the result on the ``Entry``.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

__all__ = ["INPUTS", "check_inputs", "requires", "requirements"]

#: The optional inputs a piece can require: critic values (``AdvantageInput.values``, so a run
#: builds a critic), baseline rewards (``AdvantageInput.reward_baselines``: ReMax's greedy sample),
#: reference log-probs (``PolicyLossInput.ref_log_probs``, so a run builds a reference model) and
#: rollout log-probs (``PolicyLossInput.rollout_log_probs``).
INPUTS = frozenset({"values", "reward_baselines", "ref_log_probs", "rollout_log_probs"})

F = TypeVar("F", bound=Callable)


def check_inputs(inputs) -> frozenset[str]:
    """``inputs`` as a frozenset; raises ValueError naming any not in :data:`INPUTS`."""
    if isinstance(inputs, str):
        raise TypeError(f"requires: expected a collection of input names, got the string {inputs!r}")
    out = frozenset(inputs)
    unknown = sorted(out - INPUTS)
    if unknown:
        raise ValueError(f"requires: expected inputs from {sorted(INPUTS)}, got {unknown}")
    return out


def requires(*inputs: str) -> Callable[[F], F]:
    """Decorator: ``fn`` reads the optional ``inputs`` (names from :data:`INPUTS`).

    Example::

        @requires("values")
        def gae(batch: AdvantageInput, *, gamma: float = 1.0, lambd: float = 1.0) -> AdvantageOutput: ...

    Raises:
        ValueError: an input name not in :data:`INPUTS`.
    """
    declared = check_inputs(inputs)

    def mark(fn: F) -> F:
        fn.__skyrl_requires__ = declared
        return fn

    return mark


def requirements(fn: Callable) -> frozenset[str]:
    """The optional inputs ``fn`` reads: its ``__skyrl_requires__``, looking through partials."""
    while isinstance(fn, functools.partial):
        own = getattr(fn, "__skyrl_requires__", None)
        if own is not None:
            return check_inputs(own)
        fn = fn.func
    return check_inputs(getattr(fn, "__skyrl_requires__", ()))
