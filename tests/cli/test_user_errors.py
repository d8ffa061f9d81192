"""Every user mistake ends in one line ``error: <field or file>: ...`` and exit 2, before Ray
starts or a model loads; ``--debug`` / ``SKYRL_FN_DEBUG=1`` show the traceback instead.

The probe table is the issue's list plus its relatives; the fast test runs it through ``main()``
in this process, the slow one through ``launch/train.py`` in a subprocess (the real path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import EXIT_USAGE, main, parse_config
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.config import config_to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = ["--logging.no-progress", "--logging.no-tensorboard", "--logging.no-plot", "--trainer.steps", "2"]


def _jsonl(tmp, name, text: bytes) -> str:
    p = tmp / name
    p.write_bytes(text)
    return str(p)


def _checkpoint(tmp, argv, *, damage=False) -> None:
    """A checkpoint written under the config ``argv`` parses to (weights are not read by pre-flight)."""
    cfg = parse_config(argv, DEFAULT_TABLE)
    path = ckpt.save(cfg.ckpt_dir, step=2, weights={"policy": {"w": torch.zeros(2)}}, config=config_to_dict(cfg))
    if damage:
        with open(os.path.join(path, "optim.pt"), "ab") as f:
            f.write(b"x")


def _model_dir(tmp, config: str | None) -> str:
    d = tmp / "model"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    return str(d)


# (id, argv builder taking tmp_path, text the one line must contain)
PROBES = [
    ("data path missing", lambda t: ["--data.task", "gsm8k", "--data.path", "/nonexistent.jsonl"],
     "error: data.path: expected an existing jsonl file, got '/nonexistent.jsonl'"),
    ("data path is a directory", lambda t: ["--data.task", "gsm8k", "--data.path", str(t)], "data.path: expected a jsonl file"),
    ("data line malformed", lambda t: ["--data.task", "gsm8k", "--data.path", _jsonl(t, "d.jsonl", b'{"prompt": "a", "answer": "1"}\n{oops\n')],
     "d.jsonl:2: expected a JSON object per line"),
    ("data line not an object", lambda t: ["--data.task", "gsm8k", "--data.path", _jsonl(t, "d.jsonl", b"[1, 2]\n")],
     "d.jsonl:1: expected a JSON object per line, got a list"),
    ("data not utf-8", lambda t: ["--data.task", "gsm8k", "--data.path", _jsonl(t, "d.jsonl", b'{"prompt": "\xff\xfe"}\n')],
     "d.jsonl:1: expected UTF-8 text"),
    ("data wrong keys", lambda t: ["--data.task", "gsm8k", "--data.path", _jsonl(t, "d.jsonl", b'{"q": "a"}\n')],
     "d.jsonl:1: expected keys 'prompt' and 'answer'"),
    ("data empty", lambda t: ["--data.task", "gsm8k", "--data.path", _jsonl(t, "d.jsonl", b"\n")], "expected at least one row"),
    ("data path unset", lambda t: ["--data.task", "gsm8k"], "data.path: expected a jsonl path"),
    ("run dir under a file", lambda t: ["--logging.run-dir", _jsonl(t, "f", b"") + "/run"], "logging.run_dir: expected a writable directory"),
    ("run dir is a file", lambda t: ["--logging.run-dir", _jsonl(t, "f", b"")], "logging.run_dir: expected a directory"),
    ("ckpt dir under a file", lambda t: ["--trainer.ckpt-dir", _jsonl(t, "f", b"") + "/ck"], "trainer.ckpt_dir: expected a writable directory"),
    ("heads do not divide", lambda t: ["--model.hidden-size", "30"], "model.hidden_size: expected a multiple of model.num_heads=4, got 30"),
    ("model dir missing", lambda t: ["--model.name-or-path", str(t / "nope")], "model.name_or_path: expected a local HF directory, a .gguf file or a packaged model"),
    ("model dir without config", lambda t: ["--model.name-or-path", _model_dir(t, None)], "model.name_or_path: expected an HF checkpoint directory with config.json"),
    ("model config unreadable", lambda t: ["--model.name-or-path", _model_dir(t, "{not json")], "config.json: expected a readable HF model config"),
    ("model config not causal", lambda t: ["--model.name-or-path", _model_dir(t, json.dumps({"model_type": "vit"}))],
     "expected a causal-LM model_type, got 'vit'"),
    ("plugin syntax error", lambda t: ["--plugin", _jsonl(t, "bad_plugin.py", b"def (:\n")], "bad_plugin.py:1"),
    ("unknown estimator", lambda t: ["--algorithm.advantage-estimator", "gpro"], "did you mean 'grpo'"),
    ("groups of one with grpo", lambda t: ["--rollout.samples-per-prompt", "1"],
     "rollout.samples_per_prompt: expected >= 2 with algorithm.advantage_estimator 'grpo'"),
    ("zero prompts", lambda t: ["--trainer.prompts-per-step", "0"], "trainer.prompts_per_step: expected > 0, got 0"),
    ("resume changed shape", lambda t: (_checkpoint(t, ["--logging.run-dir", str(t / "r")]) or
                                        ["--logging.run-dir", str(t / "r"), "--trainer.resume", "--model.hidden-size", "32"]),
     "trainer.resume: cannot resume from"),
    ("resume none valid", lambda t: (_checkpoint(t, ["--logging.run-dir", str(t / "r")], damage=True) or
                                     ["--logging.run-dir", str(t / "r"), "--trainer.resume"]),
     "trainer.resume: none of the 1 checkpoints"),
]


@pytest.fixture
def no_models(monkeypatch):
    import skyrl_fn.models.model as model

    def refuse(*a, **k):
        raise AssertionError("a model was built before the user error was reported")

    monkeypatch.setattr(model, "load_model", refuse)
    monkeypatch.setattr(model, "build_tiny_model", refuse)


def _argv(tmp_path, build):
    argv = build(tmp_path)
    if "--logging.run-dir" not in argv:
        argv = ["--logging.run-dir", str(tmp_path / "run")] + argv
    return argv + QUIET


@pytest.mark.parametrize("name, build, needle", PROBES, ids=[p[0] for p in PROBES])
def test_user_error_is_one_line_exit_2_before_any_model(name, build, needle, tmp_path, capsys, no_models, monkeypatch):
    monkeypatch.delenv("SKYRL_FN_DEBUG", raising=False)
    argv = _argv(tmp_path, build)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == EXIT_USAGE, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, tmp_path, monkeypatch, no_models):
    argv = _argv(tmp_path, lambda t: ["--data.task", "gsm8k", "--data.path", "/nonexistent.jsonl"])
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("SKYRL_FN_DEBUG", "1")
    from skyrl_fn.cli.preflight import PreflightError

    with pytest.raises(PreflightError, match="data.path: expected an existing jsonl file"):
        main(argv)


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    import skyrl_fn.cli.app as cli

    def bug(*a, **k):
        raise KeyError("an internal bug")

    monkeypatch.setattr(cli, "launch", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(_argv(tmp_path, lambda t: ["--ray.no-use-ray"]))


def _subprocess(argv, cwd):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("SKYRL_FN_DEBUG", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_real_script_prints_one_line(tmp_path):
    out = _subprocess(["--data.task", "gsm8k", "--data.path", "/nonexistent.jsonl", "--logging.run-dir", str(tmp_path / "r")], tmp_path)
    assert out.returncode == EXIT_USAGE
    assert out.stderr.strip().splitlines() == ["error: data.path: expected an existing jsonl file, got '/nonexistent.jsonl' (no such file)"]


@pytest.mark.slow
def test_every_probe_through_the_real_script(tmp_path):
    """The figure ``user-error tracebacks`` of docs/faults.md: every probe, a fresh process each."""
    tracebacks, failures = 0, []
    for i, (name, build, needle) in enumerate(PROBES):
        t = tmp_path / f"p{i}"
        t.mkdir()
        out = _subprocess(_argv(t, build), t)
        tracebacks += "Traceback" in out.stderr
        lines = out.stderr.strip().splitlines()
        if out.returncode != EXIT_USAGE or len(lines) != 1 or needle not in lines[0]:
            failures.append((name, out.returncode, out.stderr[-500:]))
    print(f"user-error probes: {len(PROBES)}, tracebacks: {tracebacks}")
    assert tracebacks == 0 and not failures, failures


def test_an_error_raised_inside_a_ray_actor_is_reported_by_its_own_message():
    from ray.exceptions import RayTaskError

    from skyrl_fn.cli.app import _fault_errors, _one_line
    from skyrl_fn.tasks.base import RewardError

    cause = RewardError("reward: Task.reward raised KeyError: 'a' on sample 0 (...)")
    err = RayTaskError("PolicyWorker.generate", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    assert isinstance(err, _fault_errors())
    assert _one_line(err) == str(cause)  # not the remote traceback Ray's str() holds


def test_a_fault_while_training_is_one_line_exit_1_after_warning_lines(tmp_path, capsys, monkeypatch):
    """Non-finite steps print ``warning:`` lines, then too many in a row stop with one ``error:``
    line and exit 1; the metrics log holds a ``step_skipped`` event with the reason."""
    import math

    import attrs

    from skyrl_fn.cli.app import EXIT_FAULT

    monkeypatch.delenv("SKYRL_FN_DEBUG", raising=False)
    regular = DEFAULT_TABLE.policy_loss("regular")
    table = DEFAULT_TABLE.register(
        "always_nan", lambda batch, **h: attrs.evolve(regular(batch, **h), token_loss=regular(batch, **h).token_loss * math.nan),
        kind="policy_loss",
    )
    run_dir = tmp_path / "run"
    argv = ["--ray.no-use-ray", "--logging.run-dir", str(run_dir), "--algorithm.policy-loss", "always_nan",
            "--trainer.max-consecutive-skips", "1", "--trainer.prompts-per-step", "2", "--model.num-layers", "1", *QUIET]
    with pytest.raises(SystemExit) as exc:
        main(argv, table=table)
    assert exc.value.code == EXIT_FAULT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line[:31] for line in lines][-2:] == ["warning: step 1 skipped (1 so f", "error: trainer.max_consecutive_"]
    assert "Traceback" not in "".join(lines)
    events = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"event"' in line]
    assert [e["event"] for e in events] == ["step_skipped"] and "a non-finite loss" in events[0]["reason"]
