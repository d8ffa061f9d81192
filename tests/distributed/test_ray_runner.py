"""Ray runner: the one ResolvedRun reaches every actor; a dead worker is named; checkpoints stay
intact; the Ray step equals the in-process step.

In-process tests share the session's Ray (``ray_session``); the ``__main__`` test runs a script
in a subprocess with its own Ray, exactly as a user's custom entry point would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, chain, clip_advantages
from skyrl_fn.estimators import gae
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.distributed.ray_runner import WorkerDiedError, concat_rollouts, train_on_ray
from skyrl_fn.trainer import checkpoint as ckpt

pytestmark = pytest.mark.ray

# This module is importable only through pytest's sys.path edit: Ray workers get it by value.
ship_by_value(sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress",
]


def _run(tmp_path, *extra, table=DEFAULT_TABLE):
    argv = [*TINY, "--logging.run-dir", str(tmp_path / "run"), *extra]
    return resolve_names(parse_config(argv, table), table)


def _recording_estimator(marker: str, die_on_call: int = 0):
    """An estimator that appends its pid to ``marker`` and kills its process on call N."""

    @torch.no_grad()
    def recorded(batch: AdvantageInput, *, epsilon: float = 1e-6) -> AdvantageOutput:
        """GRPO-like: score minus its group mean, on every response token. [B, T] -> [B, T]."""
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(marker) as f:
            calls = len(f.read().split())
        if die_on_call and calls >= die_on_call:
            os._exit(1)  # a worker crash (OOM kill, segfault...) in the middle of a step
        m = batch.response_mask
        s = torch.where(m, batch.token_level_rewards, 0).sum(-1)
        g = batch.group_ids
        mean = torch.zeros(int(g.max()) + 1).index_add_(0, g, s) / torch.bincount(g).float()
        adv = torch.where(m, (s - mean[g])[:, None], 0)
        return AdvantageOutput(advantages=adv, returns=adv)

    return recorded


LAYOUTS = {
    "hybrid": (),  # the policy trainer samples
    "one-rollout-worker": ("--ray.rollout-workers", "1"),  # weights pushed after every update
}
# Chained from a critic estimator and registered under a new name: needs a critic because the
# entry says so (chain carries gae's requirement), not because of its name.
CHAINED = DEFAULT_TABLE.register("gae_clipped", chain(gae, clip_advantages(1.0)))
KL = ("--algorithm.use-kl-loss", "--algorithm.use-kl-in-reward", "--algorithm.kl-ctrl", "adaptive")
ALGORITHMS = {
    "grpo": (),
    "ppo_gae+kl": ("--algorithm.advantage-estimator", "gae", "--algorithm.estimator.lambd", "0.95", "--algorithm.update-epochs", "2", *KL),
    "gae_clipped+kl": ("--algorithm.advantage-estimator", "gae_clipped", "--algorithm.estimator.lambd", "0.95", *KL),
}
KEYS = ("reward", "response_length", "loss", "pg_loss", "grad_norm", "kl", "kl_loss", "value_loss", "critic_grad_norm", "kl_coef")
# Each Ray run starts one actor per role (a process importing torch): the suite runs the two that
# together cover both layouts, the reference model, the critic and a chained estimator.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "algorithm, layout",
    [
        pytest.param("grpo", "one-rollout-worker", marks=SLOW),
        # make test: the same run with dro, bypass mode, a correction chain and batch transforms is
        # tests/cli/test_losses_on_ray.py::test_ray_gives_the_in_process_metrics_with_a_critic_a_reference_and_a_chained_estimator
        pytest.param("gae_clipped+kl", "hybrid", marks=SLOW),
        pytest.param("grpo", "hybrid", marks=SLOW),  # also the recorded-estimator test below
        pytest.param("ppo_gae+kl", "hybrid", marks=SLOW),
        pytest.param("ppo_gae+kl", "one-rollout-worker", marks=SLOW),
        pytest.param("gae_clipped+kl", "one-rollout-worker", marks=SLOW),
    ],
)
def test_ray_gives_the_in_process_metrics(ray_session, tmp_path, algorithm, layout):
    from skyrl_fn.trainer.loop import train

    args = ("--trainer.steps", "2", *ALGORITHMS[algorithm])
    run = _run(tmp_path / "ray", *args, *LAYOUTS[layout], table=CHAINED)
    assert run.uses_critic == run.uses_reference == (algorithm != "grpo")
    ray_hist = train_on_ray(run).history
    local = train(_run(tmp_path / "local", *args, "--ray.no-use-ray", table=CHAINED)).history
    assert len(ray_hist) == 2
    check_same_metrics(run, ray_hist, local)


def check_same_metrics(run, ray_hist, local):
    """The Ray run ``run`` (history ``ray_hist``) logged the in-process run's metrics (``local``),
    and with a critic and a reference their metrics and the critic's checkpoint."""
    assert len(ray_hist) == len(local)
    for a, b in zip(ray_hist, local):
        assert set(a) == set(b)
        for key in KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    if run.uses_critic:
        assert {"value_loss", "kl", "kl_loss", "kl_coef"} <= set(local[0])
        assert "critic" in ckpt.load(ckpt.latest_checkpoint(run.config.ckpt_dir)).weights


