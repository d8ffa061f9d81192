"""The one explicit literal of built-ins that ``DEFAULT_TABLE`` is built from.

Each row: ``(kind, name, function, promises)``. ``promises`` are the invariants (see
``skyrl_fn.properties``) the testing kit checks for that entry on top of the universal ones.
Importing this module has no side effects beyond importing the functions.
"""

from __future__ import annotations

import functools

from skyrl_fn import estimators as est

_GROUP_NORM = frozenset({"permutation_equivariant", "group_local", "shift_invariant", "scale_invariant"})
_GROUP_CENTRED = frozenset({"permutation_equivariant", "group_local", "shift_invariant"})

BUILTINS = (
    # -- advantage estimators -------------------------------------------------------------
    ("advantage_estimator", "grpo", est.grpo, _GROUP_NORM),
    ("advantage_estimator", "dr_grpo", functools.partial(est.grpo, norm_by_std=False), _GROUP_CENTRED),
)
