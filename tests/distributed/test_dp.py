"""Data-parallel policy ranks on Ray (``--trainer.workers W``): the same run at W=1 and W=2
samples the same responses and gives the same metrics (to float rounding: the W ranks sum the
gradient in another order); checkpoints load at any W; a dead rank is named.

The W=1 reference runs in-process (the in-process == Ray equality is tested in
test_ray_runner.py), so each test starts only the W rank actors.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.distributed.dp import DPWorkers
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.distributed.ray_runner import WorkerDiedError, train_on_ray
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.loop import train

pytestmark = pytest.mark.ray
ship_by_value(sys.modules[__name__])

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "2", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "4", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--trainer.micro-batch-size", "4", "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress",
]
ALGORITHMS = {
    "grpo": (),
    "rloo+seq_mean_token_sum_norm": ("--algorithm.advantage-estimator", "rloo", "--algorithm.loss-reduction", "seq_mean_token_sum_norm"),
    "ppo_gae+kl_loss": (
        "--algorithm.advantage-estimator", "gae", "--algorithm.use-kl-loss", "--algorithm.update-epochs", "2",
    ),
    "grpo+prompt_mean": ("--algorithm.loss-reduction", "prompt_mean"),
    # dynamic sampling refills (3 sampled batches at most) and a replaced group of 2G rows
    "dapo+replace": (
        "--algorithm.batch-transforms", "overlong_filter", "dynamic_sampling", "--algorithm.transform.dynamic-sampling.type",
        "replace", "--algorithm.transform.dynamic-sampling.max-sample-batches", "3",
    ),
    # with the format credit the step-1 batch keeps a single prompt group: rank 1 trains on none
    "zero_variance+one_group": ("--algorithm.batch-transforms", "zero_variance_filter", "--data.format-credit", "0.3"),
    "distill+teacher": ("--teacher.model", "tiny", "--teacher.coef", "0.5", "--algorithm.use-kl-in-reward"),
}
#: W=1 and W=2 sum the same per-token terms in different orders (other micro-batches, a
#: reduce-scatter): float32 rounding, ~1e-7 relative per step, grows slowly through AdamW.
REL, ABS = 1e-4, 1e-6
SKIP = ("seconds", "per_s")


def _run(path, *extra):
    argv = [*TINY, "--logging.run-dir", str(path), *extra]
    return resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        for k, v in b.items():
            if isinstance(v, float) and not any(s in k for s in SKIP):
                assert a[k] == pytest.approx(v, rel=REL, abs=ABS), k


def _weights(path, role="policy"):
    return ckpt.load(ckpt.latest_checkpoint(path)).weights[role]


class _Recording(DPWorkers):
    """Records each rank's resident bytes per role (its shards) before the ranks stop."""

    resident: list = []

    def close(self):
        if self.ranks:
            _Recording.resident[:] = self.resident_bytes()
        super().close()


