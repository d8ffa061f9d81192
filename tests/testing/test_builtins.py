"""Every built-in of DEFAULT_TABLE (estimators, policy losses, aggregations, KL estimators, batch transforms) passes
the kit: the universal properties of its kind plus what its entry promises."""

from __future__ import annotations

import pytest
from hypothesis import Phase, settings

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn import KINDS
from skyrl_fn.core.properties import reportable
from skyrl_fn.testing import (
    PropertyViolation, check_aggregation, check_batch_transform, check_correction, check_estimator, check_kl_estimator, check_policy_loss,
)

#: The sweep over every built-in scales with the hypothesis profile (dev: 7 per property).
SWEEP = settings(deadline=None, database=None, max_examples=max(5, settings.default.max_examples // 4))
#: The same search without shrinking, for tests that assert only which properties hold: shrinking
#: each broken property's counterexample was a third of this file's CPU and changes no assertion
#: (tests/testing/test_broken_estimators.py checks that violations are shrunk).
NO_SHRINK = settings(SWEEP, phases=[Phase.explicit, Phase.reuse, Phase.generate])
CHECKS = {
    "advantage_estimator": check_estimator,
    "policy_loss": check_policy_loss,
    "aggregation": check_aggregation,
    "kl_estimator": check_kl_estimator,
    "off_policy_correction": check_correction,
    "batch_transform": check_batch_transform,
}
KIT_ENTRIES = DEFAULT_TABLE.entries()


def test_the_kit_covers_every_algorithm_kind():
    # Tasks, rewards and rollout backends are pieces of a training run, not of the algorithm: the
    # run table adds them (skyrl_fn.trainer.run_table) and no invariant kit applies to them.
    from skyrl_fn.trainer.run_table import RUN_KINDS

    assert set(CHECKS) == set(KINDS) - set(RUN_KINDS)


@pytest.mark.parametrize("entry", KIT_ENTRIES, ids=[f"{e.kind}:{e.name}" for e in KIT_ENTRIES])
def test_every_builtin_passes_its_promises(entry):
    CHECKS[entry.kind](entry.name, settings=SWEEP)


#: Built-ins whose promises are exactly what they satisfy: every optional property they do not
#: promise breaks (``test_every_builtin_passes_its_promises`` checks that the promised ones hold).
EXACT = ("gdpo", "gdpo_raw", "optimal_token_baseline", "tir_optimal_token_baseline")
#: The search for a counterexample of a property that must break: it stops at the first one, so the
#: cap costs nothing unless the counterexample is rare (gdpo's group_local: ~1 example in 3; 7
#: examples missed it ~1 run in 13).
BREAKS = settings(NO_SHRINK, max_examples=50)


@pytest.mark.parametrize("name", EXACT)
def test_new_estimators_promise_exactly_what_they_satisfy(name):
    # The same searches as check_estimator(name, report=True) makes for its report, without
    # re-running the promised properties the sweep above checks.
    unpromised = sorted(reportable("advantage_estimator") - DEFAULT_TABLE.entry("advantage_estimator", name).promises)
    held = []
    for prop in unpromised:
        try:
            check_estimator(name, properties=[prop], settings=BREAKS)
        except PropertyViolation as err:
            assert err.property == prop, str(err)
        else:
            held.append(prop)
    assert held == [], f"{name} satisfies {held} without promising it"
