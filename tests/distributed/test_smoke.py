"""The GPU smoke test's pure parts (model shape, configs, pass/fail rules) and its plumbing on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.distributed.smoke import SMOKE_MODEL, attention_backends, compare_log_probs, followed_the_policy, head_dim, smoke_config
from skyrl_fn.rollout.vllm_backend import vllm_unavailable_reason
from skyrl_fn.distributed.devices import gpu_plan
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.trainer.run import resolve

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_model_suits_every_common_attention_backend_and_the_default_does_not():
    assert head_dim(SMOKE_MODEL) == 128 and SMOKE_MODEL.dtype == "bf16"
    assert attention_backends(128, "bf16") == ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION")
    default = ModelConfig()
    assert attention_backends(head_dim(default), default.dtype) == ("FLEX_ATTENTION",)  # head dim 16, fp32
    assert attention_backends(40, "bf16") == ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION")
    assert attention_backends(128, "fp32") == ("TRITON_ATTN", "FLEX_ATTENTION")
    with pytest.raises(ValueError, match="hidden_size"):
        head_dim(ModelConfig(hidden_size=30, num_heads=4))


@pytest.mark.parametrize("colocate,gpus", [(True, 1), (False, 2)])
def test_smoke_configs_resolve_and_place(colocate, gpus):
    cfg = smoke_config(colocate=colocate, num_gpus=gpus, steps=2)
    run = resolve(cfg, DEFAULT_TABLE)
    assert run.uses_reference and cfg.rollout.backend == "vllm"
    plan = gpu_plan(run)
    assert plan.colocate is colocate and plan.num_engines == 1
    with pytest.raises(ValueError, match="backend"):
        smoke_config(colocate=True, num_gpus=1, backend="sglang")


def test_followed_the_policy_needs_agreement_and_movement():
    mask = torch.ones(2, 3, dtype=torch.bool)
    cur = torch.full((2, 3), -1.0)
    ok, d = followed_the_policy(cur + 0.01, cur, cur - 1.0, mask)
    assert ok and d["engine_vs_current"] == pytest.approx(0.01, abs=1e-6) and d["engine_vs_initial"] == pytest.approx(1.01, abs=1e-6)
    assert not followed_the_policy(cur - 1.0, cur, cur - 1.0, mask)[0]  # stale engine: still on the initial weights
    assert not followed_the_policy(cur, cur, cur + 0.001, mask)[0]  # weights barely moved: proves nothing
    with pytest.raises(ValueError, match="at least one"):
        compare_log_probs(cur, cur, torch.zeros_like(mask))


@pytest.mark.slow
@pytest.mark.skipif(vllm_unavailable_reason() is None, reason="vLLM and CUDA are available here")
def test_script_without_a_gpu_skips_with_the_install_hint_or_fails_when_strict():
    def run(*flags):
        return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), *flags], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})

    out = run()
    assert out.returncode == 0  # `make bench` runs every bench script, also on CPU
    assert "SKIP  env" in out.stdout and "pip install -e '.[vllm]'" in out.stdout and "0 failed" in out.stdout
    strict = run("--strict")
    assert strict.returncode == 1 and "FAIL  env" in strict.stdout and "1 failed" in strict.stdout


@pytest.mark.slow
def test_script_plumbing_on_cpu_with_the_hf_backend():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--cpu-plumbing", "--steps", "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert out.stdout.count("PASS") == 6 and "engine samples with the trained weights" in out.stdout
