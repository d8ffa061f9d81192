"""The vLLM backend without vLLM: the clear exit, the pure parameter/record builders, and the
engine glue (sleep/wake, weight loading) driven by a fake ``vllm`` module."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

import skyrl_fn.rollout.vllm_backend as vb
from skyrl_fn.rollout.vllm_backend import engine_kwargs, outputs_to_batch, sampling_params_kwargs, vllm_unavailable_reason
from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.models.model import DIGITS_ALPHABET, ModelConfig, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import BackendUnavailableError, RolloutConfig
from skyrl_fn.trainer.run import resolve
from tests.fake_vllm import FakeLLM, completion
from tests.fake_vllm import module as fake_vllm_module

ROOT = Path(__file__).resolve().parents[2]
NO_VLLM = vllm_unavailable_reason()
needs_no_vllm = pytest.mark.skipif(NO_VLLM is None, reason="vLLM and CUDA are available here")


# -- the exit without vLLM/CUDA ----------------------------------------------------------------


@needs_no_vllm
def test_reason_says_what_is_missing_how_to_install_and_what_hardware():
    for part in ("pip install -e '.[vllm]'", "NVIDIA GPU", "compute capability", "--rollout.backend hf"):
        assert part in NO_VLLM, part
    assert ("vllm package is not installed" in NO_VLLM) == (__import__("importlib").util.find_spec("vllm") is None)


@needs_no_vllm
def test_make_backend_vllm_raises_before_building_an_engine():
    tok = build_tokenizer(DIGITS_ALPHABET)
    with pytest.raises(BackendUnavailableError, match=r"skyrl_fn\[vllm\]|\[vllm\]"):
        vb.vllm_backend(None, tok, RolloutConfig(backend="vllm"))


@needs_no_vllm
def test_cli_exits_2_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import skyrl_fn.models.model as model
    from skyrl_fn.cli import EXIT_USAGE, main

    def no_model(*a, **k):
        raise AssertionError("a model was built before the backend was checked")

    monkeypatch.setattr(model, "load_model", no_model)
    monkeypatch.setattr(model, "build_tiny_model", no_model)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--rollout.backend", "vllm", "--ray.no-use-ray", "--logging.run-dir", str(run_dir)])
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "vllm" in err and "[vllm]" in err and "CUDA" in err and "Traceback" not in err
    assert not (run_dir / "metrics.jsonl").exists()


@needs_no_vllm
@pytest.mark.skipif(not (ROOT / "launch" / "train.py").exists(), reason="launch/train.py not present")
def test_train_script_exits_2_with_the_install_hint(monkeypatch, capsys, tmp_path):
    """The script users run, run as ``__main__`` in this process (a fresh interpreter would cost ~5 s
    of CPU importing torch): exit 2 with the hint, and no ``vllm`` module imported on the way."""
    import runpy

    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["launch/train.py", "--rollout.backend", "vllm", "--ray.no-use-ray", "--logging.run-dir", str(run_dir)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path("launch/train.py", run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "[vllm]" in err and "CUDA" in err and "Traceback" not in err, err[-2000:]
    assert not any(n == "vllm" or n.startswith("vllm.") for n in sys.modules), "the script imported vllm"
    assert not (run_dir / "metrics.jsonl").exists()


def test_vllm_is_imported_only_inside_functions():
    """No module of skyrl_fn imports vllm at module level (so every module imports on CPU)."""
    import ast

    paths = sorted((ROOT / "skyrl_fn").rglob("*.py"))
    assert any(p.name == "vllm_backend.py" for p in paths)  # the vLLM backend is among them
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "vllm" or n.startswith("vllm.") for n in names), f"{path.name}: top-level {names}"


# -- pure builders -------------------------------------------------------------------------------


def test_sampling_params_come_from_the_config():
    cfg = RolloutConfig(samples_per_prompt=4, max_new_tokens=32, temperature=0.8, top_p=0.95)
    kw = sampling_params_kwargs(cfg, seed=2**64 + 3, eos_token_id=2)
    assert kw["n"] == 4 and kw["max_tokens"] == 32 and kw["temperature"] == 0.8 and kw["top_p"] == 0.95
    assert kw["logprobs"] == 0 and kw["stop_token_ids"] == [2] and 0 <= kw["seed"] < 2**63
    for bad in (0.0, 0.005, 2.5):  # vLLM rejects > 2 and raises < 0.01 to 0.01
        with pytest.raises(ValueError, match=r"rollout.temperature: expected in \[0.01, 2.0\]"):
            sampling_params_kwargs(RolloutConfig(temperature=bad), seed=0)
    assert sampling_params_kwargs(RolloutConfig(temperature=2.0), seed=0)["temperature"] == 2.0
    with pytest.raises(ValueError, match="rollout.top_p"):
        sampling_params_kwargs(RolloutConfig(top_p=1.5), seed=0)
    with pytest.raises(TypeError, match="RolloutConfig"):
        sampling_params_kwargs({"n": 1}, seed=0)


def test_config_rejects_temperatures_vllm_would_change_or_refuse():
    from skyrl_fn import DEFAULT_TABLE
    from skyrl_fn.trainer.config import GPUPlacementConfig, TrainConfig
    from skyrl_fn.trainer.run import resolve

    def cfg(backend, temperature, **gpu):
        return TrainConfig(rollout=RolloutConfig(backend=backend, temperature=temperature), gpu=GPUPlacementConfig(**gpu))

    for bad in (2.5, 0.005):
        with pytest.raises(ValueError, match=r"rollout.temperature: expected in \[0.01, 2.0\] with rollout.backend 'vllm'.*--rollout.backend hf"):
            resolve(cfg("vllm", bad), DEFAULT_TABLE)
    assert resolve(cfg("vllm", 2.0), DEFAULT_TABLE).config.rollout.temperature == 2.0
    assert resolve(cfg("hf", 2.5), DEFAULT_TABLE).config.rollout.temperature == 2.5  # the hf backend samples any
    with pytest.raises(ValueError, match="gpu.sync_timeout_s"):
        resolve(cfg("hf", 1.0, sync_timeout_s=0.0), DEFAULT_TABLE)


def test_engine_kwargs_come_from_the_config():
    cfg = RolloutConfig(tensor_parallel_size=2, gpu_memory_utilization=0.45)
    kw = engine_kwargs(cfg, "/models/qwen", dtype="bfloat16", seed=7, colocated=True)
    assert kw["model"] == kw["tokenizer"] == "/models/qwen"
    assert kw["tensor_parallel_size"] == 2 and kw["gpu_memory_utilization"] == 0.45
    assert kw["enable_sleep_mode"] is True and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["worker_extension_cls"] == "skyrl_fn.rollout.weight_sync.WeightSyncExtension"
    assert kw["distributed_executor_backend"] == "ray"
    one = engine_kwargs(RolloutConfig(), "/m", colocated=False)
    assert one["enable_sleep_mode"] is False and "distributed_executor_backend" not in one
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        engine_kwargs(RolloutConfig(gpu_memory_utilization=1.5), "/m")


def test_outputs_to_batch_pads_masks_and_orders_samples():
    pad, eos = 0, 2
    outs = [
        types.SimpleNamespace(outputs=[completion(1, [7, eos], [-0.5, -0.1], "b"), completion(0, [5, 6, 7], [-1.0, -2.0, -3.0], "a")]),
        types.SimpleNamespace(outputs=[completion(0, [eos], [-0.2], ""), completion(1, [9], [-0.3], "c")]),
    ]
    batch = outputs_to_batch(("p0", "p1"), [[4, 5, 6], [8]], outs, samples_per_prompt=2, pad_token_id=pad)
    assert batch.response_ids.tolist() == [[5, 6, 7], [7, eos, pad], [eos, pad, pad], [9, pad, pad]]
    assert batch.response_mask.sum(-1).tolist() == [3, 2, 1, 1]
    assert batch.rollout_log_probs[1].tolist() == pytest.approx([-0.5, -0.1, 0.0])
    assert batch.prompt_ids.tolist() == [[4, 5, 6], [4, 5, 6], [pad, pad, 8], [pad, pad, 8]]
    assert batch.prompt_mask[2].tolist() == [False, False, True]
    assert batch.group_ids.tolist() == [0, 0, 1, 1] and batch.responses == ("a", "b", "", "c")
    decoded = outputs_to_batch(("p0", "p1"), [[4, 5, 6], [8]], outs, samples_per_prompt=2, pad_token_id=pad,
                               decode=lambda ids: str(len(ids)))
    assert decoded.responses == ("3", "2", "1", "1")


def test_outputs_to_batch_rejects_inconsistent_outputs():
    good = types.SimpleNamespace(outputs=[completion(0, [1], [-0.1])])
    with pytest.raises(ValueError, match="expected 2 completions"):
        outputs_to_batch(("p",), [[3]], [good], samples_per_prompt=2, pad_token_id=0)
    with pytest.raises(ValueError, match="P"):
        outputs_to_batch(("p", "q"), [[3]], [good], samples_per_prompt=1, pad_token_id=0)
    no_lp = types.SimpleNamespace(outputs=[types.SimpleNamespace(index=0, token_ids=[1, 2], logprobs=None, text="")])
    with pytest.raises(ValueError, match="logprobs=0"):
        outputs_to_batch(("p",), [[3]], [no_lp], samples_per_prompt=1, pad_token_id=0)
    empty = types.SimpleNamespace(outputs=[completion(0, [], [])])
    with pytest.raises(ValueError, match="at least one generated token"):
        outputs_to_batch(("p",), [[3]], [empty], samples_per_prompt=1, pad_token_id=0)


# -- the engine glue, with a fake vllm module ------------------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = fake_vllm_module()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vb, "vllm_unavailable_reason", lambda: None)
    FakeLLM.instances.clear()
    return fake


@pytest.fixture
def tiny():
    tok = build_tokenizer(DIGITS_ALPHABET)
    return build_tiny_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok), tok


def test_colocated_engine_wakes_for_rollouts_and_sleeps_after(fake_vllm, tiny):
    model, tok = tiny
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=3), model, tok, seed=5, colocated=True)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["dtype"] == "float32"
    assert os.path.isfile(os.path.join(llm.kwargs["model"], "config.json"))  # the tiny model was saved for vLLM
    assert llm.calls == [("sleep", 1)]  # asleep at once: the trainer side starts after the engines
    llm.calls.clear()
    batch = backend.generate(["n:1>", "c:23>"], seed=11)
    assert batch.batch_size == 6 and batch.response_mask.all()
    assert [c[0] for c in llm.calls] == ["wake_up", "generate", "sleep"]
    assert llm.calls[0] == ("wake_up", ("weights", "kv_cache"))
    llm.calls.clear()
    backend.sync_weights(model.state_dict())
    assert llm.calls[0] == ("wake_up", ("weights",))  # only the weights come back for loading
    sent = [n for c in llm.calls if c[0] == "rpc" for n in c[2]]
    assert all(c[1] == "skyrl_load_weights" for c in llm.calls if c[0] == "rpc")
    assert "lm_head.weight" not in sent and set(sent) == set(model.state_dict()) - {"lm_head.weight"}
    assert llm.calls[-1] == ("reset_prefix_cache",)
    llm.calls.clear()
    backend.generate(["n:1>"], seed=12)
    assert llm.calls[0] == ("wake_up", ("kv_cache",)) and llm.calls[1][0] == "generate" and llm.calls[-1][0] == "sleep"


def test_separate_engine_never_sleeps(fake_vllm, tiny):
    model, tok = tiny
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=2), model, tok, colocated=False)
    llm = FakeLLM.instances[-1]
    backend.generate(["n:1>"], seed=0)
    backend.sync_weights(model.state_dict())
    assert not any(c[0] in ("sleep", "wake_up") for c in llm.calls)
    assert llm.kwargs["enable_sleep_mode"] is False


def test_broadcast_path_joins_the_group_and_receives_the_plan_as_plain_data(fake_vllm, tiny):
    from skyrl_fn.rollout.buckets import plan_buckets, plan_from_wire, specs_of

    model, tok = tiny
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=2), model, tok, colocated=True)
    llm = FakeLLM.instances[-1]
    backend.generate(["n:1>"], seed=0)  # now asleep
    llm.calls.clear()
    backend.init_broadcast("10.0.0.1", 29500, 1, 2)
    plan = plan_buckets(specs_of(model.state_dict()), bucket_bytes=4096)
    backend.receive_broadcast(plan)
    assert llm.calls[0] == ("rpc", "skyrl_init_broadcast", ("10.0.0.1", 29500, 1, 2))
    assert llm.calls[1] == ("wake_up", ("weights",))
    (wire,) = llm.calls[2][2]
    assert llm.calls[2][1] == "skyrl_receive_buckets" and plan_from_wire(wire) == plan
    assert llm.calls[-1] == ("reset_prefix_cache",)


def test_make_backend_dispatches_to_vllm(fake_vllm, tiny, monkeypatch):
    import skyrl_fn.rollout.base as rollout

    model, tok = tiny
    run = resolve(TrainConfig(rollout=RolloutConfig(backend="vllm", samples_per_prompt=2)), DEFAULT_TABLE)
    backend = run.make_backend(model, tok)
    assert isinstance(backend, vb.VLLMBackend) and isinstance(backend, rollout.RolloutBackend)


# -- the [vllm] extra --------------------------------------------------------------------------


def test_vllm_extra_is_bounded_and_compatible_with_the_base_pins():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (extra,) = [Requirement(r) for r in project["optional-dependencies"]["vllm"]]
    assert extra.name == "vllm"
    assert Version("0.33.0") in extra.specifier and Version("0.34.0") not in extra.specifier
    assert Version("0.10.0") not in extra.specifier  # too old for logprobs_mode
    base = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    # vLLM 0.33.0's own pins (from its wheel metadata): torch==2.14.0, transformers>=5.16.1,<5.21.
    assert Version("2.14.0") in base["torch"]
    assert any(Version(v) in base["transformers"] for v in ("5.16.1", "5.20.0"))


def test_outputs_to_batch_marks_responses_cut_at_max_tokens():
    outs = [types.SimpleNamespace(outputs=[completion(0, [5, 6], [-1.0, -1.0]), completion(1, [5, 2], [-1.0, -1.0])])]
    outs[0].outputs[0].finish_reason, outs[0].outputs[1].finish_reason = "length", "stop"
    batch = outputs_to_batch(("p",), [[4]], outs, samples_per_prompt=2, pad_token_id=0)
    assert batch.truncated.tolist() == [True, False]  # read by overlong_filter / overlong_penalty
