"""CUDA kernel helpers, checked on CPU: compile options, bf16-in/fp32-math kernels, chunk sizing."""

from __future__ import annotations

import pytest
import torch

from skyrl_fn.ops.kernels import (
    COMPILE_MODES,
    compile_kernel,
    compile_kwargs,
    default_compile_mode,
    fp32_accumulation,
    logprob_chunk_rows,
    token_logprobs_on_device,
    upcast_kernel,
)


def test_compile_kwargs_per_device():
    assert default_compile_mode("cuda") == "max-autotune-no-cudagraphs" and default_compile_mode("cpu") == "default"
    assert compile_kwargs(device_type="cuda") == {
        "backend": "inductor", "mode": "max-autotune-no-cudagraphs", "dynamic": True, "fullgraph": False,
    }
    for mode in COMPILE_MODES:
        assert compile_kwargs(mode=mode, device_type="cuda")["mode"] == mode
        assert compile_kwargs(mode=mode, device_type="cpu")["mode"] == "default"  # no autotune/graphs on CPU
    with pytest.raises(ValueError, match="max-autotune"):
        compile_kwargs(mode="fast")


def ppo_kernel(log_probs, old_log_probs, advantages, loss_mask, eps=0.2):
    ratio = torch.exp(log_probs - old_log_probs)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    loss = torch.where(loss_mask, loss, torch.zeros((), dtype=loss.dtype))
    return loss.sum() / loss_mask.sum().clamp(min=1), {"dtype_probe": loss.detach()}


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 7, generator=g) * 3
    old = lp + 0.1 * torch.randn(4, 7, generator=g)
    adv = torch.randn(4, 1, generator=g).expand(4, 7)
    mask = torch.rand(4, 7, generator=g) > 0.3
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


def test_upcast_kernel_runs_bf16_inputs_in_fp32():
    lp, old, adv, mask = _inputs(torch.bfloat16)
    loss, metrics = upcast_kernel(ppo_kernel)(lp, old, adv, mask)
    assert loss.dtype == torch.float32 and metrics["dtype_probe"].dtype == torch.float32
    ref, _ = ppo_kernel(lp.float(), old.float(), adv.float(), mask)
    assert torch.equal(loss, ref)
    # ... which is closer to the fp32 loss than computing in bf16 is.
    naive, _ = ppo_kernel(lp, old, adv, mask)
    assert naive.dtype == torch.bfloat16
    kw_loss, _ = upcast_kernel(ppo_kernel)(lp, old, adv, loss_mask=mask)
    assert torch.equal(kw_loss, ref)


def test_upcast_keeps_fp32_and_masks_untouched():
    lp, old, adv, mask = _inputs(torch.float32)
    assert torch.equal(upcast_kernel(ppo_kernel)(lp, old, adv, mask)[0], ppo_kernel(lp, old, adv, mask)[0])


def test_compile_kernel_is_cached_per_kernel_and_mode():
    a = compile_kernel(ppo_kernel, mode="default", device_type="cpu")
    assert compile_kernel(ppo_kernel, mode="default", device_type="cpu") is a
    assert compile_kernel(ppo_kernel, mode="max-autotune", device_type="cuda") is not a


def test_fp32_accumulation_sets_and_restores_the_cublas_flags():
    m = torch.backends.cuda.matmul
    before = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    with fp32_accumulation():
        assert not m.allow_bf16_reduced_precision_reduction and not m.allow_fp16_reduced_precision_reduction
    assert (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction) == before


def test_chunk_rows_fit_the_budget():
    v = 151_936  # Qwen2.5 vocabulary
    free = 20 << 30
    c = logprob_chunk_rows(v, free_bytes=free)
    assert c % 8 == 0 and 2 * 4 * v * c <= 0.25 * free < 2 * 4 * v * (c + 8)
    assert logprob_chunk_rows(v, free_bytes=free, with_entropy=True) < c
    assert logprob_chunk_rows(v, free_bytes=1000) == 1
    assert logprob_chunk_rows(10, free_bytes=1 << 40) == 1 << 16
    with pytest.raises(ValueError, match="fraction"):
        logprob_chunk_rows(v, free_bytes=free, fraction=0)


def test_token_logprobs_on_device_matches_the_naive_path_on_cpu():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float32)
    w = torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    out = token_logprobs_on_device(h, w, y, temperature=0.7, with_entropy=True)
    logp = torch.log_softmax((h @ w.T) / 0.7, -1)
    assert torch.allclose(out.log_probs, logp.gather(-1, y[..., None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(out.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)
    bf = token_logprobs_on_device(h.bfloat16(), w.bfloat16(), y)
    assert bf.dtype == torch.float32


@pytest.mark.slow
def test_compiled_kernel_matches_eager_on_cpu():
    from skyrl_fn.ops.compile import compile_unavailable_reason

    reason = compile_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lp, old, adv, mask = _inputs(torch.bfloat16)
    try:
        loss, _ = compile_kernel(ppo_kernel, mode="max-autotune", device_type="cpu")(lp, old, adv, mask)
    except Exception as exc:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"inductor cannot compile here: {type(exc).__name__}")
    ref, _ = ppo_kernel(lp.float(), old.float(), adv.float(), mask)
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, atol=1e-6)
