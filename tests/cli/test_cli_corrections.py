"""The command line chooses a chain of off-policy corrections by name, each with typed flags, and
bypass mode; mistakes are one usage error naming the flag."""

from __future__ import annotations

import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import UsageError, parse_config, resolve_names


def test_a_chain_with_typed_flags():
    cfg = parse_config([
        "--algorithm.off-policy-correction", "outlier_veto", "tis_sequence", "geo_mask",
        "--algorithm.correction.tis-sequence.cap", "3", "--algorithm.correction.geo-mask.low", "0.98",
        "--algorithm.correction.outlier-veto.low", "None", "--algorithm.bypass-mode",
    ], DEFAULT_TABLE)
    a = cfg.algorithm
    assert a.off_policy_correction == ("outlier_veto", "tis_sequence", "geo_mask") and a.bypass_mode
    assert a.correction == {"tis_sequence": {"cap": 3.0}, "geo_mask": {"low": 0.98}, "outlier_veto": {"low": None}}
    run = resolve_names(cfg, DEFAULT_TABLE)
    chain = run.algorithm.correction
    assert [p.func.__name__ for p in chain.pieces] == ["outlier_veto", "tis_sequence", "geo_mask"]
    assert chain.pieces[1].keywords == {"cap": 3.0}


def test_defaults_leave_no_correction_and_a_single_name_still_parses():
    assert parse_config([], DEFAULT_TABLE).algorithm.off_policy_correction == ()
    assert resolve_names(parse_config([], DEFAULT_TABLE), DEFAULT_TABLE).algorithm.correction is None
    cfg = parse_config(["--algorithm.off-policy-correction", "tis"], DEFAULT_TABLE)
    assert cfg.algorithm.off_policy_correction == ("tis",) and cfg.algorithm.correction == {}


@pytest.mark.parametrize("argv, needle", [
    (["--algorithm.off-policy-correction", "tis", "--algorithm.correction.geo-mask.low", "0.9"], "is not a chosen off-policy correction"),
    (["--algorithm.off-policy-correction", "tis", "--algorithm.correction.tis.level", "token"], r"takes no hyperparameter 'level' \(it takes: against, cap\)"),
])
def test_flag_mistakes_are_usage_errors(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse_config(argv, DEFAULT_TABLE)


@pytest.mark.parametrize("argv, needle", [
    (["--algorithm.off-policy-correction", "tiss"], "did you mean 'tis'"),
    (["--algorithm.off-policy-correction", "tis", "--algorithm.correction.tis.cap", "0"], r"algorithm.correction.tis: cap: expected a finite number > 0, got 0"),
    (["--algorithm.off-policy-correction", "tis", "tis"], "expected each correction once"),
    (["--algorithm.off-policy-correction", "unbiased_kl"], "weights the KL loss term; expected algorithm.use_kl_loss"),
    (["--algorithm.bypass-mode", "--algorithm.recompute-old-log-probs"], "expected at most one"),
])
def test_resolution_mistakes_name_the_field(argv, needle):
    with pytest.raises(UsageError, match=needle):
        resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)


def test_help_lists_the_corrections_and_the_chosen_hyperparameters(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--algorithm.off-policy-correction", "opsm", "--help"], DEFAULT_TABLE)
    out = capsys.readouterr().out
    for needle in ("off_policy_correction: geo_mask, icepop", "--algorithm.correction.opsm.delta", "--algorithm.bypass-mode"):
        assert needle in out.replace("\n", " ").replace("  ", " ") or needle in out, needle
