"""GPU memory when vLLM engines share their GPUs with the trainer (the colocated layout).

vLLM refuses to start unless ``rollout.gpu_memory_utilization`` x the GPU's total memory is free
when the engine is built (``request_memory`` in ``vllm/v1/worker/utils.py``, 0.11-0.33; its
error names the setting and the free memory). In the colocated layout the policy, reference and
critic sit on the same GPUs, so the order matters:

1. the rollout workers are built first: ``RayWorkers`` (and ``DPWorkers``, for ``W`` ranks)
   waits for them before it starts the trainer side (the engine process is not asked for free
   memory beforehand: querying it from the rollout actor would initialise CUDA there, before
   vLLM starts its engine process);
2. each engine sleeps right after start-up (``VLLMBackend``: KV cache freed, weights offloaded
   to host memory), so the trainer-side models load into the memory it gave back;
3. after every update and forward pass the trainer-side actors return their cached blocks to
   the GPU (:func:`release_cached_memory`, ``torch.cuda.empty_cache``) before the engine wakes
   up: PyTorch's caching allocator would otherwise keep the activations' memory reserved in the
   trainer process, where the engine cannot use it.
"""

from __future__ import annotations

import torch

__all__ = ["release_cached_memory"]


def release_cached_memory(device: str | torch.device, *, colocated: bool) -> bool:
    """``torch.cuda.empty_cache()`` when ``device`` is a CUDA device shared with a vLLM engine
    (``colocated``); returns whether it ran. On a dedicated GPU, or on the CPU, nothing happens
    (re-allocating cached blocks costs time and nobody else needs them)."""
    dev = torch.device(device)
    if not colocated or dev.type != "cuda" or not torch.cuda.is_available():
        return False
    torch.cuda.empty_cache()
    return True
