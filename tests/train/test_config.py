"""Config and name resolution: every name is checked against the table, hyperparameters reach
the functions that take them, and the config survives JSON and tyro."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from skyrl_fn import DEFAULT_TABLE, UnknownNameError
from skyrl_fn.records import AdvantageInput, AdvantageOutput
from skyrl_fn.train.config import (
    AlgorithmConfig,
    DataConfig,
    ResolvedRun,
    TrainConfig,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    resolve,
)


def _alg(**kw) -> TrainConfig:
    return TrainConfig(algorithm=AlgorithmConfig(**kw))


def test_defaults_resolve_and_forward_hyperparameters():
    run = resolve(TrainConfig(), DEFAULT_TABLE)
    assert isinstance(run, ResolvedRun) and run.table is DEFAULT_TABLE
    assert dict(run.estimator_hyper) == {"epsilon": 1e-6, "norm_by_std": True}
    assert dict(run.policy_loss_hyper) == {"eps_clip_low": 0.2, "eps_clip_high": 0.2}
    assert dict(run.aggregation_hyper) == {}
    gae = resolve(_alg(advantage_estimator="gae", gamma=0.9, lambd=0.8), DEFAULT_TABLE)
    assert dict(gae.estimator_hyper) == {"gamma": 0.9, "lambd": 0.8}
    assert gae.config.uses_critic and not gae.config.uses_reference


@pytest.mark.parametrize(
    "field, value, suggestion",
    [
        ("advantage_estimator", "gpro", "grpo"),
        ("policy_loss", "regulr", "regular"),
        ("loss_reduction", "token_maen", "token_mean"),
        ("kl_estimator", "k4", None),
    ],
)
def test_unknown_names_raise_with_a_suggestion(field, value, suggestion):
    with pytest.raises(UnknownNameError) as err:
        resolve(_alg(**{field: value}), DEFAULT_TABLE)
    msg = str(err.value)
    assert repr(value) in msg and "Available" in msg
    if suggestion:
        assert f"did you mean {suggestion!r}" in msg


def test_explicit_kwargs_are_checked_against_the_signature():
    with pytest.raises(ValueError, match="hyperparameter 'epsilom'"):
        resolve(_alg(estimator_kwargs={"epsilom": 0.1}), DEFAULT_TABLE)
    run = resolve(_alg(estimator_kwargs={"epsilon": 0.5}), DEFAULT_TABLE)
    assert run.estimator_hyper["epsilon"] == 0.5


def test_a_registered_estimator_resolves_and_receives_its_own_hyperparameters():
    def shifted(batch: AdvantageInput, *, epsilon: float = 0.0, shift: float = 1.0) -> AdvantageOutput:
        adv = (batch.token_level_rewards + shift) * batch.float_mask()
        return AdvantageOutput(advantages=adv, returns=adv)

    table = DEFAULT_TABLE.register("shifted", shifted)
    run = resolve(_alg(advantage_estimator="shifted", estimator_kwargs={"shift": 2.0}), table)
    assert dict(run.estimator_hyper) == {"epsilon": 1e-6, "shift": 2.0}
    with pytest.raises(UnknownNameError):
        resolve(_alg(advantage_estimator="shifted"), DEFAULT_TABLE)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (TrainConfig(trainer=TrainerConfig(steps=0)), "trainer.steps"),
        (TrainConfig(trainer=TrainerConfig(micro_batch_size=0)), "micro_batch_size"),
        (TrainConfig(data=DataConfig(task="gsm8k")), "data.path"),
        (TrainConfig(data=DataConfig(min_digits=4, max_digits=2)), "min_digits"),
    ],
)
def test_bad_sizes(cfg, match):
    with pytest.raises(ValueError, match=match):
        resolve(cfg, DEFAULT_TABLE)


def test_type_checks():
    with pytest.raises(TypeError, match="config"):
        resolve({"algorithm": {}}, DEFAULT_TABLE)
    with pytest.raises(TypeError, match="table"):
        resolve(TrainConfig(), {})


def test_json_round_trip_and_pickle():
    cfg = TrainConfig(algorithm=AlgorithmConfig(advantage_estimator="rloo", estimator_kwargs={"x": 1.0}))
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict({"trainer": {"stepz": 3}})
    run = resolve(TrainConfig(), DEFAULT_TABLE)
    back = pickle.loads(pickle.dumps(run))
    assert back.config == run.config and dict(back.estimator_hyper) == dict(run.estimator_hyper)
    assert json.loads(run.to_json())["trainer"]["steps"] == TrainConfig().trainer.steps


def test_tyro_parses_nested_groups_literals_and_help(capsys):
    tyro = pytest.importorskip("tyro")
    cfg = tyro.cli(
        TrainConfig,
        args=["--algorithm.advantage-estimator", "rloo", "--rollout.backend", "hf", "--trainer.steps", "7",
              "--model.dtype", "bf16", "--algorithm.use-kl-loss", "--ray.no-use-ray"],
    )
    assert cfg.algorithm.advantage_estimator == "rloo" and cfg.trainer.steps == 7
    assert cfg.model.dtype == "bf16" and cfg.algorithm.use_kl_loss and not cfg.ray.use_ray
    kw = tyro.cli(TrainConfig, args=["--algorithm.estimator-kwargs", "epsilon", "0.5", "flag", "True"])
    assert kw.algorithm.estimator_kwargs == {"epsilon": 0.5, "flag": True}
    with pytest.raises(SystemExit):
        tyro.cli(TrainConfig, args=["--model.dtype", "fp8"])
    with pytest.raises(SystemExit):
        tyro.cli(TrainConfig, args=["--help"])
    out = capsys.readouterr().out
    assert "GAE lambda" in out and "Sampling temperature" in out
    assert dataclasses.is_dataclass(cfg)


def test_dr_grpo_keeps_its_fixed_norm_by_std_when_resolved():
    # AlgorithmConfig.norm_by_std defaults to True; it must not reach dr_grpo (= grpo with
    # norm_by_std=False fixed), or Dr. GRPO would silently run as GRPO.
    base = TrainConfig()
    cfg = dataclasses.replace(base, algorithm=dataclasses.replace(base.algorithm, advantage_estimator="dr_grpo"))
    assert "norm_by_std" not in resolve(cfg, DEFAULT_TABLE).estimator_hyper
    cfg = dataclasses.replace(base, algorithm=dataclasses.replace(base.algorithm, advantage_estimator="grpo"))
    assert resolve(cfg, DEFAULT_TABLE).estimator_hyper["norm_by_std"] is True
