"""Fresh large CPU tensors backed by transparent huge pages, with a small cache of freed ones.

A fresh ``[B, T]`` output is usually the biggest cost of a vectorised estimator on CPU: PyTorch's
CPU allocator hands out large blocks with ``mmap`` and returns them with ``munmap``, so every new
64 MiB tensor is first touched through 16,384 page faults of 4 KiB each (measured here: 14 ms for
``torch.zeros(65536, 256)``, more than the arithmetic that fills it). :func:`empty` maps large
CPU tensors itself, as a private anonymous mapping advised ``MADV_HUGEPAGE`` and aligned to 2 MiB,
so the kernel backs it with 2 MiB pages: 32 faults instead (4.6 ms for the same allocate + fill).

Mappings whose tensors have all been freed are kept (up to ``SKYRL_FN_HUGE_PAGES_CACHE_MB``,
default 256 MiB, 0 disables) and handed out again for a request of the same size class, already
faulted in: a training loop that computes a same-shaped advantage tensor every step pays the
faults once. A mapping is free when no tensor, view or storage refers to it any more (each holds a
reference to it; checked under a lock). :func:`release` drops the free ones; :func:`cached_bytes`
reports what is held.

PyTorch has the huge-page switch process-wide (``THP_MEM_ALLOC_ENABLE=1``), but reads it once at
its first allocation, so a library imported after ``torch`` cannot turn it on; this module does it
per tensor. The result is an ordinary contiguous tensor whose storage is exactly its own bytes (it
pickles, saves, moves to another device and frees like any other; only ``resize_`` beyond its size
is refused). Small tensors, other devices, systems without ``madvise`` and
``SKYRL_FN_HUGE_PAGES=0`` get plain :func:`torch.empty`.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading

import torch

__all__ = ["empty", "release", "cached_bytes", "MIN_BYTES"]

MIN_BYTES = 8 << 20
"""Tensors smaller than this come from :func:`torch.empty` (the allocator's reuse beats a mapping)."""

_HUGE_PAGE = 2 << 20
_SUPPORTED = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


class _Mapping:
    """One aligned huge-page mapping; tensors made from it hold references to ``buf``."""

    __slots__ = ("buf", "offset", "size")

    def __init__(self, size: int) -> None:
        self.size = size  # usable bytes, a multiple of 2 MiB
        self.buf = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buf.madvise(mmap.MADV_HUGEPAGE)
        self.offset = -torch.frombuffer(self.buf, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE

    def free(self) -> bool:
        # The attribute and getrefcount's own argument: nothing else refers to the mapping.
        return sys.getrefcount(self.buf) <= 2


_lock = threading.Lock()
_tracked: list[_Mapping] = []  # mappings that may be reused (in use or free), at most the cache size


def _enabled() -> bool:
    return _SUPPORTED and os.environ.get("SKYRL_FN_HUGE_PAGES", "1") != "0"


def _cache_limit() -> int:
    return int(float(os.environ.get("SKYRL_FN_HUGE_PAGES_CACHE_MB", "256")) * (1 << 20))


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised contiguous tensor, huge-page backed when it is a large CPU tensor.

    Args:
        shape: the tensor's shape.
        dtype: its dtype.
        device: its device; only ``cpu`` tensors of at least :data:`MIN_BYTES` are mapped here.
    """
    device = torch.device(device)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or not _enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
    with _lock:
        mapping = next((m for m in _tracked if m.size == size and m.free()), None)
        if mapping is None:
            mapping = _Mapping(size)
            # Track it if it fits the cache size, after making room from free mappings; else it
            # stays untracked and is unmapped with its last tensor.
            _drop_free(keep=_cache_limit() - size)
            if sum(m.size for m in _tracked) + size <= _cache_limit():
                _tracked.append(mapping)
        # frombuffer keeps ``mapping.buf`` alive for as long as the tensor's storage lives.
        return torch.frombuffer(mapping.buf, dtype=dtype, count=numel, offset=mapping.offset).view(shape)


def _drop_free(keep: int) -> None:
    """Untrack free mappings, oldest first, until the tracked total is at most ``keep`` bytes."""
    total = sum(m.size for m in _tracked)
    for m in list(_tracked):
        if total <= keep:
            break
        if m.free():
            _tracked.remove(m)
            total -= m.size


def release() -> int:
    """Unmap every cached mapping no tensor uses any more; returns the bytes released."""
    with _lock:
        before = sum(m.size for m in _tracked if m.free())
        _tracked[:] = [m for m in _tracked if not m.free()]
        return before


def cached_bytes() -> tuple[int, int]:
    """``(in use, free)`` bytes of the mappings this module keeps for reuse."""
    with _lock:
        free = sum(m.size for m in _tracked if m.free())
        return sum(m.size for m in _tracked) - free, free
