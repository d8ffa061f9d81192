"""Where the Ray actors run: the GPU plan of a config, each actor's device, moving records.

Everything here keeps the CPU path unchanged: :func:`gpu_plan` is None unless the run uses the
``vllm`` backend, :func:`actor_device` is ``"cpu"`` whenever CUDA is not available, and
:func:`to_device` returns its argument itself when nothing has to move.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import torch

from skyrl_fn.distributed.placement import plan_placement
from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.trainer.run import ResolvedRun

__all__ = ["uses_gpus", "gpu_plan", "select_device", "actor_device", "to_device"]


def uses_gpus(config: TrainConfig) -> bool:
    """True when the run is placed on GPUs (``--rollout.backend vllm``); the ``hf`` default runs
    on the CPU shares of ``skyrl_fn.distributed.ray_workers.CPU_SHARES``."""
    return config.rollout.backend == "vllm"


def gpu_plan(run: ResolvedRun):
    """The ``PlacementPlan`` of ``run`` (``skyrl_fn.distributed.placement.plan_placement`` over ``config.gpu``,
    the engines' tensor-parallel size, the models the run needs and its ``trainer.workers``
    policy actors), or None on the CPU path.

    Raises:
        ValueError: the GPUs cannot hold the layout (from ``plan_placement``).
    """
    config = run.config
    if not uses_gpus(config):
        return None

    return plan_placement(
        config.gpu, tensor_parallel_size=config.rollout.tensor_parallel_size,
        uses_reference=run.uses_reference, uses_critic=run.uses_critic, uses_teacher=run.uses_teacher,
        trainer_workers=config.trainer.workers,
    )


def select_device(*, gpu_ids: Sequence[Any], cuda_available: bool) -> str:
    """``"cuda"`` when Ray assigned this actor a GPU (``gpu_ids`` non-empty) and CUDA works here,
    else ``"cpu"`` (pure; :func:`actor_device` supplies the two facts)."""
    return "cuda" if cuda_available and len(gpu_ids) > 0 else "cpu"


def actor_device() -> str:
    """This process's device: :func:`select_device` of ``ray.get_gpu_ids()`` and
    ``torch.cuda.is_available()``; Ray is not consulted when CUDA is unavailable."""
    if not torch.cuda.is_available():
        return "cpu"
    import ray

    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return select_device(gpu_ids=ids, cuda_available=True)


def to_device(obj: Any, device: str | torch.device) -> Any:
    """``obj`` with every tensor on ``device``: tensors, attrs records (``RolloutBatch``,
    ``Experience``; rebuilt with ``attrs.evolve``), dicts, lists and tuples; anything else as is.
    Returns ``obj`` itself when no tensor has to move (the CPU path copies nothing)."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if attrs.has(type(obj)):
        changes = {}
        for f in attrs.fields(type(obj)):
            value = getattr(obj, f.name)
            moved = to_device(value, device)
            if moved is not value:
                changes[f.name.lstrip("_") if f.alias is None else f.alias] = moved
        return attrs.evolve(obj, **changes) if changes else obj
    if isinstance(obj, dict):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        return obj if all(moved[k] is obj[k] for k in obj) else moved
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, device) for v in obj]
        if all(m is v for m, v in zip(moved, obj)):
            return obj
        return tuple(moved) if isinstance(obj, tuple) else moved
    return obj
