"""The GPU smoke test's model, configs and pass/fail rules (pure; run by ``bench/gpu_smoke.py``).

Notation: ``B`` sequences, ``T`` response tokens.

The embedded default model (hidden 64, 4 heads: head dim 16, fp32) is too small for vLLM's usual
attention kernels: read in vLLM 0.33.0's ``vllm/v1/attention/backends/``, FlashAttention takes
fp16/bf16 with a head dim that is a multiple of 8 up to 256, FlashInfer fp16/bf16 with head dim
64, 128, 256 or 512, Triton attention fp16/bf16/fp32 with head dim >= 32, and FlexAttention
anything. :data:`SMOKE_MODEL` (bf16, head dim 128) is accepted by all four, so the smoke test
exercises the kernels a real model would use.
"""

from __future__ import annotations

from typing import Mapping

import torch

from skyrl_fn.trainer.config import (
    AlgorithmConfig,
    GPUPlacementConfig,
    LoggingConfig,
    RayConfig,
    TrainConfig,
    TrainerConfig,
)
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.rollout.base import RolloutConfig

__all__ = [
    "SMOKE_MODEL", "ATTENTION_BACKENDS", "head_dim", "attention_backends", "smoke_config", "compare_log_probs",
    "followed_the_policy",
]

#: Tiny, but shaped like a real model for vLLM's kernels: bf16, head dim 256 / 2 = 128.
SMOKE_MODEL = ModelConfig(hidden_size=256, num_layers=2, num_heads=2, intermediate_size=512, dtype="bf16",
                          max_position_embeddings=128)

#: vLLM 0.33.0 attention backends: (dtypes, head-dim rule), from each backend's
#: ``supported_dtypes`` and ``supports_head_size``/``get_supported_head_sizes``.
ATTENTION_BACKENDS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "FLASH_ATTN": (("fp16", "bf16"), "multiple of 8, <= 256"),
    "FLASHINFER": (("fp16", "bf16"), "64, 128, 256 or 512"),
    "TRITON_ATTN": (("fp16", "bf16", "fp32"), ">= 32"),
    "FLEX_ATTENTION": (("fp16", "bf16", "fp32"), "any"),
}


def head_dim(model: ModelConfig) -> int:
    """``hidden_size // num_heads`` of the embedded Llama.

    Raises:
        ValueError: ``hidden_size`` is not a multiple of ``num_heads``.
    """
    if model.num_heads < 1 or model.hidden_size % model.num_heads:
        raise ValueError(f"model.hidden_size/num_heads: expected a multiple, got {model.hidden_size}/{model.num_heads}")
    return model.hidden_size // model.num_heads


def attention_backends(dim: int, dtype: str) -> tuple[str, ...]:
    """The vLLM attention backends (of :data:`ATTENTION_BACKENDS`) that accept ``dim`` and ``dtype``."""
    rules = {
        "FLASH_ATTN": dim % 8 == 0 and dim <= 256,
        "FLASHINFER": dim in (64, 128, 256, 512),
        "TRITON_ATTN": dim >= 32,
        "FLEX_ATTENTION": True,
    }
    return tuple(name for name, (dtypes, _) in ATTENTION_BACKENDS.items() if dtype in dtypes and rules[name])


def smoke_config(*, colocate: bool, num_gpus: int, steps: int = 3, run_dir: str | None = None, seed: int = 0,
                 backend: str = "vllm") -> TrainConfig:
    """A few GRPO steps of :data:`SMOKE_MODEL` on the digit task with vLLM rollouts.

    A KL loss keeps a reference model in the run (one more colocated actor), TIS uses the
    rollout log-probs; the learning rate is high so the weights visibly move in a few steps.
    ``colocate=False`` puts one trainer GPU and ``num_gpus - 1`` engines apart (NCCL sync).
    ``backend="hf"`` (one separate CPU rollout worker, the ``--gpu.*`` part unused) only checks
    the smoke script's own plumbing on a machine without a GPU.
    """
    if backend not in ("vllm", "hf"):
        raise ValueError(f"backend: expected 'vllm' or 'hf', got {backend!r}")
    return TrainConfig(
        algorithm=AlgorithmConfig(use_kl_loss=True, off_policy_correction="tis"),
        model=SMOKE_MODEL,
        rollout=RolloutConfig(backend=backend, samples_per_prompt=4, max_new_tokens=8, gpu_memory_utilization=0.3),
        ray=RayConfig(rollout_workers=1 if backend == "hf" else 0),
        trainer=TrainerConfig(steps=steps, prompts_per_step=8, micro_batch_size=32, lr=1e-3, warmup_steps=0, seed=seed,
                              ckpt_interval=0),
        gpu=GPUPlacementConfig(num_gpus=num_gpus, colocate=colocate, trainer_gpus=1),
        logging=LoggingConfig(run_dir=run_dir or "runs/gpu_smoke", progress=False, tensorboard=False, plot=False),
    )


def compare_log_probs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``mean_abs``/``max_abs`` of ``a - b`` over ``mask`` (``[B, T]`` each)."""
    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(f"log-probs: expected equal [B, T] shapes, got {tuple(a.shape)}, {tuple(b.shape)}, mask {tuple(mask.shape)}")
    d = (a.float() - b.float()).abs()[mask.bool()]
    if d.numel() == 0:
        raise ValueError("mask: expected at least one response token, got none")
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max())}


def followed_the_policy(engine: torch.Tensor, current: torch.Tensor, initial: torch.Tensor, mask: torch.Tensor, *,
                        atol: float = 0.05, factor: float = 5.0) -> tuple[bool, dict[str, float]]:
    """Did the engine sample with the current weights (after syncs) rather than the initial ones?

    ``engine``: the engine's rollout log-probs; ``current``/``initial``: the same tokens scored
    by the trainer's current / initial weights (all ``[B, T]``). Passes when the engine agrees
    with the current weights (mean abs difference <= ``atol``) and the weights moved: the
    initial weights are at least ``factor`` times further from the engine than the current ones,
    and more than ``atol`` (otherwise a stale engine could not be told apart).
    """
    now = compare_log_probs(engine, current, mask)["mean_abs"]
    before = compare_log_probs(engine, initial, mask)["mean_abs"]
    ok = now <= atol and before >= max(factor * now, atol)
    return ok, {"engine_vs_current": now, "engine_vs_initial": before}