@pytest.mark.parametrize(
    "algorithm",
    [
        "grpo", "ppo_gae+kl_loss", pytest.param("rloo+seq_mean_token_sum_norm", marks=pytest.mark.slow),
        pytest.param("grpo+prompt_mean", marks=pytest.mark.slow), pytest.param("dapo+replace", marks=pytest.mark.slow),
        pytest.param("zero_variance+one_group", marks=pytest.mark.slow), pytest.param("distill+teacher", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_give_the_one_worker_metrics(ray_session, tmp_path, algorithm):
    args = ("--trainer.steps", "2", *ALGORITHMS[algorithm])
    run = _run(tmp_path / "w2", *args, "--trainer.workers", "2")
    dp = train(run, workers=_Recording)
    single = _run(tmp_path / "w1", *args, "--ray.no-use-ray")
    one = train(single)
    _assert_same(dp.history, one.history)
    if algorithm == "dapo+replace":  # a trained step with a refill (and replaced groups)
        assert any(h["batch_sampled_batches"] > 1 and not h["skipped"] for h in dp.history)
    if algorithm == "zero_variance+one_group":  # a trained step with fewer prompt groups than ranks
        assert any(h["batch_kept_groups"] == 1 and not h["skipped"] for h in dp.history)
    # Every role the run uses is sharded over the ranks: each rank keeps half of its parameters.
    roles = {"params"} | {r for r, used in (("reference", run.uses_reference), ("critic", run.uses_critic), ("teacher", run.uses_teacher)) if used}
    for role in roles:
        per_rank = [m[role] for m in _Recording.resident]
        assert len(per_rank) == 2 and max(per_rank) <= 0.6 * sum(per_rank), role
    if run.uses_reference:  # the reference is the initial policy: the same parameters, sharded alike
        assert [m["reference"] for m in _Recording.resident] == [m["params"] for m in _Recording.resident]
    # The same responses were sampled: equal rewards and lengths, exactly.
    for a, b in zip(dp.history, one.history):
        assert a["reward"] == b["reward"] and a["response_tokens"] == b["response_tokens"]
    w2, w1 = _weights(run.config.ckpt_dir), _weights(single.config.ckpt_dir)
    assert set(w2) == set(w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo_gae+kl_loss"])
def test_resume_with_another_number_of_ranks(ray_session, tmp_path, algorithm):
    """Save at W=2 and resume at W=1, save at W=1 and resume at W=2: the resumed step equals
    that of an uninterrupted W=1 run (checkpoints hold the unsharded state, the critic's too)."""
    base = ("--trainer.ckpt-interval", "1", *ALGORITHMS[algorithm])
    full = train(_run(tmp_path / "full", *base, "--trainer.steps", "3", "--ray.no-use-ray"))
    a = _run(tmp_path / "a", *base, "--trainer.steps", "2", "--trainer.workers", "2")
    train_on_ray(a)
    a_resumed = train(_run(tmp_path / "a", *base, "--trainer.steps", "3", "--trainer.resume", "--ray.no-use-ray"))
    b = _run(tmp_path / "b", *base, "--trainer.steps", "2", "--ray.no-use-ray")
    train(b)
    saved = _weights(b.config.ckpt_dir)
    b_resumed = train_on_ray(_run(tmp_path / "b", *base, "--trainer.steps", "3", "--trainer.resume", "--trainer.workers", "2"))
    assert a_resumed.resumed_from == b_resumed.resumed_from == 2
    _assert_same(a_resumed.history, full.history[2:])
    _assert_same(b_resumed.history, full.history[2:])
    # W=2 wrote back what it loaded plus one step; its checkpoint loads unsharded.
    w3 = _weights(tmp_path / "b" / "checkpoints")
    assert set(w3) == set(saved) and any(not torch.equal(w3[k], saved[k]) for k in saved)
    for k, v in _weights(tmp_path / "full" / "checkpoints").items():
        torch.testing.assert_close(w3[k], v, rtol=1e-4, atol=1e-5)
    if a.uses_critic:  # the sharded critic was saved and loaded across W too
        for k, v in _weights(tmp_path / "full" / "checkpoints", "critic").items():
            torch.testing.assert_close(_weights(tmp_path / "b" / "checkpoints", "critic")[k], v, rtol=1e-4, atol=1e-5)


class _KillRank1(DPWorkers):
    """Kills rank 1's process (SIGKILL) right after the first step's sampling was submitted."""

    def update_policy(self, generated, ref_log_probs, values, kl_coef):
        import ray

        pid = ray.get(self.ranks[1].ping.remote())
        os.kill(pid, signal.SIGKILL)
        return super().update_policy(generated, ref_log_probs, values, kl_coef)


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_fast_and_is_named(ray_session, tmp_path):
    import time

    run = _run(tmp_path, "--trainer.steps", "2", "--trainer.workers", "2", "--trainer.dist-timeout-s", "120")
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"policy rank 1 of 2 \(PolicyRank, pid \d+\) died during step 1"):
        train(run, workers=_KillRank1)
    assert time.monotonic() - t0 < 90  # well before the collective's timeout


CLUSTER_SCRIPT = r'''
import functools, json, os, sys
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
from ray.cluster_utils import Cluster
from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.distributed.dp import DPWorkers
from skyrl_fn.trainer.loop import train

argv, out = json.loads(sys.argv[1]), sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
nodes = []

class Recording(DPWorkers):
    def __init__(self, run):
        super().__init__(run, strategy="STRICT_SPREAD")  # one rank per node
        nodes.extend(ray.get([a.node_id.remote() for a in self.ranks]))

run = resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)
history = train(run, workers=Recording).history
json.dump({"nodes": nodes, "history": [dict(h) for h in history]}, open(out, "w"))
ray.shutdown()
cluster.shutdown()
'''


@pytest.mark.slow
def test_two_nodes_one_rank_each_match_one_worker(tmp_path):
    """A 2-node local cluster (``ray.cluster_utils.Cluster``, its own Ray in a subprocess), one
    rank per node (STRICT_SPREAD placement group), 3 steps: the single-worker metrics."""
    import json
    import subprocess

    argv = [*TINY, "--trainer.steps", "3", "--trainer.workers", "2", "--logging.run-dir", str(tmp_path / "cluster")]
    out = tmp_path / "out.json"
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo}
    subprocess.run([sys.executable, str(script), json.dumps(argv), str(out)], check=True, env=env, timeout=900)
    got = json.loads(out.read_text())
    assert len(set(got["nodes"])) == 2
    one = train(_run(tmp_path / "w1", "--trainer.steps", "3", "--ray.no-use-ray"))
    _assert_same(got["history"], one.history)
