"""Data-parallel policy ranks on Ray (``--trainer.workers W``): the same run at W=1 and W=2
samples the same responses and gives the same metrics (to float rounding: the W ranks sum the
gradient in another order); each rank writes its own checkpoint shards, which load at any W (and
a SIGKILLed save leaves the previous checkpoint); a dead rank is named. With separate rollout
workers (the ranks gather the full weights once per update for them) the same holds, also for
asynchronous training.

The W=1 reference runs in-process (the in-process == Ray equality is tested in
test_ray_runner.py), so each test starts only the W rank actors.
"""

from __future__ import annotations

import os
import shutil
import signal
import json
import subprocess
import sys
import time

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.distributed.dp import DPWorkers
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.distributed.ray_runner import WorkerDiedError, train_on_ray
from skyrl_fn.distributed.weights import unpack
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import shards
from skyrl_fn.trainer.loop import train
from skyrl_fn.trainer.workers import trained_roles
from tests.ray_sessions import sigkill_driver_when

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
    # the old-policy pass before the update (recomputed old log-probs and the estimator's
    # sum_pi_squared field), each rank on its share, all-gathered
    "optimal_token_baseline+recompute": ("--algorithm.advantage-estimator", "optimal_token_baseline", "--algorithm.recompute-old-log-probs"),
}
#: W=1 and W=2 sum the same per-token terms in different orders (other micro-batches, a
#: reduce-scatter): float32 rounding, ~1e-7 relative per step, grows slowly through AdamW.
REL, ABS = 1e-4, 1e-6
SKIP = ("seconds", "per_s")
#: The policy loss's own metrics are means per micro-batch (weighted by its rows), so they depend
#: on which rows share a micro-batch; each rank cuts its micro-batches from its own share ordered
#: by response length (skyrl_fn.trainer.micro_batches), so at W=1 and W=2 the micro-batches hold
#: other rows and these agree only while the ratio is 1 (the first update epoch). The loss, its
#: globally normalised terms, the gradient norm and the weights are compared.
PER_MICRO_BATCH = ("ratio_mean", "ratio_min", "ratio_max", "approx_kl", "clip_frac_low", "clip_frac_high", "clip_ratio")


def _run(path, *extra):
    argv = [*TINY, "--logging.run-dir", str(path), *extra]
    return resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        for k, v in b.items():
            if isinstance(v, float) and not any(s in k for s in SKIP) and k not in PER_MICRO_BATCH:
                assert a[k] == pytest.approx(v, rel=REL, abs=ABS), k


def _weights(path, step=None, role="policy"):
    """``role``'s full weights in checkpoint ``step`` (the newest when None) of ``path``, whole or
    sharded."""
    c = ckpt.load(ckpt.latest_checkpoint(path) if step is None else os.path.join(path, f"step_{step:08d}"))
    return shards.read_weights(c.shards[role]) if role in c.shards else c.weights[role]


