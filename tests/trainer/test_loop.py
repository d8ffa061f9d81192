"""The in-process loop: determinism, resume equals an uninterrupted run, and learning."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train

# Timing-dependent metrics differ between runs; everything else must match exactly.
_TIMING = {"step_seconds", "rollout_seconds", "rollout_tokens_per_s", "tokens_per_s", "update_seconds", "update_cpu_seconds", "update_queue_seconds"}


def _strip(history):
    return [{k: v for k, v in h.items() if k not in _TIMING} for h in history]


def _with(cfg: TrainConfig, group: str, **fields) -> TrainConfig:
    return dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **fields)})


@pytest.mark.parametrize(
    "algorithm",
    [
        {},
        {"advantage_estimator": "gae", "use_kl_loss": True, "use_kl_in_reward": True, "kl_ctrl": "adaptive", "update_epochs": 2},
    ],
    ids=["grpo", "gae+kl+epochs"],
)
def test_resume_reproduces_an_uninterrupted_run(make_config, table, tmp_path, algorithm):
    cfg = make_config(algorithm=algorithm, trainer={"steps": 4, "ckpt_interval": 2})
    seen = []
    full = train(resolve(cfg, table), on_step=seen.append)
    assert full.steps == 4 and len(full.history) == 4 and seen == list(full.history)
    assert os.path.basename(full.last_checkpoint) == "step_00000004"

    other = _with(_with(cfg, "logging", run_dir=str(tmp_path / "other")), "trainer", steps=2)
    first = train(resolve(other, table))
    assert os.path.basename(first.last_checkpoint) == "step_00000002"
    resumed = train(resolve(_with(other, "trainer", steps=4, resume=True), table))
    assert resumed.resumed_from == 2 and len(resumed.history) == 2
    assert _strip(first.history + resumed.history) == _strip(full.history)
    a = ckpt.load(full.last_checkpoint).weights["policy"]
    b = ckpt.load(resumed.last_checkpoint).weights["policy"]
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_without_a_checkpoint_starts_fresh(make_config, table):
    s = train(resolve(make_config(trainer={"steps": 1, "resume": True}), table))
    assert s.resumed_from is None and s.steps == 1


@pytest.mark.slow
def test_reward_rises_within_a_minute(tmp_path, table):
    """The embedded default, shortened: GRPO on the counting task visibly learns. In-process (slow:
    the fast suite checks the same on the path users take, ``launch/train.py`` on Ray, in
    ``tests/cli/test_smoke.py``)."""
    cfg = _with(_with(TrainConfig(), "trainer", steps=45, ckpt_interval=0), "logging", run_dir=str(tmp_path))
    t0 = time.perf_counter()
    s = train(resolve(cfg, table))
    assert time.perf_counter() - t0 < 120  # budget 60 s on an idle 2-core machine; slack for shared CI
    first = sum(h["reward"] for h in s.history[:5]) / 5
    last = sum(h["reward"] for h in s.history[-5:]) / 5
    assert last > first + 0.15, (first, last)


@pytest.mark.slow
def test_the_embedded_default_learns(tmp_path, table):
    """The full default run (what `python launch/train.py` trains): reward +0.4 or more."""
    cfg = _with(TrainConfig(), "logging", run_dir=str(tmp_path))
    s = train(resolve(cfg, table))
    assert s.steps == cfg.trainer.steps
    assert s.last_reward - s.first_reward >= 0.4, s.line()


_KILLED = """
import importlib.util, sys
from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train
spec = importlib.util.spec_from_file_location("train_conftest", sys.argv[2])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
cfg = helpers.tiny_config(sys.argv[1], trainer={"steps": 200, "ckpt_interval": 1, "resume": True})
train(resolve(cfg, DEFAULT_TABLE), on_step=lambda m: print("step", int(m["step"]), flush=True))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_at_most_the_steps_since_the_checkpoint(tmp_path, table, tiny_config):
    import signal
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(_KILLED)
    run_dir = tmp_path / "run"
    conftest = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")  # tests/conftest.py
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), conftest], stdout=subprocess.PIPE, text=True)
    last = 0
    try:
        for line in proc.stdout:
            last = int(line.split()[1])
            if last >= 5:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    path = ckpt.latest_checkpoint(str(run_dir / "checkpoints"))
    c = ckpt.load(path)  # intact and readable
    assert last <= c.step + 1  # at most the step in flight is lost
    resumed = train(resolve(tiny_config(run_dir, trainer={"steps": c.step + 2, "resume": True}), table))
    assert resumed.resumed_from == c.step and len(resumed.history) == 2


def test_gsm8k_fixture_trains_with_the_tiny_model(make_config, table):
    fixture = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "gsm8k_tiny.jsonl")
    cfg = make_config(data={"task": "gsm8k", "path": fixture}, trainer={"steps": 2, "prompts_per_step": 3}, rollout={"max_new_tokens": 4})
    s = train(resolve(cfg, table))
    assert len(s.history) == 2 and all(0.0 <= h["reward"] <= 1.0 for h in s.history)
    assert ckpt.load(s.last_checkpoint).data_state == {"position": 6, "seed": 0}
