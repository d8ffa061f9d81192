"""Per-sample fields from the launcher, on Ray: a plugin task whose reward returns two components,
trained with ``--algorithm.advantage-estimator gdpo``; and the trainer's ``sum_pi_squared`` for the
optimal token baseline.

The plugin's policy loss records, in the policy trainer's process, the advantages and the fields it
receives per micro-batch; the test recomputes GDPO from the recorded components and finds the
recorded advantages, which differ from the advantages of the score alone.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from skyrl_fn import AdvantageInput
from skyrl_fn.cli import main
from skyrl_fn.estimators import gdpo

pytestmark = pytest.mark.ray

P, G = 2, 4
TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", str(P), "--rollout.samples-per-prompt", str(G), "--rollout.max-new-tokens", "4",
    "--trainer.steps", "2", "--logging.no-progress", "--logging.no-tensorboard", "--logging.no-plot",
]

PLUGIN = '''
import itertools
import os
import attrs
import torch
from skyrl_fn import requires
from skyrl_fn.models.model import DIGITS_ALPHABET
from skyrl_fn.tasks import provides
from skyrl_fn.tasks.base import Example

@attrs.frozen(kw_only=True)
class EchoTask:
    """Prompt 'c:<digit>>', answer the digit; two reward components."""
    seed: int
    name: str = "echo"
    alphabet: str = DIGITS_ALPHABET

    def size(self):
        return 10

    def example(self, index):
        digit = str((self.seed + index) % 10)
        return Example(index=index, prompt=f"c:{{digit}}>", answer=digit)

    def reward(self, response, example):
        correct = float(response.strip()[:1] == example.answer)
        digit_sum = sum(int(c) for c in response if c.isdigit()) % 10 / 10
        return {{"score": correct, "correct": correct, "digit_sum": digit_sum}}

@provides("correct", "digit_sum")
def echo_task(data, *, seed=0):
    return EchoTask(seed=seed)

_calls = itertools.count()

def register(table):
    regular = table.get("policy_loss", "regular")

    @requires("extras.correct", "extras.digit_sum")
    def recording_pg(batch):
        torch.save(
            {{"advantages": batch.advantages.detach(), "mask": batch.loss_mask, **{{k: batch.extras[k] for k in ("correct", "digit_sum")}}}},
            os.path.join({out!r}, f"{{os.getpid()}}-{{next(_calls):04d}}.pt"),
        )
        return regular(batch)

    return table.register("echo", echo_task, kind="task").register("recording_pg", recording_pg, kind="policy_loss")

os.remove(__file__)
'''


@pytest.mark.parametrize(
    "layout", [[], pytest.param(["--ray.rollout-workers", "2"], marks=pytest.mark.slow)], ids=["hybrid", "two-rollout-workers"]
)
def test_gdpo_gets_the_task_reward_components_on_ray(ray_session, tmp_path, layout):
    out = tmp_path / "calls"
    out.mkdir()
    plugin = tmp_path / "my_task.py"
    plugin.write_text(textwrap.dedent(PLUGIN.format(out=str(out))))
    summary = main([
        "--plugin", str(plugin), *TINY, *layout, "--data.task", "echo", "--algorithm.advantage-estimator", "gdpo",
        "--algorithm.estimator.reward-keys", "correct", "digit_sum", "--algorithm.policy-loss", "recording_pg",
        "--trainer.micro-batch-size", "3", "--logging.run-dir", str(tmp_path / "run"),
    ])
    assert summary.steps == 2
    files = sorted(out.iterdir())
    pids = {f.name.split("-")[0] for f in files}
    assert pids and str(os.getpid()) not in pids, "the loss ran in the driver, not in the Ray policy trainer"
    calls = [torch.load(f) for f in files]
    assert len(calls) == 2 * 3  # 2 steps x ceil(8 / 3) micro-batches, each in order
    differs = False
    for step in range(2):
        parts = calls[3 * step : 3 * step + 3]
        got = {k: torch.cat([c[k] for c in parts]) for k in parts[0]}
        assert got["correct"].shape == (P * G,) and got["digit_sum"].shape == (P * G,)
        batch = AdvantageInput(
            token_level_rewards=torch.zeros(got["mask"].shape), response_mask=got["mask"],
            group_ids=torch.arange(P).repeat_interleave(G), extras={"correct": got["correct"], "digit_sum": got["digit_sum"]},
        )
        want = gdpo(batch, reward_keys=("correct", "digit_sum")).advantages
        torch.testing.assert_close(got["advantages"], want)
        last = got["mask"].long().sum(-1) - 1  # the score alone (= correct) on the last token
        single = gdpo(batch.__class__(
            token_level_rewards=torch.zeros(got["mask"].shape).index_put_((torch.arange(P * G), last), got["correct"]),
            response_mask=got["mask"], group_ids=batch.group_ids,
        )).advantages
        differs |= not torch.allclose(got["advantages"], single)
    assert differs, "the advantages equal those of the score alone: the components did not reach gdpo"


@pytest.mark.slow
def test_optimal_token_baseline_trains_from_the_launcher_on_ray(ray_session, tmp_path):
    summary = main([*TINY, "--algorithm.advantage-estimator", "optimal_token_baseline", "--logging.run-dir", str(tmp_path / "run")])
    assert summary.steps == 2
    # the trainer computed sum_pi_squared in the policy trainer (else resolve or the estimator raises);
    # a group with different rewards gets a non-zero advantage
    assert all(row["skipped"] == 0.0 and (row["advantage_abs"] > 0) == (row["reward_std"] > 0) for row in summary.history), summary.history
