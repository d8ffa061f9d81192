"""Names of the invariants a registered function can promise (checked by ``skyrl_fn.testing``).

Every function is always checked for the universal properties of its kind (``universal(kind)``);
the others are promised per function at ``register`` time (``promises=...``), and the testing kit
checks exactly those. ``DESCRIPTIONS`` says what each name means; it is what a failing check
prints under the property name.
"""

from __future__ import annotations

from typing import Mapping

__all__ = [
    "UNIVERSAL",
    "ESTIMATOR_PROPERTIES",
    "LOSS_PROPERTIES",
    "AGGREGATION_PROPERTIES",
    "KL_PROPERTIES",
    "KNOWN",
    "DESCRIPTIONS",
    "ORDER",
    "ROW_LOCAL_POLICY_LOSS",
    "universal",
    "applicable",
    "check_promises",
]

#: Checked for every estimator, loss and aggregation (and, but ``mask``, KL estimator): output shapes/dtypes, zero output off the
#: mask (and independent of the inputs' values there), finite output (also on constant and
#: size-1 groups, all-masked rows, extreme but finite inputs), inputs never mutated, deterministic.
UNIVERSAL = frozenset({"shapes", "mask", "finite", "no_mutation", "deterministic"})

ESTIMATOR_PROPERTIES = frozenset(
    {
        "permutation_equivariant",  # permuting rows permutes the outputs the same way
        "group_local",  # changing one group's rewards changes only that group's advantages
        "shift_invariant",  # adding a constant c_g to every score of group g leaves advantages unchanged
        "scale_invariant",  # scaling every reward of group g by c_g > 0 leaves advantages unchanged
        "batch_shift_invariant",  # adding one constant to every score of the batch leaves advantages unchanged
        "batch_scale_invariant",  # scaling every reward of the batch by one c > 0 leaves advantages unchanged
        "rejects_singleton_groups",  # raises ValueError on a size-1 group (needs >= 2 samples per group)
    }
)

LOSS_PROPERTIES = frozenset(
    {
        "masked_grad_zero",  # the gradient is exactly zero at masked tokens
        "microbatch_invariant",  # summed micro-batch gradients equal the full-batch gradient
        "zero_grad_at_ratio_one_zero_adv",  # ratio 1 and zero advantages give zero gradient
    }
)

#: Aggregations share the loss vocabulary (gradient w.r.t. ``token_loss``).
AGGREGATION_PROPERTIES = frozenset({"masked_grad_zero", "microbatch_invariant"})

#: KL estimators ``fn(log_probs, ref_log_probs) -> [B, T]`` take no mask (masking happens outside),
#: so ``mask`` does not apply; every one must be token-local and 0 at the reference.
KL_PROPERTIES = frozenset(
    {
        "token_local",  # each output token depends only on the two inputs at that token
        "zero_at_reference",  # log_probs == ref_log_probs gives 0 everywhere
        "non_negative",  # the estimate is >= 0 for every input (k2, k3, abs; not k1)
    }
)

KNOWN = UNIVERSAL | ESTIMATOR_PROPERTIES | LOSS_PROPERTIES | KL_PROPERTIES

#: What a row-local policy-gradient loss promises (every PPO-family loss): register it with
#: ``promises=ROW_LOCAL_POLICY_LOSS``. Losses that select tokens from batch-wide statistics
#: (Clip-Cov, KL-Cov) are not micro-batch invariant and must not promise it.
ROW_LOCAL_POLICY_LOSS = frozenset({"microbatch_invariant", "zero_grad_at_ratio_one_zero_adv"})

