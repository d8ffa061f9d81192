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
import warnings
from typing import Iterable, Mapping, Sequence

import attrs
import torch

__all__ = [
    "TensorSlot",
    "Bucket",
    "to_hf_names",
    "plan_buckets",
    "specs_of",
    "pack_bucket",
    "unpack_bucket",
    "plan_to_wire",
    "plan_from_wire",
    "bucket_to_wire",
    "bucket_from_wire",
    "indexed_device",
    "broadcast_ranks",
    "free_port",
    "WeightSyncExtension",
    "BroadcastSender",
    "EXTENSION_CLS",
    "DEFAULT_BUCKET_BYTES",
]

#: Qualified name passed to ``vllm.LLM(worker_extension_cls=...)``.
EXTENSION_CLS = "skyrl_fn.rollout.weight_sync.WeightSyncExtension"
#: 512 MiB per bucket: few NCCL calls for a 0.5-7B model, bounded extra memory on both sides.
DEFAULT_BUCKET_BYTES = 512 << 20
#: Offsets inside a bucket are multiples of this, so every slot can be viewed as its dtype.
_ALIGN = 64
#: Prefixes added by wrappers around the HF module (torch.compile, DDP/FSDP, our critic).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@attrs.frozen(kw_only=True)
class TensorSlot:
    """Where one tensor lives inside a bucket: ``buffer[offset : offset + nbytes]``."""

    name: str
    shape: tuple[int, ...] = attrs.field(converter=tuple)
    dtype: torch.dtype
    offset: int
    nbytes: int


@attrs.frozen(kw_only=True)
class Bucket:
    """A group of tensors sent as one flat ``uint8`` buffer of ``size`` bytes."""

    slots: tuple[TensorSlot, ...] = attrs.field(converter=tuple)
    size: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)


