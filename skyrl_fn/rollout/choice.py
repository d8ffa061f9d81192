"""Choosing the rollout backend named by ``rollout.backend``: ``hf`` (``skyrl_fn.rollout.base``)
or ``vllm`` (``skyrl_fn.rollout.vllm_backend``). Both backends sit below this module, so neither
imports the other.
"""

from __future__ import annotations

from torch import nn

from skyrl_fn.rollout.vllm_backend import make_vllm_backend, vllm_unavailable_reason
from skyrl_fn.rollout.base import BackendUnavailableError, HFBackend, RolloutBackend, RolloutConfig

__all__ = ["check_backend_available", "make_backend"]


def check_backend_available(cfg: RolloutConfig) -> None:
    """Raise BackendUnavailableError (before any model loads) if ``cfg.backend`` cannot run here.

    ``hf`` always runs. ``vllm`` needs the ``vllm`` package and a CUDA device; the message is
    ``skyrl_fn.rollout.vllm_backend.vllm_unavailable_reason()`` (what is missing, the install command, the hardware).
    """
    if cfg.backend == "hf":
        return
    if cfg.backend == "vllm":
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(reason)
        return
    raise ValueError(f"rollout.backend: expected 'hf' or 'vllm', got {cfg.backend!r}")


def make_backend(
    cfg: RolloutConfig, model: nn.Module, tokenizer, *, seed: int = 0, colocated: bool = True
) -> RolloutBackend:
    """The backend named by ``cfg.backend`` around ``model`` (checked with check_backend_available).

    ``seed`` and ``colocated`` reach the ``vllm`` engine only (``colocated``: it shares its GPU
    with the trainer and sleeps between rollouts; see ``skyrl_fn.distributed.placement``).
    """
    check_backend_available(cfg)
    if cfg.backend == "hf":
        return HFBackend(model, tokenizer, cfg)
    if cfg.backend == "vllm":  # vllm itself is imported only inside make_vllm_backend
        return make_vllm_backend(cfg, model, tokenizer, seed=seed, colocated=colocated)
    raise ValueError(f"rollout.backend: expected 'hf' or 'vllm', got {cfg.backend!r}")
