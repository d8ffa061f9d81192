"""Weight sync from the trainer to vLLM engines: name mapping, bucket packing, and the two paths.

After every optimiser step the rollout engines must sample from the new policy. Two paths:

* **colocated** (engine and trainer share GPUs, or the engine lives in the rollout actor that
  receives the state dict through Ray): each bucket goes to the engine as plain data,
  ``LLM.collective_rpc("skyrl_load_weights", args=(bucket_to_wire(bucket, tensors),))``, and
  the :class:`WeightSyncExtension` mixed into every vLLM worker (``worker_extension_cls``)
  rebuilds the tensors with ``torch.frombuffer`` and calls the model's own
  ``load_weights(iterable of (name, tensor))``. Why bytes: vLLM's engine runs in its own
  process by default (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) and ``collective_rpc`` arguments
  cross that boundary msgpack-encoded (``vllm/v1/serial_utils.py``): a tensor becomes
  ``[dtype, shape, buffer index]`` and the engine decodes it without type information, so the
  worker would get a list, not a tensor. ``bytes``, ``str``, ``int`` and lists survive that
  encoding (tested in ``tests/rollout/test_msgpack_contract.py``), in- or out-of-process alike. The
  cost is one host copy per bucket; vLLM's loader takes
  Hugging Face checkpoint names and does the fusing itself (q/k/v into ``qkv_proj``, gate/up into
  ``gate_up_proj``, tensor-parallel sharding), so names only need :func:`to_hf_names`.
* **broadcast** (engines on other GPUs): trainer rank 0 and every engine worker join one NCCL
  group (vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``, which does not touch the
  global ``torch.distributed`` state of either side). The trainer packs the state dict into
  byte buckets (:func:`plan_buckets`, :func:`pack_bucket`), broadcasts one flat ``uint8`` buffer
  per bucket, and each worker unpacks views (:func:`unpack_bucket`) and calls ``load_weights``.
  Bucketing bounds the extra GPU memory to one bucket and makes one NCCL call per bucket instead
  of one per tensor.

vLLM API used (checked against the vLLM 0.33.0 wheel; present since 0.8.x for
``worker_extension_cls``/``collective_rpc`` and 0.6 for the stateless NCCL group; our ``[vllm]``
extra pins ``vllm>=0.11,<0.34``): ``LLM(worker_extension_cls=...)``, ``LLM.collective_rpc``,
``worker.model_runner.model.load_weights``, ``worker.device``, ``worker.rank``,
``vllm.distributed.utils.StatelessProcessGroup.create(host, port, rank, world_size)``,
``vllm.distributed.device_communicators.pynccl.PyNcclCommunicator(group, device).broadcast(t, src)``.
The newer built-in ``weight_transfer_config`` API (0.2x+) is not used: it is not in older releases.

Everything except the two classes' CUDA methods is pure and tested on CPU tensors.
"""

from __future__ import annotations

import socket
from typing import Mapping, Sequence

import torch

from skyrl_fn.rollout.buckets import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    bucket_from_wire,
    pack_bucket,
    plan_buckets,
    plan_from_wire,
    specs_of,
    unpack_bucket,
)

__all__ = [
    "indexed_device",
    "broadcast_ranks",
    "free_port",
    "WeightSyncExtension",
    "BroadcastSender",
    "EXTENSION_CLS",
]

