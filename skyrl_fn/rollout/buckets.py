"""A state dict as byte buckets: Hugging Face names, bucket plans, packing and unpacking, and the
plain-data (wire) form that crosses vLLM's msgpack boundary. Used by both weight-sync paths
(:mod:`skyrl_fn.rollout.weight_sync`). Pure, tested on CPU tensors.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import attrs
import torch

__all__ = [
    "TensorSlot",
    "Bucket",
    "ties_embeddings",
    "to_hf_names",
    "plan_buckets",
    "specs_of",
    "pack_bucket",
    "unpack_bucket",
    "plan_to_wire",
    "plan_from_wire",
    "bucket_to_wire",
    "bucket_from_wire",
    "DEFAULT_BUCKET_BYTES",
]

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


def ties_embeddings(model: Any) -> bool:
    """Whether the Hugging Face ``model`` ties ``lm_head`` to its input embedding
    (``config.tie_word_embeddings``; False for a model without a config)."""
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


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
