"""Config and name resolution: every name is checked against the table and bound once, each
function gets exactly its own hyperparameters, and the config survives JSON and tyro."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, UnknownNameError
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput, PolicyLossInput, PolicyLossOutput
from skyrl_fn.trainer.config import (
    AlgorithmConfig,
    ResolvedRun,
    TrainConfig,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    resolve,
)
from skyrl_fn.tasks.base import DataConfig


def _alg(**kw) -> TrainConfig:
    return TrainConfig(algorithm=AlgorithmConfig(**kw))


def test_defaults_resolve_and_bind_nothing_but_names():
    run = resolve(TrainConfig(), DEFAULT_TABLE)
    assert isinstance(run, ResolvedRun) and run.table is DEFAULT_TABLE
    alg = run.algorithm
    assert dict(alg.names) == {"advantage_estimator": "grpo", "policy_loss": "regular", "aggregation": "token_mean", "kl_estimator": "k3"}
    assert all(dict(h) == {} for h in alg.hyper.values())  # every function keeps its own defaults
    assert alg.policy_loss is DEFAULT_TABLE.policy_loss("regular") and alg.kl_estimator is DEFAULT_TABLE.get("kl_estimator", "k3")
    assert not run.uses_critic and not run.uses_reference
    gae = resolve(_alg(advantage_estimator="gae", estimator={"gamma": 0.9, "lambd": 0.8}), DEFAULT_TABLE)
    assert dict(gae.algorithm.hyper["advantage_estimator"]) == {"gamma": 0.9, "lambd": 0.8}
    assert gae.algorithm.estimator.fn.keywords == {"gamma": 0.9, "lambd": 0.8}
    assert gae.uses_critic and not gae.uses_reference


def _batch():
    m = torch.tensor([[True, True, False], [True, False, False]])
    r = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    return AdvantageInput(token_level_rewards=r, response_mask=m, group_ids=torch.tensor([0, 0]))


def test_a_user_estimator_keeps_its_own_defaults():
    seen = {}

    def mine(batch: AdvantageInput, *, gamma: float = 0.5, epsilon: float = 0.1) -> AdvantageOutput:
        seen.update(gamma=gamma, epsilon=epsilon)
        adv = batch.token_level_rewards * gamma
        return AdvantageOutput(advantages=adv, returns=adv)

    table = DEFAULT_TABLE.register("mine", mine)
    run = resolve(_alg(advantage_estimator="mine"), table)
    run.algorithm.estimator(_batch())
    assert seen == {"gamma": 0.5, "epsilon": 0.1}
    resolve(_alg(advantage_estimator="mine", estimator={"gamma": 0.9}), table).algorithm.estimator(_batch())
    assert seen == {"gamma": 0.9, "epsilon": 0.1}


def test_a_hyperparameter_the_function_does_not_take_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"policy loss 'regular'.*hyperparameter 'clip_ratio_c'.*eps_clip_high, eps_clip_low"):
        resolve(_alg(policy_loss="regular", loss={"clip_ratio_c": 5}), DEFAULT_TABLE)
    run = resolve(_alg(policy_loss="dual_clip", loss={"clip_ratio_c": 5.0}), DEFAULT_TABLE)
    assert run.algorithm.policy_loss.keywords == {"clip_ratio_c": 5.0}
    with pytest.raises(ValueError, match="hyperparameter 'epsilom'; did you mean 'epsilon'"):
        resolve(_alg(estimator={"epsilom": 0.1}), DEFAULT_TABLE)
    with pytest.raises(ValueError, match="'global_tokens' is supplied by the objective"):
        resolve(_alg(reduction={"global_tokens": 3}), DEFAULT_TABLE)
    with pytest.raises(ValueError, match="kl estimator 'k3'.*hyperparameter 'scale'"):
        resolve(_alg(kl={"scale": 2.0}), DEFAULT_TABLE)


def test_a_chained_critic_estimator_needs_a_critic_by_its_entry_not_its_name():
    from skyrl_fn import chain, clip_advantages
    from skyrl_fn.estimators import gae

    table = DEFAULT_TABLE.register("gae_clipped", chain(gae, clip_advantages(1.0)))
    run = resolve(_alg(advantage_estimator="gae_clipped", estimator={"lambd": 0.9}), table)
    assert run.uses_critic and table.entry("advantage_estimator", "gae_clipped").requires == {"values"}


def test_a_loss_reading_reference_log_probs_gets_a_reference_model():
    from skyrl_fn.core.requires import requires

    @requires("ref_log_probs")
    def anchored(batch: PolicyLossInput) -> PolicyLossOutput:
        return PolicyLossOutput(token_loss=(batch.log_probs - batch.ref_log_probs).square())

    table = DEFAULT_TABLE.register("anchored", anchored)
    assert resolve(_alg(policy_loss="anchored"), table).uses_reference
    assert resolve(_alg(use_kl_in_reward=True), DEFAULT_TABLE).uses_reference
    assert not resolve(_alg(), DEFAULT_TABLE).uses_reference


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


def test_a_registered_estimator_resolves_and_receives_its_own_hyperparameters():
    def shifted(batch: AdvantageInput, *, epsilon: float = 0.0, shift: float = 1.0) -> AdvantageOutput:
        adv = (batch.token_level_rewards + shift) * batch.float_mask()
        return AdvantageOutput(advantages=adv, returns=adv)

    table = DEFAULT_TABLE.register("shifted", shifted)
    run = resolve(_alg(advantage_estimator="shifted", estimator={"shift": 2.0}), table)
    assert dict(run.algorithm.hyper["advantage_estimator"]) == {"shift": 2.0}
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
    cfg = TrainConfig(algorithm=AlgorithmConfig(advantage_estimator="rloo", estimator={"x": 1.0}))
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict({"trainer": {"stepz": 3}})
    run = resolve(TrainConfig(), DEFAULT_TABLE)
    back = pickle.loads(pickle.dumps(run))
    assert back.config == run.config and dict(back.algorithm.names) == dict(run.algorithm.names)
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
    kw = tyro.cli(TrainConfig, args=["--algorithm.estimator", "epsilon", "0.5", "flag", "True"])
    assert kw.algorithm.estimator == {"epsilon": 0.5, "flag": True}
    with pytest.raises(SystemExit):
        tyro.cli(TrainConfig, args=["--model.dtype", "fp8"])
    with pytest.raises(SystemExit):
        tyro.cli(TrainConfig, args=["--help"])
    out = capsys.readouterr().out
    assert "Hyperparameters of the advantage estimator" in out and "Sampling temperature" in out
    assert dataclasses.is_dataclass(cfg)


def test_dr_grpo_keeps_its_fixed_norm_by_std():
    # dr_grpo = grpo with norm_by_std=False fixed: nothing can turn it back into GRPO.
    with pytest.raises(ValueError, match="advantage estimator 'dr_grpo'.*hyperparameter 'norm_by_std'"):
        resolve(_alg(advantage_estimator="dr_grpo", estimator={"norm_by_std": True}), DEFAULT_TABLE)
    assert dict(resolve(_alg(advantage_estimator="dr_grpo"), DEFAULT_TABLE).algorithm.hyper["advantage_estimator"]) == {}
