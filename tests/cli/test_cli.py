"""The CLI: presets, flags, --help listing the table's names, typos exiting 2 before any model."""

from __future__ import annotations

import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import EXIT_USAGE, PRESETS, UsageError, main, parse_config, resolve_names


def test_default_and_flags():
    cfg = parse_config([], DEFAULT_TABLE)
    assert cfg.algorithm.advantage_estimator == "grpo" and type(cfg).__name__ == "TrainConfig"
    cfg = parse_config(["--algorithm.advantage-estimator", "rloo", "--trainer.steps", "3"], DEFAULT_TABLE)
    assert cfg.algorithm.advantage_estimator == "rloo" and cfg.trainer.steps == 3
    from skyrl_fn.trainer.config import AlgorithmConfig, TrainConfig

    # Plain classes come out (the help-text subclasses never leave the CLI module).
    assert type(cfg) is TrainConfig and type(cfg.algorithm) is AlgorithmConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves_against_the_default_table(preset):
    cfg = parse_config([preset, "--trainer.steps", "2"], DEFAULT_TABLE)
    assert cfg.trainer.steps == 2
    assert cfg.algorithm == PRESETS[preset][1].algorithm
    resolve_names(cfg, DEFAULT_TABLE)  # every name in every recipe is registered


def test_ppo_gae_preset_uses_a_critic():
    cfg = parse_config(["ppo_gae"], DEFAULT_TABLE)
    assert resolve_names(cfg, DEFAULT_TABLE).uses_critic and cfg.algorithm.estimator == {"lambd": 0.95}


def test_help_lists_registered_names(capsys):
    table = DEFAULT_TABLE.register("zz_custom_help_name", DEFAULT_TABLE.estimator("grpo"), kind="advantage_estimator")
    with pytest.raises(SystemExit) as exc:
        parse_config(["--help"], table)
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "zz_custom_help_name" in out
    for kind in ("advantage_estimator", "policy_loss"):
        for name in table.names(kind):
            assert name in out, name
    for preset in PRESETS:
        assert preset in out


def test_typo_exits_2_with_a_suggestion_before_any_model_is_built(monkeypatch, capsys, tmp_path):
    import skyrl_fn.models.model as model

    def no_model(*a, **k):
        raise AssertionError("a model was built before the names were checked")

    monkeypatch.setattr(model, "load_model", no_model)
    monkeypatch.setattr(model, "build_tiny_model", no_model)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--algorithm.advantage-estimator", "gpro", "--logging.run-dir", str(run_dir)])
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "did you mean 'grpo'" in err and "gpro" in err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--algorithm.policy-loss", "regulr"], "did you mean 'regular'"),
        (["--algorithm.loss-reduction", "token_maen"], "did you mean 'token_mean'"),
        (["--algorithm.estimator.nope", "1"], "--algorithm.estimator.nope: advantage estimator 'grpo' takes no hyperparameter 'nope'"),
        (["--algorithm.loss.clip-ratio-c", "5"], "policy loss 'regular' takes no hyperparameter 'clip_ratio_c' (it takes: eps_clip_high, eps_clip_low)"),
        (["--plugin", "/nonexistent/plugin.py"], "expected an existing .py file"),
        (["--algorithm.advantage-estimator", "os:no_such_fn"], "has no attribute 'no_such_fn'"),
        (["--ray.rollout-workers", "-1"], "ray.rollout_workers: expected >= 0, got -1"),
    ],
)
def test_other_usage_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_usage_error_is_a_value_error():
    with pytest.raises(UsageError):
        resolve_names(parse_config(["--algorithm.advantage-estimator", "nope"], DEFAULT_TABLE), DEFAULT_TABLE)


