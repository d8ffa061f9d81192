"""What a function reads is declared on it and carried by partials, chains and the table."""

from __future__ import annotations

import functools
import pickle

import pytest

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, AdvantageTransform, chain, clip_advantages, requires
from skyrl_fn.estimators import gae, grpo
from skyrl_fn.core.requires import extras_required, missing_fields, requirements


def test_declared_on_the_function_and_seen_through_partials_and_chains():
    assert requirements(gae) == {"values"} and requirements(grpo) == set()
    assert requirements(functools.partial(gae, lambd=0.9)) == {"values"}
    assert requirements(chain(functools.partial(gae, gamma=0.99), clip_advantages(1.0))) == {"values"}
    assert requirements(chain(grpo, clip_advantages(1.0))) == set()

    @requires("values")
    def baseline_from_values(out: AdvantageOutput, batch: AdvantageInput) -> AdvantageOutput:
        return out

    # A transform that reads values makes the whole chain need a critic.
    assert requirements(chain(grpo, AdvantageTransform(baseline_from_values))) == {"values"}


def test_the_table_stores_it_on_the_entry_and_keeps_it_through_merge_and_pickle():
    table = DEFAULT_TABLE.register("gae_clipped", chain(gae, clip_advantages(1.0)))
    assert table.entry("advantage_estimator", "gae_clipped").requires == {"values"}
    assert DEFAULT_TABLE.entry("advantage_estimator", "gae").requires == {"values"}
    assert DEFAULT_TABLE.entry("advantage_estimator", "grpo").requires == set()
    # A wrapped function that cannot declare it itself: say it at registration.
    extra = DEFAULT_TABLE.register("wrapped", lambda batch: grpo(batch), kind="advantage_estimator", requires=("values",))
    assert extra.entry("advantage_estimator", "wrapped").requires == {"values"}
    merged = DEFAULT_TABLE.unregister("advantage_estimator", "gae").merge(table.unregister("advantage_estimator", "grpo"), replace=True)
    assert merged.entry("advantage_estimator", "gae_clipped").requires == {"values"}
    assert pickle.loads(pickle.dumps(table)).entry("advantage_estimator", "gae_clipped").requires == {"values"}


def test_unknown_inputs_are_errors_naming_them():
    with pytest.raises(ValueError, match=r"requires: expected inputs from \['ref_log_probs', 'reward_baselines', 'rollout_log_probs', 'teacher_log_probs', 'values'\] or per-sample fields 'extras.<key>', got \['critic'\]"):
        requires("critic")
    with pytest.raises(ValueError, match="critic"):
        DEFAULT_TABLE.register("x", grpo, replace=True, kind="advantage_estimator", requires=("critic",))
    with pytest.raises(TypeError, match="string"):
        DEFAULT_TABLE.register("x", grpo, kind="advantage_estimator", requires="values")


def test_builtin_requirements():
    declared = {e.name: e.requires for e in DEFAULT_TABLE.entries() if e.requires}
    otb = {"extras.old_log_probs", "extras.sum_pi_squared"}
    assert declared == {
        "gae": {"values"}, "gae_raw": {"values"}, "remax": {"reward_baselines"},
        "optimal_token_baseline": otb, "tir_optimal_token_baseline": otb, "distill": {"teacher_log_probs"},
    }


def test_per_sample_fields_are_declared_as_extras_keys():
    @requires("extras.format_reward", "values")
    def fn(batch: AdvantageInput) -> AdvantageOutput: ...

    assert extras_required(fn) == {"format_reward"} and requirements(fn) == {"extras.format_reward", "values"}
    assert extras_required(chain(fn, clip_advantages(1.0))) == {"format_reward"}
    for bad in ("extras.", "extras.a b", "format_reward"):
        with pytest.raises(ValueError, match="per-sample fields 'extras.<key>'"):
            requires(bad)
    missing_fields({"estimator 'x'": extras_required(fn)}, ["format_reward"], source="task")  # produced: fine
    with pytest.raises(ValueError, match=r"^estimator 'x' reads extras.format_reward; the task provides \['accuracy'\]$"):
        missing_fields({"estimator 'x'": extras_required(fn)}, ["accuracy"], source="the task provides ['accuracy']")
