"""``--rollout.backend vllm --trainer.workers W`` on CPU: the GPU plan of W ranks and their
engines (the combinations refused when the config is resolved are in
``tests/trainer/test_sharding.py``), and (slow) 2-step runs with two ranks and two fake vLLM
engines on a Ray cluster that declares (fake) GPUs: colocated (2 GPUs, packed-weights push) and
separate (4 GPUs, the NCCL broadcast from rank 0 through a fake sender).

CUDA is unavailable here, so the ranks still compute on the CPU (gloo) although Ray gives each a
GPU; what is checked is the wiring: bundles, GPU shares, the engines as rollout workers and the
rank-0 weights reaching every engine after every update.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config
from skyrl_fn.distributed.devices import gpu_plan
from skyrl_fn.distributed.placement import actor_options
from skyrl_fn.trainer.run import resolve

ROOT = Path(__file__).resolve().parents[2]
VLLM_W2 = ["--rollout.backend", "vllm", "--trainer.workers", "2", "--gpu.num-gpus", "2"]


class _FakePG:
    id = "fake"


def test_two_ranks_with_vllm_get_one_gpu_bundle_each_beside_an_engine():
    # PPO with a KL loss: the ranks hold the reference and the critic, so they take their GPU shares
    run = resolve(parse_config(VLLM_W2 + ["--algorithm.advantage-estimator", "gae", "--algorithm.use-kl-loss"], DEFAULT_TABLE), DEFAULT_TABLE)
    plan = gpu_plan(run)
    assert plan.bundles == ({"GPU": 1.0, "CPU": 1.0},) * 2 and plan.colocate
    ranks, engines = plan.of("policy"), plan.of("rollout")
    assert [(s.index, s.bundle) for s in ranks] == [(0, 0), (1, 1)] and [e.bundle for e in engines] == [0, 1]
    assert plan.of("reference") == plan.of("critic") == ()
    assert all(s.num_gpus == pytest.approx(0.8) for s in ranks) and all(e.num_gpus == pytest.approx(0.2) for e in engines)
    assert all(load == pytest.approx(1.0) for load in plan.gpu_load())
    pg = _FakePG()
    for slot in ranks + engines:
        opts = actor_options(slot, pg)
        assert opts["num_gpus"] > 0 and opts["scheduling_strategy"].placement_group_bundle_index == slot.bundle


def test_the_launcher_refuses_a_layout_the_gpus_cannot_hold_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import skyrl_fn.models.model as model
    import skyrl_fn.rollout.vllm_backend as vb
    from skyrl_fn.cli import EXIT_USAGE, main
    from tests.fake_vllm import module

    monkeypatch.setitem(sys.modules, "vllm", module())
    monkeypatch.setattr(vb, "vllm_unavailable_reason", lambda: None)  # as on a GPU machine with vLLM

    def no_model(*a, **k):
        raise AssertionError("a model was built before the GPU plan was checked")

    monkeypatch.setattr(model, "load_model", no_model)
    monkeypatch.setattr(model, "build_tiny_model", no_model)
    with pytest.raises(SystemExit) as exc:  # 3 GPUs cannot hold colocated engines of 2 GPUs each
        main(VLLM_W2[:-1] + ["3", "--rollout.tensor-parallel-size", "2", "--logging.run-dir", str(tmp_path)])
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "gpu.num_gpus: expected a multiple of rollout.tensor_parallel_size=2 when colocated, got 3" in err and "Traceback" not in err


# -- on Ray, in a subprocess: its own cluster with fake GPUs and the fake vllm in every worker --


def _where(actor) -> dict:
    """Where a rank or rollout worker runs (called inside the actor with ``__ray_call__``)."""
    import ray
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else None
    ctx = ray.get_runtime_context()
    return {"gpus": [str(g) for g in ray.get_gpu_ids()], "resources": dict(ctx.get_assigned_resources()), "pg": ctx.get_placement_group_id(),
            "device": str(actor.device), "backend": backend}


#: layout -> (flags, GPUs, the ranks' and the engines' GPU share); 2 ranks and 2 engines in both
LAYOUTS = {
    "colocated": ({"num_gpus": 2}, 2, 0.4, 0.2),
    "separate": ({"num_gpus": 4, "colocate": False, "trainer_gpus": 2}, 4, 0.6, 1.0),
}


def _ray_run(out: str, layout: str) -> None:
    """Two steps with ``W = 2`` and two fake engines; writes what the test checks to ``out``."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config
    from fake_vllm import install

    from skyrl_fn.distributed.dp import DPWorkers
    from skyrl_fn.trainer.loop import train

    gpu, gpus = LAYOUTS[layout][:2]
    log = tempfile.mkdtemp(prefix="fake_vllm_")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": gpus, "num_gpus": gpus})  # 1 CPU per GPU bundle
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "FAKE_VLLM_LOG": log, "RAY_AUTH_MODE": "disabled"}
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"worker_process_setup_hook": "fake_vllm.install", "env_vars": env})
    install()  # the driver's check that vLLM can run here
    cfg = tiny_config(tempfile.mkdtemp(), rollout={"backend": "vllm"}, trainer={"steps": 2, "workers": 2}, gpu=gpu)
    seen: dict = {}

    def workers(run):
        dp = DPWorkers(run)
        seen["pg"] = dp.pg.id.hex()
        seen["ranks"] = ray.get([a.__ray_call__.remote(_where) for a in dp.ranks])
        seen["engines"] = ray.get([a.__ray_call__.remote(_where) for a in dp.rollout.workers])
        return dp

    history = []
    train(resolve(cfg, DEFAULT_TABLE), on_step=history.append, workers=workers)
    calls = collections.defaultdict(list)
    for name in os.listdir(log):
        with open(os.path.join(log, name)) as f:
            calls[name] = [json.loads(line) for line in f]
    with open(out, "w") as f:
        json.dump({"seen": seen, "steps": [m["step"] for m in history], "calls": calls}, f)
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_train_with_two_fake_engines_on_fake_gpus(tmp_path, layout):
    out = tmp_path / "out.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    code = f"from tests.distributed.test_dp_vllm import _ray_run; _ray_run({str(out)!r}, {layout!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["steps"] == [1, 2]
    _, _, rank_share, engine_share = LAYOUTS[layout]
    pg, ranks, engines = got["seen"]["pg"], got["seen"]["ranks"], got["seen"]["engines"]
    # each rank in the plan's group with its GPU share, on its own GPU (one bundle = one GPU); no
    # CUDA here, so the group is gloo on the CPU
    for where in ranks:
        assert where["pg"] == pg and where["resources"]["GPU"] == pytest.approx(rank_share) and len(where["gpus"]) == 1
        assert where["device"] == "cpu" and where["backend"] == "gloo"
    assert ranks[0]["gpus"] != ranks[1]["gpus"]
    for e, where in enumerate(engines):
        assert where["pg"] == pg and where["resources"]["GPU"] == pytest.approx(engine_share) and len(where["gpus"]) == 1
        # colocated: engine e on rank e's bundle, sharing its GPU; separate: on a GPU of its own
        assert (where["gpus"] == ranks[e]["gpus"]) == (layout == "colocated")
    assert engines[0]["gpus"] != engines[1]["gpus"]
    calls = list(got["calls"].values())
    engine_calls = [c for c in calls if any(x["call"] == "generate" for x in c)]
    assert len(engine_calls) == 2
    if layout == "colocated":  # each engine samples every step and loads rank 0's packed weights after each update
        loads = []
        for c in engine_calls:
            assert [x["call"] for x in c if x["call"] != "load"] == ["generate", "reset_prefix_cache"] * 2
            loads.append([x["sha256"] for x in c if x["call"] == "load"])
        assert loads[0] == loads[1] and len(set(loads[0])) == len(loads[0]) >= 2  # the same weights, new each step
    else:  # rank 0 alone joins the NCCL group (world: itself + 2 engines) and sends after each update
        senders = [c for c in calls if any(x["call"] == "init_sender" for x in c)]
        assert len(senders) == 1 and [x["call"] for x in senders[0]] == ["init_sender", "send", "send"]
        assert senders[0][0]["world"] == 3 and senders[0][1]["sha256"] != senders[0][2]["sha256"]
        offsets = []
        for c in engine_calls:
            assert [x["call"] for x in c] == ["skyrl_init_broadcast"] + ["generate", "skyrl_receive_buckets", "reset_prefix_cache"] * 2
            offsets.append(c[0]["args"][2:])
        assert sorted(offsets) == [[1, 3], [2, 3]]  # (rank offset, world size) of each engine