DESCRIPTIONS: Mapping[str, str] = {
    "shapes": "outputs have the documented shape and the inputs' dtype",
    "mask": "outputs are 0 wherever the mask is 0 and do not depend on the inputs' values there",
    "finite": "outputs (and gradients) are finite on every valid batch: constant and size-1 groups, "
    "all-masked rows, extreme but finite values",
    "no_mutation": "input tensors are never changed in place",
    "deterministic": "two calls on the same batch give bitwise-identical outputs",
    "permutation_equivariant": "permuting the rows of the batch permutes the outputs the same way",
    "group_local": "changing one group's rewards changes only that group's advantages",
    "shift_invariant": "adding a constant c_g to every outcome score of group g leaves the advantages unchanged",
    "scale_invariant": "multiplying every reward of group g by a constant c_g > 0 leaves the advantages unchanged",
    "batch_shift_invariant": "adding one constant to every outcome score of the batch leaves the advantages unchanged",
    "batch_scale_invariant": "multiplying every reward of the batch by one constant c > 0 leaves the advantages unchanged",
    "rejects_singleton_groups": "a batch holding a size-1 group raises ValueError",
    "masked_grad_zero": "the gradient is exactly 0 at masked tokens",
    "microbatch_invariant": "the gradient summed over micro-batches (aggregated with global_tokens/global_seqs) "
    "equals the full-batch gradient",
    "zero_grad_at_ratio_one_zero_adv": "with log_probs == old_log_probs (ratio 1) and zero advantages the gradient is 0",
    "token_local": "the output on any block of rows and tokens equals that block of the full output (no coupling "
    "across tokens or rows, so micro-batching cannot change it)",
    "zero_at_reference": "with log_probs == ref_log_probs the estimate is 0 at every token",
    "non_negative": "the estimate is >= 0 at every token, for every input",
}

#: The order the kit checks properties in: basic ones first, so a broken function is reported under
#: the most basic property it breaks (an in-place edit as ``no_mutation``, not as the
#: non-determinism it causes; randomness as ``deterministic``, not as a padding dependence).
ORDER: tuple[str, ...] = (
    "finite",
    "shapes",
    "no_mutation",
    "deterministic",
    "masked_grad_zero",
    "mask",
    "token_local",
    "zero_at_reference",
    "non_negative",
    "rejects_singleton_groups",
    "permutation_equivariant",
    "group_local",
    "shift_invariant",
    "scale_invariant",
    "batch_shift_invariant",
    "batch_scale_invariant",
    "zero_grad_at_ratio_one_zero_adv",
    "microbatch_invariant",
)

_UNIVERSAL_BY_KIND: Mapping[str, frozenset[str]] = {
    "advantage_estimator": UNIVERSAL,
    # Zero gradient at masked tokens is what the mask means for a loss: no opt-out.
    "policy_loss": UNIVERSAL | {"masked_grad_zero"},
    # The aggregation kind exists to be exact under micro-batching (global_tokens/global_seqs).
    "aggregation": UNIVERSAL | {"masked_grad_zero", "microbatch_invariant"},
    "kl_estimator": (UNIVERSAL - {"mask"}) | {"token_local", "zero_at_reference"},
}
_APPLICABLE_BY_KIND: Mapping[str, frozenset[str]] = {
    "advantage_estimator": UNIVERSAL | ESTIMATOR_PROPERTIES,
    "policy_loss": UNIVERSAL | LOSS_PROPERTIES,
    "aggregation": UNIVERSAL | AGGREGATION_PROPERTIES,
    "kl_estimator": (UNIVERSAL - {"mask"}) | KL_PROPERTIES,
}


def universal(kind: str) -> frozenset[str]:
    """The properties checked for every function of ``kind`` (promised or not)."""
    try:
        return _UNIVERSAL_BY_KIND[kind]
    except KeyError:
        raise ValueError(f"kind: expected one of {sorted(_UNIVERSAL_BY_KIND)}, got {kind!r}") from None


def applicable(kind: str) -> frozenset[str]:
    """The properties the testing kit can check for a function of ``kind``."""
    try:
        return _APPLICABLE_BY_KIND[kind]
    except KeyError:
        raise ValueError(f"kind: expected one of {sorted(_APPLICABLE_BY_KIND)}, got {kind!r}") from None


def check_promises(name: str, promises) -> frozenset[str]:
    """Return ``promises`` as a frozenset, raising ValueError on an unknown property name."""
    if isinstance(promises, str):
        raise TypeError(f"promises for {name!r}: expected a collection of property names, got the string {promises!r}")
    out = frozenset(promises or ())
    unknown = sorted(out - KNOWN)
    if unknown:
        raise ValueError(f"promises for {name!r}: unknown properties {unknown}; expected some of {sorted(KNOWN)}")
    return out
