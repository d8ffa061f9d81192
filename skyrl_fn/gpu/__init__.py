"""The GPU path: the vLLM rollout backend, weight sync, Ray GPU placement, CUDA loss kernels.

Importing this package never imports vLLM and never touches CUDA: vLLM is imported inside the
functions that need it, so everything imports (and the pure parts are tested) on a CPU machine.
"""

from skyrl_fn.gpu.kernels import (
    COMPILE_MODES,
    compile_kernel,
    compile_kwargs,
    default_compile_mode,
    fp32_accumulation,
    logprob_chunk_rows,
    token_logprobs_on_device,
    upcast_kernel,
)
from skyrl_fn.gpu.placement import (
    ActorSlot,
    GPUPlacementConfig,
    PlacementPlan,
    actor_options,
    create_placement_group,
    plan_placement,
)
from skyrl_fn.gpu.vllm_backend import (
    VLLM_EXTRA_HINT,
    VLLMBackend,
    engine_kwargs,
    make_vllm_backend,
    outputs_to_batch,
    sampling_params_kwargs,
    vllm_unavailable_reason,
)
from skyrl_fn.gpu.memory import release_cached_memory
from skyrl_fn.gpu.sync_check import SyncTracker, WeightSyncError
from skyrl_fn.gpu.weight_sync import (
    Bucket,
    BroadcastSender,
    TensorSlot,
    WeightSyncExtension,
    broadcast_ranks,
    bucket_from_wire,
    bucket_to_wire,
    indexed_device,
    pack_bucket,
    plan_buckets,
    plan_from_wire,
    plan_to_wire,
    specs_of,
    to_hf_names,
    unpack_bucket,
)

__all__ = [
    "COMPILE_MODES", "compile_kernel", "compile_kwargs", "default_compile_mode", "fp32_accumulation",
    "logprob_chunk_rows", "token_logprobs_on_device", "upcast_kernel",
    "ActorSlot", "GPUPlacementConfig", "PlacementPlan", "actor_options", "create_placement_group", "plan_placement",
    "VLLM_EXTRA_HINT", "VLLMBackend", "engine_kwargs", "make_vllm_backend", "outputs_to_batch",
    "sampling_params_kwargs", "vllm_unavailable_reason",
    "Bucket", "BroadcastSender", "TensorSlot", "WeightSyncExtension", "broadcast_ranks", "pack_bucket",
    "plan_buckets", "plan_from_wire", "plan_to_wire", "specs_of", "to_hf_names", "unpack_bucket",
    "bucket_to_wire", "bucket_from_wire", "indexed_device",
    "SyncTracker", "WeightSyncError", "release_cached_memory",
]
