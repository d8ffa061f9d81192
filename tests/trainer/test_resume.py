"""Resume compatibility: a pure comparison of two configs, every differing field sorted once."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.trainer.config import TrainConfig, config_to_dict
from skyrl_fn.trainer.resume import INCOMPATIBLE, IncompatibleResumeError, check_resume, compare_configs


def _cfg(**groups) -> dict:
    base = TrainConfig()
    return config_to_dict(dataclasses.replace(base, **{g: dataclasses.replace(getattr(base, g), **d) for g, d in groups.items()}))


def test_same_config_and_bookkeeping_changes_report_nothing():
    base = _cfg()
    assert compare_configs(base, base) == compare_configs(base, _cfg(
        trainer={"steps": 500, "resume": True, "ckpt_interval": 5, "keep_checkpoints": 4, "torch_threads": 2},
        logging={"run_dir": "elsewhere", "progress": False}, ray={"use_ray": False, "num_cpus": 3},
    ))
    assert not compare_configs(base, base).incompatible and not compare_configs(base, base).compatible


def test_shape_changes_are_refused_naming_each_field():
    diff = compare_configs(_cfg(), _cfg(model={"hidden_size": 32, "num_layers": 3}))
    assert [c.field for c in diff.incompatible] == ["model.hidden_size", "model.num_layers"] and not diff.compatible
    with pytest.raises(IncompatibleResumeError) as err:
        check_resume(_cfg(), _cfg(model={"hidden_size": 32, "num_layers": 3}), where="ck/step_00000004")
    msg = str(err.value)
    assert "ck/step_00000004" in msg and "model.hidden_size: 64 -> 32" in msg and "model.num_layers: 2 -> 3" in msg


def test_learning_rate_and_estimator_are_compatible_and_listed():
    diff = check_resume(_cfg(), _cfg(algorithm={"advantage_estimator": "rloo"}, trainer={"lr": 1e-4}), where="x")
    assert [c.field for c in diff.compatible] == ["algorithm.advantage_estimator", "trainer.lr"]
    assert diff.warning() == "resuming with a changed config: algorithm.advantage_estimator: 'grpo' -> 'rloo'; trainer.lr: 0.003 -> 0.0001"


def test_task_change_is_a_tokenizer_change_only_for_the_embedded_model():
    tiny = compare_configs(_cfg(), _cfg(data={"task": "gsm8k", "path": "x.jsonl"}))
    assert [c.field for c in tiny.incompatible] == ["data.task"] and "tokenizer" in tiny.incompatible[0].reason
    hf = {"name_or_path": "/models/qwen"}
    real = compare_configs(_cfg(model=hf), _cfg(model=hf, data={"task": "gsm8k", "path": "x.jsonl"}))
    assert not real.incompatible and "data.task" in [c.field for c in real.compatible]


def test_missing_models_and_absent_fields():
    diff = compare_configs(_cfg(), _cfg(), saved_models=["policy"], needed_models=["policy", "critic"])
    assert [c.field for c in diff.incompatible] == ["models.critic"] and "critic" in diff.incompatible[0].reason
    old = _cfg()
    del old["algorithm"]["tis_cap"]  # a checkpoint from a version without the field
    old["algorithm"]["retired_field"] = 1
    diff = compare_configs(old, _cfg())
    assert {(c.field, c.saved, c.current) for c in diff.compatible} == {
        ("algorithm.tis_cap", "<absent>", 2.0), ("algorithm.retired_field", 1, "<absent>"),
    }


_FIELDS = [(g, f.name) for g in ("algorithm", "model", "trainer", "rollout") for f in dataclasses.fields(getattr(TrainConfig(), g))
           if isinstance(getattr(getattr(TrainConfig(), g), f.name), (int, float)) and not isinstance(getattr(getattr(TrainConfig(), g), f.name), bool)]


@given(st.sets(st.sampled_from(_FIELDS), max_size=6))
def test_every_changed_field_is_sorted_exactly_once(changed):
    groups: dict = {}
    for g, f in changed:
        groups.setdefault(g, {})[f] = getattr(getattr(TrainConfig(), g), f) + 1
    diff = compare_configs(_cfg(), _cfg(**groups))
    reported = [c.field for c in diff.incompatible + diff.compatible]
    assert len(reported) == len(set(reported))
    from skyrl_fn.trainer.resume import IGNORED

    expected = {f"{g}.{f}" for g, f in changed if f"{g}.{f}" not in IGNORED}
    assert set(reported) == expected
    assert {c.field for c in diff.incompatible} == expected & set(INCOMPATIBLE)
