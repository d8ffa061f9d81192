"""Degenerate settings: refused or warned with the reason, from the config and the entry's facts."""

from __future__ import annotations

import dataclasses

import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.trainer.degenerate import GROUP_CENTRED, degenerate_settings, singleton_behaviour


def _cfg(**groups) -> TrainConfig:
    base = TrainConfig()
    return dataclasses.replace(base, **{g: dataclasses.replace(getattr(base, g), **d) for g, d in groups.items()})


def _promises(name):
    return DEFAULT_TABLE.entry("advantage_estimator", name).promises


def _fields(findings, refuse):
    return [f.field for f in findings if f.refuse == refuse]


def test_the_default_config_is_not_degenerate():
    assert degenerate_settings(_cfg(), estimator_promises=_promises("grpo")) == ()


@pytest.mark.parametrize("name", DEFAULT_TABLE.names("advantage_estimator"))
def test_groups_of_one_are_refused_for_group_baselines_with_what_the_estimator_does(name):
    """Refused exactly for group-centred estimators (their entry's promises) and for those the
    probe finds vanishing or raising; the reason names what the estimator really does."""
    fn = DEFAULT_TABLE.estimator(name)
    behaviour = singleton_behaviour(fn)
    findings = degenerate_settings(_cfg(rollout={"samples_per_prompt": 1}), estimator_promises=_promises(name), singleton=behaviour)
    refused = [f for f in findings if f.refuse]
    expect = GROUP_CENTRED <= _promises(name) or behaviour in ("zero", "raises") or "rejects_singleton_groups" in _promises(name)
    assert bool(refused) == expect, (name, behaviour)
    if expect:
        assert behaviour in ("zero", "raw", "raises"), (name, behaviour)  # no unexplained case among the built-ins
        assert {"zero": "every advantage 0", "raw": "own reward", "raises": "rejects groups of 1"}[behaviour] in refused[0].message


def test_singleton_behaviour_of_the_builtins():
    assert singleton_behaviour(DEFAULT_TABLE.estimator("rloo")) == "zero"
    assert singleton_behaviour(DEFAULT_TABLE.estimator("grpo")) == "raw"  # SkyRL's mean 0, std 1
    assert singleton_behaviour(DEFAULT_TABLE.estimator("grpo_passk")) == "raises"


def test_refusal_names_the_field_and_the_reason():
    cfg = _cfg(rollout={"samples_per_prompt": 1}, algorithm={"advantage_estimator": "rloo"})
    (f,) = [f for f in degenerate_settings(cfg, estimator_promises=_promises("rloo"), singleton="zero") if f.refuse]
    assert f.message.startswith("rollout.samples_per_prompt: expected >= 2 with algorithm.advantage_estimator 'rloo'")
    assert f.message.endswith("got 1 (groups of 1 make every advantage 0, so nothing is learned)")


@pytest.mark.parametrize("groups, field, refuse", [
    ({"algorithm": {"off_policy_correction": "tis", "tis_cap": 0.0}}, "algorithm.tis_cap", True),
    ({"algorithm": {"use_kl_in_reward": True, "kl_ctrl": "adaptive", "kl_target": 0.0}}, "algorithm.kl_target", True),
    ({"trainer": {"micro_batch_size": 256}}, "trainer.micro_batch_size", False),
    ({"algorithm": {"kl_loss_coef": 0.1}}, "algorithm.kl_loss_coef", False),
    ({"algorithm": {"kl_coef": 0.1}}, "algorithm.kl_coef", False),
    ({"algorithm": {"use_kl_loss": True, "kl_loss_coef": 0.0}}, "algorithm.kl_loss_coef", False),
    ({"algorithm": {"use_kl_in_reward": True, "kl_coef": 0.0}}, "algorithm.kl_coef", False),
    ({"algorithm": {"tis_cap": 5.0}}, "algorithm.tis_cap", False),
    ({"algorithm": {"off_policy_correction": "tis"}}, "algorithm.off_policy_correction", False),
    ({"algorithm": {"entropy_coef": -0.01}}, "algorithm.entropy_coef", False),
    ({"trainer": {"steps": 3, "warmup_steps": 3}}, "trainer.warmup_steps", False),
    ({"trainer": {"keep_checkpoints": 1}}, "trainer.keep_checkpoints", False),
    ({"trainer": {"ckpt_interval": 0}}, "trainer.ckpt_interval", False),
])
def test_each_degenerate_setting(groups, field, refuse):
    findings = degenerate_settings(_cfg(**groups), estimator_promises=_promises("grpo"))
    assert _fields(findings, refuse) == [field], findings
    assert findings[0].message.startswith(field + ": ")


def test_default_micro_batch_cap_and_task_size():
    small = _cfg(trainer={"prompts_per_step": 2})  # B = 16 < the default cap 128: not reported
    assert degenerate_settings(small, estimator_promises=_promises("grpo")) == ()
    (f,) = degenerate_settings(small, estimator_promises=_promises("grpo"), task_size=1)
    assert f.field == "trainer.prompts_per_step" and "1 prompts" in f.message and not f.refuse


def test_refusals_come_first():
    findings = degenerate_settings(
        _cfg(rollout={"samples_per_prompt": 1}, trainer={"keep_checkpoints": 1}), estimator_promises=_promises("grpo")
    )
    assert [f.refuse for f in findings] == [True, False]
