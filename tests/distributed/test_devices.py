"""GPU wiring of the launcher, checked on CPU: the plan a config chooses, actor options with a fake
placement group, device selection, moving records, the config's gpu group and the CUDA hooks."""

from __future__ import annotations

import dataclasses
import typing

import attrs
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.ops.kernels import COMPILE_MODES
from skyrl_fn.distributed.placement import actor_options
from skyrl_fn.cli import parse_config
from skyrl_fn.distributed.devices import actor_device, gpu_plan, select_device, to_device, uses_gpus
from skyrl_fn.trainer.config import (
    AlgorithmConfig,
    GPUPlacementConfig,
    TeacherConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from skyrl_fn.rollout.base import RolloutConfig
from skyrl_fn.trainer.run import resolve


def _vllm(**kw) -> TrainConfig:
    return TrainConfig(rollout=RolloutConfig(backend="vllm", tensor_parallel_size=kw.pop("tp", 1)), **kw)


# -- the plan a config chooses ----------------------------------------------------------------


def test_cpu_default_has_no_plan():
    assert not uses_gpus(TrainConfig()) and gpu_plan(resolve(TrainConfig(), DEFAULT_TABLE)) is None


def test_colocated_plan_places_every_model_the_run_needs():
    cfg = _vllm(algorithm=AlgorithmConfig(advantage_estimator="gae", use_kl_loss=True), gpu=GPUPlacementConfig(num_gpus=2))
    plan = gpu_plan(resolve(cfg, DEFAULT_TABLE))
    assert plan.colocate and len(plan.bundles) == 2 and plan.num_engines == 2
    assert [s.role for s in plan.slots].count("reference") == 1 and [s.role for s in plan.slots].count("critic") == 1
    assert all(load <= 1.0 + 1e-9 for load in plan.gpu_load())
    assert gpu_plan(resolve(_vllm(gpu=GPUPlacementConfig(num_gpus=2)), DEFAULT_TABLE)).of("critic") == ()


def test_a_distillation_teacher_has_a_slot_in_the_plan():
    """RayWorkers starts the teacher actor from ``plan.of("teacher")[0]`` (it raised IndexError
    when the plan had no teacher slot)."""
    cfg = _vllm(teacher=TeacherConfig(model="tiny"), gpu=GPUPlacementConfig(num_gpus=1))
    plan = gpu_plan(resolve(cfg, DEFAULT_TABLE))
    assert len(plan.of("teacher")) == 1 and plan.gpu_load() == pytest.approx((0.8,))


def test_separate_plan_and_tensor_parallel_engines():
    plan = gpu_plan(resolve(_vllm(tp=2, gpu=GPUPlacementConfig(num_gpus=5, colocate=False, trainer_gpus=1)), DEFAULT_TABLE))
    assert not plan.colocate and plan.num_engines == 2
    assert [s.engine_bundles for s in plan.of("rollout")] == [(1, 2), (3, 4)]
    assert plan.of("policy")[0].bundle == 0
    with pytest.raises(ValueError, match="trainer_gpus"):
        gpu_plan(resolve(_vllm(gpu=GPUPlacementConfig(num_gpus=1, colocate=False)), DEFAULT_TABLE))


class _FakePG:
    """Stands in for a Ray ``PlacementGroup`` (only stored by the scheduling strategy)."""

    id = "fake"


def test_actor_options_with_a_fake_placement_group():
    plan = gpu_plan(resolve(_vllm(tp=2, gpu=GPUPlacementConfig(num_gpus=4, colocate=False, trainer_gpus=2)), DEFAULT_TABLE))
    pg = _FakePG()
    for slot in plan.slots:
        opts = actor_options(slot, pg)
        assert opts["num_gpus"] == slot.num_gpus and opts["num_cpus"] == slot.num_cpus
        strategy = opts["scheduling_strategy"]
        assert strategy.placement_group is pg and strategy.placement_group_bundle_index == slot.bundle
    (engine,) = plan.of("rollout")
    assert actor_options(engine)["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"] == "2,3"


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_ids", "cuda", "expected"),
    [([], False, "cpu"), ([0], False, "cpu"), ([], True, "cpu"), ([0], True, "cuda"), (["1"], True, "cuda")],
)
def test_select_device(gpu_ids, cuda, expected):
    assert select_device(gpu_ids=gpu_ids, cuda_available=cuda) == expected


def test_actor_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert actor_device() == "cpu"


