"""A read-only, picklable mapping (``types.MappingProxyType`` cannot be pickled, and records and
tables travel to Ray workers)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

__all__ = ["FrozenDict"]


class FrozenDict(Mapping[str, Any]):
    """An immutable mapping with a stable repr; hashing is by identity like the records."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("FrozenDict is read-only")

    def __reduce__(self):
        return (FrozenDict, (self._data,))

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"
