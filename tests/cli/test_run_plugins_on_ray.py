"""A user's own task, reward and rollout backend, brought with ``--plugin`` and trained on Ray,
with a SkyRL-style advantage estimator and policy loss registered by decorator in the same file.

The plugin file deletes itself on import (as on another node of a cluster), so the pieces travel
by value; each piece records its process id to prove it ran in a Ray worker, not in the driver.
One run checks all five pieces: each Ray run starts actor processes that import torch and
transformers (~5 s of CPU each), and the fast suite has a CPU budget (docs/contributing.md).
"""

from __future__ import annotations

import os
import textwrap

import pytest

from skyrl_fn.cli import main
from tests.cli.test_plugins_on_ray import SELF_DELETE, SKYRL_DECORATED, compat_clean

pytestmark = pytest.mark.ray

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--trainer.steps", "2", "--logging.no-progress", "--logging.no-tensorboard", "--logging.no-plot",
]

PLUGIN = '''
import os
import attrs
from skyrl_fn.compat.skyrl_train import register_advantage_estimator, register_policy_loss
from skyrl_fn.models.model import DIGITS_ALPHABET
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.tasks.base import Example

def _mark(what):
    with open({marker!r}, "a") as f:
        f.write(f"{{what}} {{os.getpid()}}\\n")

@attrs.frozen(kw_only=True)
class ParityTask:
    """Prompt 'p:<bits>>', answer the parity bit."""
    length: int
    seed: int
    name: str = "parity"
    alphabet: str = DIGITS_ALPHABET

    def size(self):
        return None

    def example(self, index):
        _mark("task")
        bits = format((self.seed * 7919 + index) % (2 ** self.length), f"0{{self.length}}b")
        return Example(index=index, prompt=f"c:{{bits}}>", answer=str(bits.count("1") % 2))

    def reward(self, response, example):
        return float(response.strip()[:1] == example.answer)

def parity_task(data, *, seed=0, length=3):
    return ParityTask(length=length, seed=seed)

def first_char(response, example, *, bonus=0.0):
    _mark("reward")
    return float(response[:1] == example.answer[:1]) + bonus

class CountingBackend(HFBackend):
    def generate(self, prompts, *, seed):
        _mark("backend")
        return super().generate(prompts, seed=seed)

def counting_backend(model, tokenizer, rollout, *, seed=0, colocated=True):
    return CountingBackend(model, tokenizer, rollout)

def register(table):
    table = table.register("parity", parity_task, kind="task")
    table = table.register("first_char", first_char, kind="reward")
    return table.register("counting", counting_backend, kind="rollout_backend")
'''


@pytest.mark.parametrize(
    "layout", [[], pytest.param(["--ray.rollout-workers", "1"], marks=pytest.mark.slow)], ids=["hybrid", "rollout-worker"]
)
def test_plugin_task_reward_backend_and_skyrl_algorithm_train_on_ray(ray_session, tmp_path, layout):
    marker = tmp_path / "calls.txt"
    plugin = tmp_path / "my_task.py"
    name = "run_plugins_" + ("hybrid" if not layout else "rollout_worker")
    plugin.write_text(textwrap.dedent(PLUGIN.format(marker=str(marker)) + SKYRL_DECORATED.format(name=name) + SELF_DELETE))
    try:
        summary = main([
            "--plugin", str(plugin), *TINY, *layout, "--data.task", "parity", "--data.task-args.length", "4",
            "--data.reward", "first_char", "--data.reward-args.bonus", "0.5", "--rollout.backend", "counting",
            "--algorithm.advantage-estimator", f"{name}_skyrl", "--algorithm.policy-loss", f"{name}_loss",
            "--logging.run-dir", str(tmp_path / "run"),
        ])
    finally:
        compat_clean(name)
    assert summary.steps == 2
    # every reward is first_char's: 0.5 + {0, 1}
    assert all(0.5 <= row["reward"] <= 1.5 for row in summary.history), summary.history
    rows = [line.split() for line in marker.read_text().splitlines()]
    assert {"task", "reward", "backend"} <= {what for what, _ in rows}
    worker_pids = {int(pid) for what, pid in rows if what in ("reward", "backend")}
    assert os.getpid() not in worker_pids, "the reward or backend ran in the driver, not in a Ray worker"
    # the SkyRL-style estimator and policy loss registered by decorator in the plugin file
    assert {"estimator", "loss"} <= {what for what, _ in rows}, "the SkyRL-style estimator or loss never ran"
    skyrl_pids = {int(pid) for what, pid in rows if what in ("estimator", "loss")}
    assert os.getpid() not in skyrl_pids, "the SkyRL-style estimator or loss ran in the driver, not in a Ray worker"


def test_unknown_task_is_a_usage_error_before_ray_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--data.task", "digit", "--logging.run-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.strip() == (
        "error: data.task: unknown task 'digit'; did you mean 'digits'? Available: ['arithmetic', 'digits', 'gsm8k']"
    )