@attrs.frozen(kw_only=True, eq=False)
class _Rec:
    a: torch.Tensor
    b: torch.Tensor | None = None
    name: str = "x"


def test_to_device_returns_the_same_objects_on_cpu():
    rec = _Rec(a=torch.ones(2), b=torch.zeros(2, 3))
    state = {"w": torch.ones(3), "nested": [torch.ones(1), 3], "opt": {"step": 1}}
    assert to_device(rec, "cpu") is rec
    assert to_device(state, "cpu") is state
    pair = (rec, None, torch.ones(1))
    assert to_device(pair, "cpu") is pair


def test_to_device_moves_every_tensor():
    rec = _Rec(a=torch.ones(2), b=None)
    moved = to_device({"r": rec, "t": (torch.ones(1), 2)}, "meta")
    assert moved["r"].a.device.type == "meta" and moved["r"].b is None and moved["r"].name == "x"
    assert moved["t"][0].device.type == "meta" and moved["t"][1] == 2 and isinstance(moved["t"], tuple)
    assert rec.a.device.type == "cpu"  # the input is not changed


# -- the config --------------------------------------------------------------------------------


def test_train_config_has_the_gpu_group_and_compile_mode():
    cfg = TrainConfig()
    assert cfg.gpu == GPUPlacementConfig() and cfg.algorithm.compile_mode == "max-autotune-no-cudagraphs"
    modes = typing.get_args(next(f.type for f in dataclasses.fields(AlgorithmConfig) if f.name == "compile_mode"))
    if not modes:  # postponed annotations: resolve the string
        modes = typing.get_args(typing.get_type_hints(AlgorithmConfig)["compile_mode"])
    assert tuple(modes) == COMPILE_MODES
    assert config_from_dict(config_to_dict(_vllm(gpu=GPUPlacementConfig(num_gpus=3)))).gpu.num_gpus == 3


def test_gpu_flags_parse_and_are_in_help(capsys):
    cfg = parse_config(
        ["--gpu.num-gpus", "4", "--gpu.no-colocate", "--gpu.trainer-gpus", "2", "--algorithm.compile-mode", "default"],
        DEFAULT_TABLE,
    )
    assert cfg.gpu == GPUPlacementConfig(num_gpus=4, colocate=False, trainer_gpus=2)
    assert cfg.algorithm.compile_mode == "default"
    with pytest.raises(SystemExit):
        parse_config(["--help"], DEFAULT_TABLE)
    out = capsys.readouterr().out
    assert "--gpu.num-gpus" in out and "--gpu.colocate" in out and "--algorithm.compile-mode" in out


# -- the CUDA hooks, seen from CPU -------------------------------------------------------------


def test_loss_kernel_on_cuda_uses_the_gpu_compiler(monkeypatch):
    import skyrl_fn.trainer.learner as learner
    from skyrl_fn.trainer.learner import loss_kernel

    calls = []
    monkeypatch.setattr(learner, "compile_kernel", lambda k, *, mode, device_type: calls.append((mode, device_type)) or k)
    run = resolve(TrainConfig(algorithm=AlgorithmConfig(compile=True, compile_mode="max-autotune")), DEFAULT_TABLE)
    loss_kernel(run, device_type="cuda")
    assert calls == [("max-autotune", "cuda")]
    eager = loss_kernel(resolve(TrainConfig(), DEFAULT_TABLE))  # CPU, no compile: untouched
    assert calls == [("max-autotune", "cuda")] and callable(eager)


def test_vllm_unavailable_message_names_the_hardware(monkeypatch):
    from skyrl_fn.rollout.base import BackendUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="compute capability") as exc:
        resolve(TrainConfig(rollout=RolloutConfig(backend="vllm")), DEFAULT_TABLE).check_backend_available()
    assert "pip install -e '.[vllm]'" in str(exc.value) and "--rollout.backend hf" in str(exc.value)


def test_make_backend_forwards_seed_and_layout_to_vllm(monkeypatch):
    import skyrl_fn.rollout.vllm_backend as vb

    seen = {}
    monkeypatch.setattr(vb, "make_vllm_backend", lambda cfg, model, tok, *, seed, colocated: seen.update(seed=seed, colocated=colocated) or "engine")
    run = resolve(TrainConfig(rollout=RolloutConfig(backend="vllm")), DEFAULT_TABLE)
    assert run.make_backend(None, None, seed=7, colocated=False) == "engine"
    assert seen == {"seed": 7, "colocated": False}
