"""The CLI: presets, flags, --help listing the table's names, typos exiting 2 before any model."""

from __future__ import annotations

import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.launcher import EXIT_USAGE, PRESETS, UsageError, main, parse_config, resolve_names


def test_default_and_flags():
    cfg = parse_config([], DEFAULT_TABLE)
    assert cfg.algorithm.advantage_estimator == "grpo" and type(cfg).__name__ == "TrainConfig"
    cfg = parse_config(["--algorithm.advantage-estimator", "rloo", "--trainer.steps", "3"], DEFAULT_TABLE)
    assert cfg.algorithm.advantage_estimator == "rloo" and cfg.trainer.steps == 3
    from skyrl_fn.train.config import AlgorithmConfig, TrainConfig

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
    import skyrl_fn.train.model as model

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
        (["--algorithm.estimator-kwargs", "nope", "1"], "nope"),
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
