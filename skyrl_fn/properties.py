"""Names of the invariants a registered function can promise (checked by ``skyrl_fn.testing``).

Every function is always checked for the universal properties; the others are promised per
function at ``register`` time (``promises=...``), and the testing kit checks exactly those.
"""

from __future__ import annotations

__all__ = ["UNIVERSAL", "ESTIMATOR_PROPERTIES", "LOSS_PROPERTIES", "KNOWN", "check_promises"]

#: Checked for every estimator and loss: output shapes/dtypes, zero output off the mask, finite
#: output (also on constant and size-1 groups), inputs never mutated, deterministic.
UNIVERSAL = frozenset({"shapes", "mask", "finite", "no_mutation", "deterministic"})

ESTIMATOR_PROPERTIES = frozenset(
    {
        "permutation_equivariant",  # permuting rows permutes the outputs the same way
        "group_local",  # changing one group's rewards changes only that group's advantages
        "shift_invariant",  # adding a constant to every score of a group leaves advantages unchanged
        "scale_invariant",  # scaling every score of a group by c > 0 leaves advantages unchanged
    }
)

LOSS_PROPERTIES = frozenset(
    {
        "masked_grad_zero",  # the gradient is exactly zero at masked tokens
        "microbatch_invariant",  # summed micro-batch gradients equal the full-batch gradient
        "zero_grad_at_ratio_one_zero_adv",  # ratio 1 and zero advantages give zero gradient
    }
)

KNOWN = UNIVERSAL | ESTIMATOR_PROPERTIES | LOSS_PROPERTIES


def check_promises(name: str, promises) -> frozenset[str]:
    """Return ``promises`` as a frozenset, raising ValueError on an unknown property name."""
    if isinstance(promises, str):
        raise TypeError(f"promises for {name!r}: expected a collection of property names, got the string {promises!r}")
    out = frozenset(promises or ())
    unknown = sorted(out - KNOWN)
    if unknown:
        raise ValueError(f"promises for {name!r}: unknown properties {unknown}; expected some of {sorted(KNOWN)}")
    return out