@pytest.mark.parametrize(
    "loss, flag, value, key",
    [
        ("sapo", "tau-pos", "2.0", "tau_pos"),
        ("cispo", "cispo-eps-clip-high", "4.0", "cispo_eps_clip_high"),
        ("clip_cov", "clip-cov-ratio", "0.001", "clip_cov_ratio"),
        ("kl_cov", "kl-cov-frac", "0.1", "kl_cov_frac"),
        ("dppo", "dppo-divergence", "kl", "dppo_divergence"),
        ("dual_clip", "clip-ratio-c", "5", "clip_ratio_c"),
    ],
)
def test_each_chosen_loss_gets_typed_flags(loss, flag, value, key, capsys):
    cfg = parse_config(["--algorithm.policy-loss", loss, f"--algorithm.loss.{flag}", value], DEFAULT_TABLE)
    got = cfg.algorithm.loss[key]
    assert got == (value if key == "dppo_divergence" else float(value)) and len(cfg.algorithm.loss) == 1
    run = resolve_names(cfg, DEFAULT_TABLE)
    assert run.algorithm.policy_loss.keywords == {key: got}
    if key != "dppo_divergence":
        with pytest.raises(SystemExit) as exc:  # typed: a word is not a float
            parse_config(["--algorithm.policy-loss", loss, f"--algorithm.loss.{flag}", "abc"], DEFAULT_TABLE)
        assert exc.value.code == 2


def test_help_shows_the_hyperparameters_of_the_chosen_functions(capsys):
    def flags(argv):
        with pytest.raises(SystemExit):
            parse_config([*argv, "--help"], DEFAULT_TABLE)
        return " ".join(capsys.readouterr().out.split())

    default = flags([])
    assert "--algorithm.estimator.norm-by-std" in default and "--algorithm.loss.eps-clip-low" in default
    assert "--algorithm.estimator.lambd" not in default and "--algorithm.loss.tau-pos" not in default
    gae = flags(["ppo_gae", "--algorithm.policy-loss=sapo"])
    assert "--algorithm.estimator.lambd" in gae and "(default: 0.95)" in gae  # the preset's value
    assert "Hyperparameters of the advantage estimator 'gae'" in gae and "--algorithm.loss.tau-pos" in gae


def test_a_function_keeps_its_own_defaults_and_preset_values_stay_with_their_function():
    assert parse_config([], DEFAULT_TABLE).algorithm.estimator == {}
    assert parse_config(["--algorithm.estimator.epsilon", "1e-6"], DEFAULT_TABLE).algorithm.estimator == {}  # = the default
    # ppo_gae's lambd belongs to gae: choosing another estimator does not carry it over.
    cfg = parse_config(["ppo_gae", "--algorithm.advantage-estimator", "rloo"], DEFAULT_TABLE)
    assert cfg.algorithm.estimator == {} and cfg.algorithm.update_epochs == 2
    resolve_names(cfg, DEFAULT_TABLE)


PLUGIN_ESTIMATOR = """
import torch
from skyrl_fn import AdvantageInput, AdvantageOutput


def mine(batch: AdvantageInput, *, gamma: float = 0.5, epsilon: float = 0.1) -> AdvantageOutput:
    \"\"\"Rewards times gamma.

    Args:
        gamma: the scale.
        epsilon: unused here.
    \"\"\"
    adv = batch.token_level_rewards * gamma
    return AdvantageOutput(advantages=adv, returns=adv)
"""


def test_a_module_function_name_gets_typed_flags_from_its_signature(tmp_path, capsys):
    path = tmp_path / "my_est.py"
    path.write_text(PLUGIN_ESTIMATOR)
    name = f"{path}:mine"
    cfg = parse_config(["--algorithm.advantage-estimator", name, "--algorithm.estimator.gamma", "0.7"], DEFAULT_TABLE)
    assert cfg.algorithm.estimator == {"gamma": 0.7}
    run = resolve_names(cfg, DEFAULT_TABLE)
    assert run.algorithm.estimator.fn.keywords == {"gamma": 0.7}  # epsilon keeps the function's 0.1
    with pytest.raises(SystemExit):
        parse_config(["--algorithm.advantage-estimator", name, "--help"], DEFAULT_TABLE)
    out = " ".join(capsys.readouterr().out.split())
    assert "--algorithm.estimator.gamma FLOAT the scale. (default: 0.5)" in out


def test_a_registered_name_from_a_custom_entry_point_parses():
    table = DEFAULT_TABLE.register("my_custom", DEFAULT_TABLE.estimator("rloo"), kind="advantage_estimator")
    cfg = parse_config(["--algorithm.advantage-estimator", "my_custom"], table)
    assert resolve_names(cfg, table).algorithm.names["advantage_estimator"] == "my_custom"