def _assert_close_weights(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def _model_weights(worker):
    """A rollout worker's weights (run inside the actor by ``__ray_call__``)."""
    return {k: v.detach().clone() for k, v in worker.model.state_dict().items()}


class _Recording(DPWorkers):
    """Records each rank's resident bytes per role (its shards) before the ranks stop; with
    rollout workers also the ranks' gathered weights and each rollout worker's."""

    resident: list = []
    synced: list = []

    def close(self):
        if self.ranks:
            _Recording.resident[:] = self.resident_bytes()
            if self.rollout is not None:
                self.rollout.flush()  # the last update's push reached every worker
                packed = self.get([a.packed_weights.remote() for a in self.ranks])
                assert packed[1:] == [None] * (len(self.ranks) - 1)
                workers = self.get([w.__ray_call__.remote(_model_weights) for w in self.rollout.workers])
                _Recording.synced[:] = [unpack(packed[0]), *workers]
        super().close()


def _two_and_one(tmp_path, *args, layout=()):
    """The same run at W=2 (2 steps, on Ray, with the rollout ``layout`` flags; each rank's
    resident bytes recorded) and W=1 (3 steps, in-process), each with a checkpoint a step. In-process the
    policy samples itself, which samples what one rollout worker does (test_ray_runner.py)."""
    w2 = _run(tmp_path / "w2", "--trainer.steps", "2", "--trainer.ckpt-interval", "1", *args, *layout, "--trainer.workers", "2")
    w1 = _run(tmp_path / "w1", "--trainer.steps", "3", "--trainer.ckpt-interval", "1", *args, "--ray.no-use-ray")
    dp = train(w2, workers=_Recording)
    return w2, dp, list(_Recording.resident), w1, train(w1)


def _check_same_run(w2, dp, resident, w1, one):
    _assert_same(dp.history, one.history[:2])
    # Every role the run uses is sharded over the ranks: each rank keeps half of its parameters.
    roles = {"params"} | {r for r, used in (("reference", w2.uses_reference), ("critic", w2.uses_critic), ("teacher", w2.uses_teacher)) if used}
    for role in roles:
        per_rank = [m[role] for m in resident]
        assert len(per_rank) == 2 and max(per_rank) <= 0.6 * sum(per_rank), role
    if w2.uses_reference:  # the reference is the initial policy: the same parameters, sharded alike
        assert [m["reference"] for m in resident] == [m["params"] for m in resident]
    # The same responses were sampled: equal rewards and lengths, exactly.
    for a, b in zip(dp.history, one.history):
        assert a["reward"] == b["reward"] and a["response_tokens"] == b["response_tokens"]
    for role in ("policy", "critic") if w2.uses_critic else ("policy",):
        _assert_close_weights(_weights(w2.config.ckpt_dir, role=role), _weights(w1.config.ckpt_dir, step=2, role=role))


@pytest.fixture(scope="module")
def ppo_runs(ray_session, tmp_path_factory):
    """PPO with GAE and a KL loss at W=2 and W=1 (:func:`_two_and_one`): the policy, the reference
    and the critic sharded; shared by the fast tests."""
    return _two_and_one(tmp_path_factory.mktemp("ppo"), *ALGORITHMS["ppo_gae+kl_loss"])


def test_two_ranks_give_the_one_worker_metrics(ppo_runs):
    _check_same_run(*ppo_runs)


# Slow (~32 s on an idle machine: two ranks and a rollout worker start): the fast suite's W=2 run
# is the hybrid PPO fixture above; the rollout-worker layout at W > 1 runs in make test-all.
@pytest.mark.slow
def test_two_ranks_with_a_rollout_worker_give_the_one_worker_metrics(ray_session, tmp_path):
    """W=2 ranks with one separate rollout worker: the ranks gather the full state dict once per
    update and the worker loads it (its weights equal the ranks' after the last step); it samples
    the W=1 responses and the metrics and weights are W=1's."""
    _check_same_run(*_two_and_one(tmp_path, layout=("--ray.rollout-workers", "1")))
    gathered, worker = _Recording.synced
    assert set(worker) == set(gathered)
    for k in gathered:
        assert torch.equal(worker[k], gathered[k]), k
    _assert_close_weights(gathered, _weights(tmp_path / "w1" / "checkpoints", step=2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    [
        "grpo", "rloo+seq_mean_token_sum_norm", "grpo+prompt_mean", "dapo+replace", "zero_variance+one_group", "distill+teacher",
        "optimal_token_baseline+recompute",
    ],
)
def test_two_ranks_give_the_one_worker_metrics_of_other_algorithms(ray_session, tmp_path, algorithm):
    runs = _two_and_one(tmp_path, *ALGORITHMS[algorithm])
    _check_same_run(*runs)
    history = runs[1].history
    if algorithm == "dapo+replace":  # a trained step with a refill (and replaced groups)
        assert any(h["batch_sampled_batches"] > 1 and not h["skipped"] for h in history)
    if algorithm == "zero_variance+one_group":  # a trained step with fewer prompt groups than ranks
        assert any(h["batch_kept_groups"] == 1 and not h["skipped"] for h in history)


def _elements_per_file(directory):
    """``{rank file: elements of the tensors it stores}`` and the elements of every tensor of the
    DCP ``directory`` (weights and AdamW moments; plain values such as step counts left out)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(directory).read_metadata()
    per_file, total = {}, 0
    for key, m in md.state_dict_metadata.items():
        if not hasattr(m, "chunks"):
            continue  # plain values (the optimiser's hyperparameters)
        total += m.size.numel()
        for index, info in md.storage_data.items():
            if index.fqn == key:
                chunk = next(c for c in m.chunks if list(c.offsets) == list(index.offset))
                per_file[info.relative_path] = per_file.get(info.relative_path, 0) + chunk.sizes.numel()
    return per_file, total


def test_each_rank_writes_its_own_shards(ppo_runs):
    """The W=2 checkpoint holds one file per rank for the policy and one for the critic, each with
    about half of that model's weights' and AdamW moments' elements and every element stored once
    (not a gathered state); the manifest lists them with their sha256."""
    w2 = ppo_runs[0]
    path = ckpt.latest_checkpoint(w2.config.ckpt_dir)
    manifest = ckpt.verify(path)
    assert manifest["format"] == 2
    for role in ("policy", "critic"):
        assert f"{role}.safetensors" not in manifest["files"]
        files = {"__0_0.distcp", "__1_0.distcp", shards.METADATA}
        assert {f"{role}/{f}" for f in files} <= set(manifest["files"])
        assert set(os.listdir(os.path.join(path, role))) == files
        per_file, total = _elements_per_file(os.path.join(path, role))
        assert set(per_file) == {"__0_0.distcp", "__1_0.distcp"} and sum(per_file.values()) == total, role
        for n in per_file.values():
            assert 0.4 < n / total < 0.6, (role, per_file)
    assert set(os.listdir(path)) == {"policy", "critic", "optim.pt", "rng.pt", "state.json", ckpt.MANIFEST}
    c = ckpt.load(path)
    assert set(c.shards) == {"policy", "critic"} and c.weights == {}
    assert set(c.optim) == {"policy_sched", "critic_sched"} and len(c.rng["ranks"]) == 2


def test_a_damaged_critic_shard_is_named_and_resume_falls_back(ppo_runs, tmp_path):
    """The newest W=2 checkpoint with one rank's critic file altered: resume (at W=1) warns naming
    that file and continues from the one before, to the uninterrupted run's steps and weights."""
    w2, _, _, w1, one = ppo_runs
    shutil.copytree(w2.config.ckpt_dir, tmp_path / "checkpoints")
    with open(tmp_path / "checkpoints" / "step_00000002" / "critic" / "__1_0.distcp", "r+b") as f:
        f.seek(64)
        f.write(b"\x00\xff\x00")
    run = _run(tmp_path, "--trainer.steps", "3", "--trainer.resume", *ALGORITHMS["ppo_gae+kl_loss"], "--ray.no-use-ray")
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        resumed = train(run)
    assert any("step_00000002: critic/__1_0.distcp: sha256" in str(w.message) for w in caught)
    assert resumed.resumed_from == 1
    _assert_same(resumed.history, one.history[1:])
    for role in ("policy", "critic"):
        _assert_close_weights(_weights(run.config.ckpt_dir, role=role), _weights(w1.config.ckpt_dir, step=3, role=role))


# Resuming at W=2 starts two more rank actors: in make test-all (W=1 -> 2 -> 1 is slow too).
@pytest.mark.parametrize("where", ["at1", pytest.param("at2", marks=pytest.mark.slow)])
def test_a_two_rank_checkpoint_resumes_at_one_worker_and_at_two(ppo_runs, tmp_path, where):
    """Saved at W=2: resumed in-process at W=1 (the shards read whole) and at W=2 (each rank its
    slices), the next step is that of the uninterrupted W=1 run, and so are the weights after it."""
    w2, _, _, w1, one = ppo_runs
    flags = {"at1": ("--ray.no-use-ray",), "at2": ("--trainer.workers", "2")}[where]
    shutil.copytree(w2.config.ckpt_dir, tmp_path / where / "checkpoints")
    run = _run(tmp_path / where, "--trainer.steps", "3", "--trainer.resume", *ALGORITHMS["ppo_gae+kl_loss"], *flags)
    if where == "at1":
        with pytest.warns(ckpt.CheckpointWarning, match="trainer.workers: 2 -> 1"):
            resumed = train(run)
    else:
        resumed = train_on_ray(run)
    assert resumed.resumed_from == 2
    _assert_same(resumed.history, one.history[2:])
    for role in ("policy", "critic"):
        _assert_close_weights(_weights(run.config.ckpt_dir, role=role), _weights(w1.config.ckpt_dir, step=3, role=role))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo_gae+kl_loss"])
def test_resume_with_another_number_of_ranks(ray_session, tmp_path, algorithm):
    """Save at W=1 (whole) and resume at W=2, save at W=2 (shards) and resume at W=1 on Ray: the
    resumed steps equal those of an uninterrupted W=1 run, and so do the weights (the critic's
    too: saved whole at W=1, as shards at W=2)."""
    base = ("--trainer.ckpt-interval", "1", *ALGORITHMS[algorithm])
    full = train(_run(tmp_path / "full", *base, "--trainer.steps", "4", "--ray.no-use-ray"))
    run = _run(tmp_path / "b", *base, "--trainer.steps", "2", "--ray.no-use-ray")
    train(run)
    saved = _weights(run.config.ckpt_dir)
    with pytest.warns(ckpt.CheckpointWarning, match="trainer.workers"):
        at2 = train_on_ray(_run(tmp_path / "b", *base, "--trainer.steps", "3", "--trainer.resume", "--trainer.workers", "2"))
    assert set(ckpt.load(at2.last_checkpoint).shards) == set(trained_roles(run))  # W=2 wrote shards of what it loaded plus a step
    w3 = _weights(run.config.ckpt_dir)
    assert set(w3) == set(saved) and any(not torch.equal(w3[k], saved[k]) for k in saved)
    with pytest.warns(ckpt.CheckpointWarning, match="trainer.workers"):
        at1 = train_on_ray(_run(tmp_path / "b", *base, "--trainer.steps", "4", "--trainer.resume"))
    assert (at2.resumed_from, at1.resumed_from) == (2, 3)
    _assert_same([*at2.history, *at1.history], full.history[2:])
    for role in ("policy", "critic") if run.uses_critic else ("policy",):
        _assert_close_weights(_weights(run.config.ckpt_dir, role=role), _weights(tmp_path / "full" / "checkpoints", role=role))


@pytest.mark.slow
def test_two_ranks_with_two_rollout_workers_give_the_one_worker_metrics(ray_session, tmp_path):
    """PPO (reference and critic sharded on the ranks) with two rollout workers, each sampling
    half of the prompts with its own seed: the same responses, metrics and weights at W=2 as the
    single policy actor with the same two workers."""
    args = ("--trainer.steps", "2", "--ray.rollout-workers", "2", *ALGORITHMS["ppo_gae+kl_loss"])
    w1, w2 = _run(tmp_path / "w1", *args), _run(tmp_path / "w2", *args, "--trainer.workers", "2")
    one, two = train_on_ray(w1), train_on_ray(w2)
    _assert_same(two.history, one.history)
    for a, b in zip(two.history, one.history):
        assert a["reward"] == b["reward"] and a["response_tokens"] == b["response_tokens"]
    for role in ("policy", "critic"):
        _assert_close_weights(_weights(w2.config.ckpt_dir, role=role), _weights(w1.config.ckpt_dir, role=role))


#: Asynchronous training (K=1: step s + 1 sampled on the rollout worker while step s trains).
ASYNC = ("--ray.rollout-workers", "1", "--trainer.max-staleness", "1", "--trainer.ckpt-interval", "1", "--trainer.keep-checkpoints", "5")


@pytest.fixture(scope="module")
def async_runs(ray_session, tmp_path_factory):
    """The same asynchronous run (3 steps, K=1, one rollout worker, a checkpoint a step) on Ray at
    W=1 (the single policy actor) and at W=2."""
    tmp = tmp_path_factory.mktemp("async")
    w1 = _run(tmp / "w1", "--trainer.steps", "3", *ASYNC)
    w2 = _run(tmp / "w2", "--trainer.steps", "3", *ASYNC, "--trainer.workers", "2")
    return w1, train_on_ray(w1), w2, train_on_ray(w2)


@pytest.mark.slow
def test_async_two_ranks_with_a_rollout_worker_give_the_one_worker_metrics(async_runs):
    """K=1 at W=2: every update after the first trains on a batch one version old, sampled with
    the weights the ranks gathered and pushed, and the run is the W=1 run (responses, metrics,
    weights)."""
    w1, one, w2, two = async_runs
    assert [h["version_gap"] for h in two.history] == [0.0, 1.0, 1.0]
    _assert_same(two.history, one.history)
    for a, b in zip(two.history, one.history):
        assert a["reward"] == b["reward"] and a["response_tokens"] == b["response_tokens"]
    _assert_close_weights(_weights(w2.config.ckpt_dir), _weights(w1.config.ckpt_dir))


@pytest.mark.slow
def test_async_two_rank_checkpoint_with_a_batch_in_flight_resumes_at_two_ranks(async_runs, tmp_path):
    """The W=2 checkpoint of step 2 holds the batch sampled ahead for step 3 (fetched from the
    object store); resumed at W=2 (the batch handed back to the ranks, the rollout worker given
    the loaded weights), step 3 is the uninterrupted run's."""
    w1, one, w2, two = async_runs
    name = "step_00000002"
    shutil.copytree(os.path.join(w2.config.ckpt_dir, name), tmp_path / "checkpoints" / name)
    c = ckpt.load_latest(str(tmp_path / "checkpoints"))
    assert [(b["step"], b["version"]) for b in c.in_flight["batches"]] == [(2, 1)]
    resumed = train_on_ray(_run(tmp_path, "--trainer.steps", "3", *ASYNC, "--trainer.workers", "2", "--trainer.resume"))
    assert resumed.resumed_from == 2
    _assert_same(resumed.history, one.history[2:])
    _assert_close_weights(_weights(str(tmp_path / "checkpoints")), _weights(w1.config.ckpt_dir))


_KILL_CHILD = """
import sys, time
import ray
from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.distributed.dp import DPWorkers
from skyrl_fn.trainer.loop import train

class StopsInSecondSave(DPWorkers):
    saves = 0

    def _write_shards(self, role, directory):
        super()._write_shards(role, directory)
        StopsInSecondSave.saves += 1
        if StopsInSecondSave.saves == 2:  # every rank wrote its shards; no manifest, no rename yet
            print("shards", directory, flush=True)
            time.sleep(600)

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
train(resolve_names(parse_config(sys.argv[1:], DEFAULT_TABLE), DEFAULT_TABLE), workers=StopsInSecondSave)
"""


@pytest.mark.slow
def test_sigkill_of_the_driver_mid_save_leaves_the_previous_checkpoint(ray_session, tmp_path):
    """The driver of a W=2 run (its own Ray, in a subprocess) SIGKILLed in its second save, after
    the ranks wrote their shards: the first checkpoint verifies and resumes (the leftover is
    removed by the next save) to the uninterrupted run's steps and weights."""
    steps = ("--trainer.steps", "3", "--trainer.ckpt-interval", "1")
    full = train(_run(tmp_path / "full", *steps, "--ray.no-use-ray"))
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    argv = [*TINY, "--logging.run-dir", str(tmp_path / "cut"), *steps, "--trainer.workers", "2"]
    line = sigkill_driver_when(str(script), argv, lambda line: line.startswith("shards "))
    directory = line.split()[1] if line else None
    assert directory is not None and ".tmp-step_00000002" in directory and os.path.isfile(os.path.join(directory, "__1_0.distcp"))
    cut = _run(tmp_path / "cut", *steps, "--trainer.resume", "--ray.no-use-ray")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(cut.config.ckpt_dir)] == ["step_00000001"]
    c = ckpt.load_latest(cut.config.ckpt_dir)
    assert c.step == 1 and c.shards["policy"].endswith("step_00000001/policy")
    with pytest.warns(ckpt.CheckpointWarning, match="trainer.workers"):
        resumed = train(cut)
    assert resumed.resumed_from == 1
    assert not [n for n in os.listdir(cut.config.ckpt_dir) if n.startswith(".")]
    _assert_same(resumed.history, full.history[1:])
    _assert_close_weights(_weights(cut.config.ckpt_dir), _weights(tmp_path / "full" / "checkpoints"))


class _KillRank1(DPWorkers):
    """Kills rank 1's process (SIGKILL) right after the first step's sampling was submitted."""

    def update_policy(self, generated, ref_log_probs, values, kl_coef):
        import ray

        pid = ray.get(self.ranks[1].ping.remote())
        os.kill(pid, signal.SIGKILL)
        return super().update_policy(generated, ref_log_probs, values, kl_coef)


@pytest.mark.slow
def test_a_dead_rank_fails_the_run_fast_and_is_named(ray_session, tmp_path):
    run = _run(tmp_path, "--trainer.steps", "2", "--trainer.workers", "2", "--trainer.dist-timeout-s", "120")
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"policy rank 1 of 2 \(PolicyRank, pid \d+\) died during step 1"):
        train(run, workers=_KillRank1)
    assert time.monotonic() - t0 < 90  # well before the collective's timeout


class _Kept(DPWorkers):
    """Keeps the instance, for the test to reach its actors."""

    kept: list = []

    def __init__(self, run):
        super().__init__(run)
        _Kept.kept[:] = [self]


@pytest.mark.slow
def test_a_dead_rollout_worker_of_two_ranks_is_named(ray_session, tmp_path):
    """Asynchronous W=2: the rollout worker killed while it samples step 3 stops the run naming
    it and the last checkpoint."""
    import ray

    def kill_rollout(m):
        if m["step"] == 2:  # step 3's batch is in flight on the worker
            ray.kill(_Kept.kept[0].rollout.workers[0])

    run = _run(tmp_path, "--trainer.steps", "5", *ASYNC, "--trainer.workers", "2")
    with pytest.raises(WorkerDiedError, match=r"rollout worker 0 \(RolloutWorker\) died during step 3.*step_00000002"):
        train(run, on_step=kill_rollout, workers=_Kept)


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