def to_hf_names(
    state_dict: Mapping[str, torch.Tensor], *, tied_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """The trainer's state dict under Hugging Face checkpoint names, which vLLM's loaders accept.

    Strips wrapper prefixes (``_orig_mod.`` of torch.compile, ``module.`` of DDP, FSDP's),
    drops rotary ``inv_freq`` buffers (recomputed by vLLM) and, with ``tied_embeddings``, the
    ``lm_head.weight`` alias of the input embedding (vLLM ties them itself; sending it twice
    doubles the traffic of small models, where the embedding dominates).

    Args:
        state_dict: parameter name -> tensor (any device).
        tied_embeddings: the model ties ``lm_head`` to ``embed_tokens``.

    Returns:
        A new dict, same tensors (not copied).

    Raises:
        ValueError: two names map to the same HF name.
        TypeError: a value is not a tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        hf = name
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if hf.startswith(prefix):
                    hf, stripped = hf[len(prefix):], True
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        if tied_embeddings and hf == "lm_head.weight":
            continue
        if hf in out:
            raise ValueError(f"state_dict: expected distinct names after stripping wrappers, got {hf!r} twice")
        out[hf] = tensor
    return out


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan_buckets(
    specs: Iterable[tuple[str, Sequence[int], torch.dtype]], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> tuple[Bucket, ...]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes`` (a larger tensor gets its own).

    The plan is metadata only (names, shapes, dtypes, byte offsets), so the trainer computes it
    once and ships it to the engines, which allocate receive buffers from it.

    Args:
        specs: ``(name, shape, dtype)`` per tensor, in send order.
        bucket_bytes: soft cap on a bucket's size in bytes (> 0).

    Returns:
        Buckets in order; every name appears exactly once; offsets are 64-byte aligned.

    Raises:
        ValueError: ``bucket_bytes`` <= 0 or a duplicate name.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: expected a positive int, got {bucket_bytes!r}")
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    size = 0
    seen: set[str] = set()
    for name, shape, dtype in specs:
        if name in seen:
            raise ValueError(f"specs: expected distinct names, got {name!r} twice")
        seen.add(name)
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        start = _align(size)
        if slots and start + nbytes > bucket_bytes:
            buckets.append(Bucket(slots=slots, size=size))
            slots, start = [], 0
        slots.append(TensorSlot(name=name, shape=shape, dtype=dtype, offset=start, nbytes=nbytes))
        size = start + nbytes
    if slots:
        buckets.append(Bucket(slots=slots, size=size))
    return tuple(buckets)


def specs_of(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor, in the dict's order (input of :func:`plan_buckets`)."""
    return [(k, tuple(v.shape), v.dtype) for k, v in state_dict.items()]


def pack_bucket(bucket: Bucket, tensors: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None) -> torch.Tensor:
    """One flat ``[bucket.size]`` uint8 buffer holding the bucket's tensors at their offsets.

    Args:
        bucket: from :func:`plan_buckets`.
        tensors: name -> tensor with the planned shape and dtype (may be non-contiguous).
        device: buffer device (default: the first tensor's).

    Raises:
        KeyError: a planned name is missing. ValueError/TypeError: shape/dtype differ from the plan.
    """
    if not bucket.slots:
        return torch.empty(0, dtype=torch.uint8, device=device)
    first = tensors[bucket.slots[0].name]
    buf = torch.zeros(bucket.size, dtype=torch.uint8, device=device if device is not None else first.device)
    for slot in bucket.slots:
        if slot.name not in tensors:
            raise KeyError(f"tensors: expected {slot.name!r} (planned in this bucket), got names {sorted(tensors)[:8]}...")
        t = tensors[slot.name]
        if tuple(t.shape) != slot.shape:
            raise ValueError(f"tensors[{slot.name!r}]: expected shape {slot.shape}, got {tuple(t.shape)}")
        if t.dtype != slot.dtype:
            raise TypeError(f"tensors[{slot.name!r}]: expected dtype {slot.dtype}, got {t.dtype}")
        src = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[slot.offset : slot.offset + slot.nbytes].copy_(src, non_blocking=True)
    return buf


def unpack_bucket(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into ``buffer`` (no copy), in plan order: the inverse of pack.

    Raises:
        ValueError: ``buffer`` is not a 1-D uint8 tensor of ``bucket.size`` bytes.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != bucket.size:
        raise ValueError(
            f"buffer: expected a [{bucket.size}] uint8 tensor, got {tuple(buffer.shape)} {buffer.dtype}"
        )
    return [
        (s.name, buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)) for s in bucket.slots
    ]


def plan_to_wire(plan: Sequence[Bucket]) -> list[list]:
    """``plan`` as plain lists/str/int (vLLM's RPC encoder ships these without pickle):
    ``[[size, [[name, shape, dtype_name, offset, nbytes], ...]], ...]``."""
    return [
        [b.size, [[s.name, list(s.shape), str(s.dtype).removeprefix("torch."), s.offset, s.nbytes] for s in b.slots]]
        for b in plan
    ]


def plan_from_wire(wire: Sequence) -> tuple[Bucket, ...]:
    """Inverse of :func:`plan_to_wire`; Bucket objects pass through unchanged.

    Raises:
        ValueError: an unknown dtype name.
    """
    out = []
    for item in wire:
        if isinstance(item, Bucket):
            out.append(item)
            continue
        size, slots = item
        parsed = []
        for name, shape, dtype, offset, nbytes in slots:
            dt = getattr(torch, str(dtype), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"plan: expected a torch dtype name, got {dtype!r} for {name!r}")
            parsed.append(TensorSlot(name=name, shape=tuple(shape), dtype=dt, offset=int(offset), nbytes=int(nbytes)))
        out.append(Bucket(slots=parsed, size=int(size)))
    return tuple(out)


def bucket_to_wire(bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> list:
    """One bucket as msgpack-native data: ``[size, slots, payload]`` with ``slots`` as in
    :func:`plan_to_wire` (name, shape, dtype name, offset, nbytes) and ``payload`` the packed
    bytes (:func:`pack_bucket` on the CPU). What ``skyrl_load_weights`` receives.

    Raises:
        KeyError/ValueError/TypeError: as :func:`pack_bucket`.
    """
    buf = pack_bucket(bucket, tensors, device="cpu")
    if any(tensors[s.name].is_cuda for s in bucket.slots):
        torch.cuda.synchronize()  # pack_bucket copies non-blocking; the bytes are read right below
    # numpy has no bfloat16, but the buffer is uint8: this is one copy into a bytes object.
    return [*plan_to_wire((bucket,))[0], buf.numpy().tobytes()]


def bucket_from_wire(wire: Sequence) -> tuple[Bucket, torch.Tensor]:
    """Inverse of :func:`bucket_to_wire`: the bucket and a ``[size]`` uint8 CPU tensor over the
    payload (``torch.frombuffer``: no copy; read-only memory, so copy before writing).

    Raises:
        ValueError: not ``[size, slots, payload]``, or the payload length differs from ``size``.
    """
    if not isinstance(wire, (list, tuple)) or len(wire) != 3:
        raise ValueError(f"bucket: expected [size, slots, payload] (bucket_to_wire), got {type(wire).__name__} of length {len(wire) if hasattr(wire, '__len__') else '?'}")
    size, slots, payload = wire
    (bucket,) = plan_from_wire([[size, slots]])
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ValueError(f"bucket payload: expected bytes, got {type(payload).__name__}")
    view = memoryview(payload).cast("B")
    if view.nbytes != bucket.size:
        raise ValueError(f"bucket payload: expected {bucket.size} bytes (the planned size), got {view.nbytes}")
    if bucket.size == 0:
        return bucket, torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # bytes are read-only; the tensor is only read (copied to the device)
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return bucket, torch.frombuffer(view, dtype=torch.uint8)


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
