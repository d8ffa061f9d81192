"""The policy's weights as one byte buffer, for the push to separate rollout workers.

A state dict of many tensors costs Ray one serialised buffer per tensor, and numpy has no
bfloat16 (``tensor.numpy()`` refuses bf16 weights). :func:`pack` writes every tensor's bytes back
to back into one ``uint8`` numpy array (Ray hands it to the workers zero-copy from its object
store), with the names, shapes and dtypes beside it; :func:`unpack` gives the state dict back as
views into that one buffer, in the original dtypes.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import attrs
import numpy as np
import torch

__all__ = ["PackedWeights", "pack", "unpack"]

_ALIGN = 8  # every tensor starts at a multiple of 8 bytes, so a byte view can become any dtype


@attrs.frozen
class PackedWeights:
    """``layout``: ``(name, shape, dtype name, byte offset)`` per tensor; ``data``: the bytes."""

    layout: tuple[tuple[str, tuple[int, ...], str, int], ...]
    data: np.ndarray


def pack(state_dict: Mapping[str, torch.Tensor]) -> PackedWeights:
    """One byte buffer holding every tensor of ``state_dict`` (detached, on the CPU)."""
    parts, layout, offset = [], [], 0
    for name, tensor in state_dict.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        layout.append((name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), offset))
        pad = -flat.numel() % _ALIGN
        parts.append(flat)
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
        offset += flat.numel() + pad
    data = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return PackedWeights(layout=tuple(layout), data=data.numpy())


def unpack(packed: PackedWeights) -> dict[str, torch.Tensor]:
    """The state dict of :func:`pack`, as views into ``packed.data`` (read-only when it came from
    Ray's object store: load it into a model, which copies, rather than writing to it)."""
    with warnings.catch_warnings():  # a read-only buffer from the object store
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(packed.data)
    out = {}
    for name, shape, dtype, offset in packed.layout:
        dt = getattr(torch, dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = raw[offset : offset + nbytes].view(dt).view(shape)
    return out