@pytest.mark.parametrize(
    "layout",
    [
        # hybrid: the policy trainer samples (make test-all: the plugin and Ray == in-process runs
        # of make test cover a driver-registered function in the policy actor)
        pytest.param((), marks=pytest.mark.slow),
        pytest.param(("--ray.rollout-workers", "1", "--model.dtype", "bf16"), marks=pytest.mark.slow),  # weights as bytes (bf16 has no numpy)
    ],
    ids=["hybrid", "one-rollout-worker-bf16"],
)
def test_driver_registered_estimator_runs_in_the_policy_actor_and_matches_in_process(ray_session, tmp_path, layout):
    from skyrl_fn.trainer.loop import train

    marker = str(tmp_path / "calls.txt")
    table = DEFAULT_TABLE.register("recorded", _recording_estimator(marker))
    args = ("--trainer.steps", "2", "--algorithm.advantage-estimator", "recorded", *layout)
    summary = train_on_ray(_run(tmp_path / "ray", *args, table=table))
    assert summary.steps == 2 and len(summary.history) == 2
    pids = {int(p) for p in open(marker).read().split()}
    assert pids and os.getpid() not in pids, "the estimator ran in the driver, not in a worker"
    assert summary.last_checkpoint and ckpt.load(summary.last_checkpoint).step == 2
    # The same run in-process (no Ray) gives the same metrics: same seeds, same order.
    local = train(_run(tmp_path / "local", *args, "--ray.no-use-ray", table=table)).history
    for a, b in zip(summary.history, local):
        for key in ("reward", "response_length", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_dead_worker_is_named_and_last_checkpoint_stays_intact(ray_session, tmp_path):
    marker = str(tmp_path / "calls.txt")
    table = DEFAULT_TABLE.register("dies", _recording_estimator(marker, die_on_call=3))
    run = _run(tmp_path, "--trainer.steps", "5", "--trainer.ckpt-interval", "1", "--algorithm.advantage-estimator", "dies", table=table)
    with pytest.raises(WorkerDiedError, match=r"policy trainer \(PolicyTrainer\) died during step 3.*step_00000002"):
        train_on_ray(run)
    latest = ckpt.latest_checkpoint(run.config.ckpt_dir)
    assert latest is not None and latest.endswith("step_00000002")
    c = ckpt.load(latest)
    assert c.step == 2 and c.data_state["position"] == 4 and "policy" in c.weights


@pytest.mark.slow
def test_two_rollout_workers_start_reference_and_critic_actors(ray_session, tmp_path):
    run = _run(tmp_path, "--trainer.steps", "1", "--algorithm.advantage-estimator", "gae", "--algorithm.use-kl-loss")
    summary = train_on_ray(run, num_rollout_workers=2)
    (m,) = summary.history
    assert {"kl", "value_loss", "kl_loss"} <= set(m), sorted(m)
    assert m["response_tokens"] > 0 and 0.0 <= m["reward"] <= 1.0
    assert "critic" in ckpt.load(summary.last_checkpoint).weights


def test_concat_rollouts_pads_and_offsets_groups():
    from skyrl_fn.rollout.base import RolloutBatch

    def part(lp, t, p):
        b = 2 * p
        return RolloutBatch(
            prompt_ids=torch.full((b, lp), 5), prompt_mask=torch.ones(b, lp, dtype=torch.bool),
            response_ids=torch.full((b, t), 6), response_mask=torch.ones(b, t, dtype=torch.bool),
            rollout_log_probs=torch.zeros(b, t), group_ids=torch.arange(p).repeat_interleave(2),
            prompts=[f"p{i}" for i in range(p)], responses=["r"] * b,
        )

    out = concat_rollouts([part(3, 2, 1), part(2, 4, 2)], pad_id=0)
    assert out.prompt_ids.shape == (6, 3) and out.response_ids.shape == (6, 4)
    assert out.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.prompt_mask[2:, 0].tolist() == [False] * 4  # left padding
    assert out.response_mask[:2, 2:].sum() == 0  # right padding


MAIN_SCRIPT = textwrap.dedent(
    '''
    """A custom entry point as in SkyRL's docs: start Ray, register, then call main()."""
    import os, tempfile

    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="skyrl_fn_ray_"))

    import torch
    from skyrl_fn.compat import register_advantage_estimator
    from skyrl_fn.cli import main


    @register_advantage_estimator("main_defined")  # registered AFTER ray.init, in __main__
    def main_defined(token_level_rewards, response_mask, index, **kwargs):
        with open(os.environ["MARKER"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        scores = (token_level_rewards * response_mask).sum(-1)
        ids = torch.as_tensor(index)
        means = torch.stack([scores[ids == i].mean() for i in ids.tolist()])
        adv = (scores - means)[:, None] * response_mask
        return adv, adv


    if __name__ == "__main__":
        with open(os.environ["DRIVER_PID"], "w") as f:
            f.write(str(os.getpid()))
        main()
    '''
)


@pytest.mark.slow
def test_estimator_from_driver_main_registered_after_ray_init_runs_in_a_worker(tmp_path):
    script = tmp_path / "main_custom_adv_est.py"
    script.write_text(MAIN_SCRIPT)
    marker = tmp_path / "calls.txt"
    env = dict(os.environ, MARKER=str(marker), DRIVER_PID=str(tmp_path / "driver.pid"), RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(script), *TINY, "--trainer.steps", "2", "--algorithm.advantage-estimator", "main_defined",
         "--logging.run-dir", str(tmp_path / "run"), "--logging.no-tensorboard", "--logging.no-plot"],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = {int(p) for p in marker.read_text().split()}
    driver = int((tmp_path / "driver.pid").read_text())
    assert pids and driver not in pids, "the __main__ estimator did not run in a Ray worker"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["backend"] == "ray"


@pytest.mark.slow
def test_ray_resume_continues_like_an_uninterrupted_run(ray_session, tmp_path):
    from skyrl_fn.trainer.loop import train

    full = train(_run(tmp_path / "full", "--trainer.steps", "3", "--ray.no-use-ray")).history
    first = _run(tmp_path / "ray", "--trainer.steps", "2", "--trainer.ckpt-interval", "1")
    train_on_ray(first)
    resumed = _run(tmp_path / "ray", "--trainer.steps", "3", "--trainer.ckpt-interval", "1", "--trainer.resume")
    summary = train_on_ray(resumed)
    assert summary.resumed_from == 2 and len(summary.history) == 1
    for key in ("reward", "response_length", "loss", "grad_norm"):
        assert summary.history[0][key] == pytest.approx(full[2][key], rel=1e-4, abs=1e-6), key


def test_release_returns_once_every_actor_is_dead(ray_session):
    """``ray.kill`` only asks; ``release`` returns when no actor answers any more (so a run
    started right after finds their CPUs free)."""
    import ray
    from ray.exceptions import RayActorError

    from skyrl_fn.distributed.actors import release

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> int:
            return 1

    actors = [Idle.remote() for _ in range(3)]
    assert ray.get([a.ping.remote() for a in actors]) == [1, 1, 1]
    release(actors)
    for a in actors:
        with pytest.raises(RayActorError):
            ray.get(a.ping.remote(), timeout=5)
