"""Facts derived from a tensor, remembered while the tensor is unchanged.

A fast path may reuse what an earlier pass over ``[B, T]`` data established: the table's output
check that an estimator's output was just written as ``torch.where(mask, values, 0)`` from finite
values; an estimator that the record's check already summed the rewards over the mask. A fact is
about one tensor ``x`` under one bool ``mask`` and holds as long as both are the very same objects
and neither was written in place since: each tensor's version counter (``x._version``, bumped by
every in-place write through torch, views included) is compared with its value when the fact was
recorded. Writes that bypass the counter (through ``.data`` or a numpy view of the storage) are
not seen.

Facts live here, keyed by the tensor's identity, never on the tensor itself: an attribute on a
tensor travels with it into ``torch.save`` (whose ``weights_only`` loader then refuses the file)
and ``pickle``. An entry goes when its tensor is garbage-collected. ``recall`` answers a fact or
None ("not known"), never "false": a caller that gets None does the full work.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

__all__ = ["remember", "recall"]

_lock = threading.Lock()
_facts: dict[tuple[str, int], "_Fact"] = {}


class _Fact:
    __slots__ = ("x", "mask", "versions", "value", "__weakref__")

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, value: Any, key: tuple[str, int]) -> None:
        self.x = weakref.ref(x, lambda _ref, me=weakref.ref(self): _forget(key, me()))
        self.mask = weakref.ref(mask)
        self.versions = (x._version, mask._version)
        self.value = value


def _forget(key: tuple[str, int], fact: _Fact | None) -> None:
    with _lock:
        if fact is not None and _facts.get(key) is fact:
            del _facts[key]


def remember(kind: str, x: torch.Tensor, mask: torch.Tensor, value: Any) -> None:
    """Record ``value`` as the fact ``kind`` about ``x`` under ``mask`` (replacing an older one)."""
    key = (kind, id(x))
    fact = _Fact(x, mask, value, key)
    with _lock:
        _facts[key] = fact


def recall(kind: str, x: torch.Tensor, mask: torch.Tensor) -> Any | None:
    """The fact ``kind`` recorded about this very ``x`` under this very ``mask``, if neither was
    written in place since; else None."""
    fact = _facts.get((kind, id(x)))
    if fact is None or fact.x() is not x or fact.mask() is not mask:
        return None
    if fact.versions != (x._version, mask._version):
        return None
    return fact.value