#: Qualified name passed to ``vllm.LLM(worker_extension_cls=...)``.
EXTENSION_CLS = "skyrl_fn.rollout.weight_sync.WeightSyncExtension"
def indexed_device(device: torch.device | str, *, current_index: int | None = None) -> torch.device:
    """``device`` with an explicit index: ``"cuda"`` becomes ``cuda:<current_index>``.

    vLLM's ``PyNcclCommunicator`` checks ``tensor.device == self.device`` and a tensor always
    carries an index, so a communicator bound to a bare ``"cuda"`` fails its first call.

    Args:
        device: the trainer's device (``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        current_index: the index to fill in; None asks ``torch.cuda.current_device()``.

    Raises:
        ValueError: ``device`` is not a CUDA device (NCCL needs one).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device for the NCCL weight broadcast, got {str(dev)!r}")
    if dev.index is not None:
        return dev
    index = torch.cuda.current_device() if current_index is None else int(current_index)
    return torch.device("cuda", index)


def broadcast_ranks(num_engines: int, tensor_parallel_size: int) -> tuple[int, tuple[int, ...]]:
    """World size of the sync group and the first rank of each engine.

    Rank 0 is the trainer; engine ``e``'s tensor-parallel worker ``r`` is rank
    ``1 + e * tensor_parallel_size + r`` (every TP worker holds a shard, so each receives).

    Returns:
        ``(world_size, rank_offsets)`` with ``world_size = 1 + num_engines * tensor_parallel_size``.
    """
    for name, v in (("num_engines", num_engines), ("tensor_parallel_size", tensor_parallel_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return 1 + num_engines * tensor_parallel_size, tuple(1 + e * tensor_parallel_size for e in range(num_engines))


def free_port() -> int:
    """A TCP port free on this host right now (for the sync group's rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class WeightSyncExtension:
    """Methods mixed into every vLLM worker (``LLM(worker_extension_cls=EXTENSION_CLS)``).

    Called through ``LLM.collective_rpc(name, args=...)``; ``self`` is the vLLM worker, so
    ``self.model_runner.model``, ``self.device`` and ``self.rank`` are vLLM's. Needs CUDA.
    """

    def skyrl_load_weights(self, wire_bucket: Sequence) -> int:
        """Colocated path: load one :func:`bucket_to_wire` bucket (HF names) with the model's
        ``load_weights``; returns the tensor count."""
        bucket, cpu_buf = bucket_from_wire(wire_bucket)
        device = torch.device(self.device)
        buf = cpu_buf.to(device)  # one copy; the views below point into it
        self.model_runner.model.load_weights(weights=unpack_bucket(bucket, buf))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(bucket.slots)

    def skyrl_init_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> int:
        """Join the trainer's NCCL group as rank ``rank_offset + self.rank``; returns that rank."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + self.rank
        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._skyrl_comm = PyNcclCommunicator(group, device=self.device)
        return rank

    def skyrl_receive_buckets(self, buckets: Sequence) -> int:
        """Receive each planned bucket (``Bucket``s or :func:`plan_to_wire` data) from rank 0 and
        load it; returns the tensor count."""
        comm = getattr(self, "_skyrl_comm", None)
        if comm is None:
            raise RuntimeError("skyrl_receive_buckets: call skyrl_init_broadcast first")
        buckets = plan_from_wire(buckets)
        device = torch.device(self.device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        model = self.model_runner.model
        count = 0
        for bucket in buckets:
            buf = torch.empty(bucket.size, dtype=torch.uint8, device=device)
            comm.broadcast(buf, src=0, stream=stream)
            if stream is not None:
                stream.synchronize()
            named = unpack_bucket(bucket, buf)
            model.load_weights(weights=named)
            count += len(named)
            del buf
        return count


class BroadcastSender:
    """Trainer rank 0 of the sync group: plans once, broadcasts every step. Needs CUDA and vLLM.

    Usage (the driver runs the two sides concurrently)::

        sender = BroadcastSender(host, port, world_size, device="cuda:0")     # trainer actor
        engine.collective_rpc("skyrl_init_broadcast", args=(host, port, offset, world_size))
        plan = sender.plan(state_dict)                                        # once
        sender.send(state_dict, plan)  ||  engine.collective_rpc("skyrl_receive_buckets", args=(plan,))
    """

    def __init__(self, host: str, port: int, world_size: int, *, device: torch.device | str = "cuda:0",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.device = indexed_device(device)
        self.bucket_bytes = bucket_bytes
        group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=self.device)

    def plan(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[Bucket, ...]:
        return plan_buckets(specs_of(state_dict), bucket_bytes=self.bucket_bytes)

    def send(self, state_dict: Mapping[str, torch.Tensor], plan: Sequence[Bucket]) -> None:
        for bucket in plan:
            buf = pack_bucket(bucket, state_dict, device=self.device)
            self.comm.broadcast(buf, src=0, stream=torch.cuda.current_stream(self.device))
        torch.cuda.current_stream(self.device).synchronize()
