"""Placement-group plans from a config (pure), and the Ray options they turn into."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from skyrl_fn.distributed.placement import GPUPlacementConfig, actor_options, plan_placement


def test_one_gpu_colocated_puts_everything_on_bundle_0():
    plan = plan_placement(GPUPlacementConfig(num_gpus=1), uses_reference=True, uses_critic=True)
    assert plan.bundles == ({"GPU": 1.0, "CPU": 1.0},) and plan.strategy == "PACK" and plan.colocate
    assert {s.role for s in plan.slots} == {"policy", "reference", "critic", "rollout"}
    assert all(s.bundle == 0 for s in plan.slots)
    assert plan.gpu_load() == pytest.approx((1.0,))
    assert plan.num_engines == 1 and plan.of("rollout")[0].env == {}


def test_a_teacher_gets_a_slot_beside_the_reference_and_shares_its_gpu_budget():
    """RayWorkers starts a teacher actor from the plan's teacher slot (W = 1); with a reference
    the two frozen scorers split the reference's share, so the bundle still sums to 1."""
    plan = plan_placement(GPUPlacementConfig(num_gpus=1), uses_reference=True, uses_critic=True, uses_teacher=True)
    (teacher,) = plan.of("teacher")
    assert teacher.bundle == 0 and teacher.num_gpus == pytest.approx(plan.of("reference")[0].num_gpus) == pytest.approx(0.1)
    assert plan.gpu_load() == pytest.approx((1.0,))
    alone = plan_placement(GPUPlacementConfig(num_gpus=2, colocate=False), uses_teacher=True)
    assert alone.of("teacher")[0].num_gpus == pytest.approx(0.2) and max(alone.gpu_load()) <= 1.0 + 1e-9
    # W > 1: the ranks hold the teacher's shards; its share joins each rank's
    ranks = plan_placement(GPUPlacementConfig(num_gpus=2), uses_teacher=True, trainer_workers=2)
    assert ranks.of("teacher") == () and all(s.num_gpus == pytest.approx(0.6) for s in ranks.of("policy"))


def test_colocated_tp2_engines_span_bundle_pairs_with_vllm_env():
    plan = plan_placement(GPUPlacementConfig(num_gpus=4), tensor_parallel_size=2)
    engines = plan.of("rollout")
    assert [e.engine_bundles for e in engines] == [(0, 1), (2, 3)]
    assert all(e.num_gpus == 0.0 for e in engines)
    assert engines[1].env == {"VLLM_RAY_PER_WORKER_GPUS": "0.2", "VLLM_RAY_BUNDLE_INDICES": "2,3"}
    assert max(plan.gpu_load()) <= 1.0 + 1e-9


def test_separate_layout_gives_engines_their_own_gpus():
    plan = plan_placement(GPUPlacementConfig(num_gpus=8, colocate=False, trainer_gpus=2),
                          tensor_parallel_size=2, uses_reference=True, trainer_workers=2)
    assert [s.bundle for s in plan.of("policy")] == [0, 1]
    assert [e.engine_bundles for e in plan.of("rollout")] == [(2, 3), (4, 5), (6, 7)]
    assert plan.of("rollout")[0].env["VLLM_RAY_PER_WORKER_GPUS"] == "1.0"
    load = plan.gpu_load()
    assert load[2:] == pytest.approx((1.0,) * 6)
    # No trainer-side actor shares an engine GPU.
    assert all(s.bundle < 2 for s in plan.slots if s.role != "rollout")


def test_separate_tp1_engine_takes_a_whole_gpu():
    plan = plan_placement(GPUPlacementConfig(num_gpus=2, colocate=False))
    (engine,) = plan.of("rollout")
    assert engine.bundle == 1 and engine.num_gpus == 1.0 and engine.env == {}


@pytest.mark.parametrize(
    "gpu, tp, match",
    [
        (GPUPlacementConfig(num_gpus=3), 2, "multiple of rollout.tensor_parallel_size"),
        (GPUPlacementConfig(num_gpus=2, colocate=False, trainer_gpus=2), 1, "engines need their own GPUs"),
        (GPUPlacementConfig(num_gpus=0), 1, "gpu.num_gpus"),
        (GPUPlacementConfig(num_gpus=1, cpus_per_bundle=0), 1, "cpus_per_bundle"),
    ],
)
def test_impossible_layouts_are_errors_naming_the_field(gpu, tp, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(gpu, tensor_parallel_size=tp)


def test_more_trainer_workers_than_gpus_is_an_error():
    with pytest.raises(ValueError, match=r"trainer.workers: expected <= gpu.num_gpus=1 \(one GPU bundle per rank\), got 2"):
        plan_placement(GPUPlacementConfig(num_gpus=1), trainer_workers=2)


def test_there_is_no_trainer_workers_flag():
    # A flag that did nothing was removed; data-parallel ranks come with their real flag.
    from skyrl_fn.cli import parse_config
    from skyrl_fn.algorithm.builtins import DEFAULT_TABLE

    with pytest.raises(SystemExit):
        parse_config(["--gpu.trainer-workers", "2"], DEFAULT_TABLE)


@given(
    n=st.integers(1, 16), tp=st.sampled_from([1, 2, 4, 8]), colocate=st.booleans(), t=st.integers(1, 8),
    ref=st.booleans(), critic=st.booleans(), teacher=st.booleans(), w=st.integers(1, 4),
)
def test_every_valid_plan_fits_and_uses_every_engine_gpu_once(n, tp, colocate, t, ref, critic, teacher, w):
    gpu = GPUPlacementConfig(num_gpus=n, colocate=colocate, trainer_gpus=t)
    try:
        plan = plan_placement(gpu, tensor_parallel_size=tp, uses_reference=ref, uses_critic=critic, uses_teacher=teacher, trainer_workers=w)
    except ValueError:
        return
    assert len(plan.bundles) == n
    assert all(load <= 1.0 + 1e-9 for load in plan.gpu_load())
    engine_bundles = [b for e in plan.of("rollout") for b in e.engine_bundles]
    assert len(engine_bundles) == len(set(engine_bundles)) and all(0 <= b < n for b in engine_bundles)
    assert all(len(e.engine_bundles) == tp for e in plan.of("rollout"))
    assert plan.num_engines == (n // tp if colocate else (n - t) // tp) >= 1
    # W = 1: one reference / teacher / critic actor; W > 1: the ranks hold them (their GPU shares too)
    for role, used in (("reference", ref), ("teacher", teacher), ("critic", critic)):
        assert len(plan.of(role)) == int(used and w == 1), role
    assert [s.bundle for s in plan.of("policy")] == list(range(w))


def test_actor_options_without_and_with_a_group():
    plan = plan_placement(GPUPlacementConfig(num_gpus=4), tensor_parallel_size=2)
    engine = plan.of("rollout")[1]
    opts = actor_options(engine)
    assert opts == {"num_gpus": 0.0, "num_cpus": 0.25, "runtime_env": {"env_vars": dict(engine.env)}}
    pytest.importorskip("ray")
    sentinel = object()
    strategy = actor_options(engine, sentinel)["scheduling_strategy"]
    assert strategy.placement_group is sentinel and strategy.placement_group_bundle_index == 2
    assert strategy.placement_group_capture_child_tasks is True
