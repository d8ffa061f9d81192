"""Central input checks. Every error names the argument and says what was expected and what came.

Records call these in their validators, so bad input fails where it enters the library.
"""

from __future__ import annotations

import math
import numbers
import types
from typing import Any, Sequence

import numpy as np
import torch

from skyrl_fn.core._blocked import zero_off_mask, zero_one_to_bool
from skyrl_fn.core._facts import recall, remember

__all__ = [
    "check_tensor",
    "check_floating",
    "check_shape",
    "check_finite",
    "as_mask",
    "check_zero_off_mask",
    "check_finite_and_zero_off_mask",
    "certify_masked_rows",
    "as_group_ids",
    "first_bad_row",
    "check_number",
    "mask_or_flag",
    "check_all",
]


def check_tensor(name: str, x: Any) -> torch.Tensor:
    """Raise TypeError unless ``x`` is a torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise TypeError unless ``x`` has a floating dtype."""
    check_tensor(name, x)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], names: str) -> torch.Tensor:
    """Raise ValueError unless ``x.shape`` matches ``expected`` (None matches any size).

    ``names`` spells the shape for the message, e.g. ``"[B, T]"``.
    """
    check_tensor(name, x)
    shape = tuple(x.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = ", ".join("?" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape {names} = ({want}), got {shape}")
    return x


def first_bad_row(bad: torch.Tensor) -> int:
    """Index of the first row of a [B] or [B, ...] boolean tensor holding a True."""
    rows = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 1 else bad
    return int(torch.nonzero(rows)[0, 0])


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Raise ValueError naming the first row holding NaN or inf (only where ``mask`` is True)."""
    # Fast path: one read-only reduction. NaN/inf anywhere make the sum non-finite; a finite sum
    # proves every element finite. Only a non-finite sum (or an overflowing one) pays for the
    # element-wise check, which allocates [B, T] temporaries.
    if x.numel() and bool(torch.isfinite(x.sum())):
        return x
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        row = first_bad_row(bad)
        raise ValueError(f"{name}: expected finite values, got NaN/inf in row {row}: {x[row].tolist()}")
    return x


def _finite_flag(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool on ``x``'s device, True when ``x.sum()`` is finite (then every element is)."""
    return torch.isfinite(x.detach().sum())


def check_all(
    finite: Sequence[tuple],
    masks: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]] = (),
) -> None:
    """Every finiteness and mask check of a record with one host sync (per device).

    ``finite`` holds ``(name, x, mask)``: ``x`` must be finite where ``mask`` is True (everywhere
    when ``mask`` is None; ``x`` None is skipped), or ``(name, x, mask, proof)`` with a 0-dim flag
    that is True only if ``x`` is finite where ``mask`` is True (e.g. the finiteness of ``x``'s
    sums over the mask), read instead of ``x``'s own sum. ``masks`` holds ``(name, original, flag)`` from
    :func:`mask_or_flag` (``flag`` None: nothing to check). The fast path reduces each tensor to
    one 0-dim flag on its device (a finite sum proves every element finite) and reads them all
    at once; only when a flag is False do the per-field checks run (:func:`as_mask`, then
    :func:`check_finite` in order), which raise the error naming the first bad field and row, or
    pass when the only non-finite values lie off the mask.

    Raises:
        ValueError: a numeric mask holds values other than 0 and 1; non-finite values on the mask.
    """
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for _name, _original, flag in masks:
        if flag is not None:
            flags.setdefault(flag.device, []).append(flag)
    for name, x, mask, *proof in finite:
        if x is not None and x.numel():
            flags.setdefault(x.device, []).append(proof[0] if proof else _finite_flag(x))
    if all(bool(torch.stack(fs).all()) for fs in flags.values()):
        return
    for name, original, flag in masks:
        if flag is not None:
            as_mask(name, original)
    for name, x, mask, *_proof in finite:
        if x is not None:
            check_finite(name, x.detach(), mask)


def mask_or_flag(name: str, x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as a torch.bool mask without a host sync, and a 0-dim flag (None for a bool ``x``)
    that is True when a numeric ``x`` holds only 0 and 1; :func:`check_all` reads the flag with the
    record's other checks. Type errors are raised at once (they need no device read)."""
    check_tensor(name, x)
    if x.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool, integer or floating 0/1 mask, got {x.dtype}")
    if x.dtype == torch.bool:
        return x, None
    checked = zero_one_to_bool(x)  # host memory (CPU): checked and converted in one read, no flag
    if checked is not None:
        return checked, None
    return x != 0, ((x == 0) | (x == 1)).all()


def as_mask(name: str, x: Any, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Return ``x`` as a torch.bool mask, checking that a numeric mask holds only 0 and 1.

    Accepts bool, integer or floating tensors (SkyRL passes float or long masks). ``-0.0`` counts
    as 0; NaN is rejected like any other value outside {0, 1}.
    """
    check_tensor(name, x)
    if x.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool, integer or floating 0/1 mask, got {x.dtype}")
    if shape is not None:
        check_shape(name, x, shape, "[B, T]")
    if x.dtype == torch.bool:
        return x
    fast = zero_one_to_bool(x)
    if fast is not None:
        return fast
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        row = first_bad_row(bad)
        raise ValueError(f"{name}: expected only 0 and 1, got other values in row {row}: {x[row].tolist()}")
    return x != 0


def certify_masked_rows(out: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Remember that ``out`` was just written as ``torch.where(mask, values, 0)``; returns ``out``.

    ``values`` is ``[B, 1]`` (one value per row, already in ``out``'s dtype) and ``mask`` the bool
    ``[B, T]`` mask. The fact (:mod:`skyrl_fn.core._facts`) is a 0-dim flag, True when every value is
    finite (``[B]`` elements read, no host sync here). :func:`check_finite_and_zero_off_mask` then
    decides "finite and zero off the mask" by reading the flag instead of the ``[B, T]`` output,
    as long as the very same two tensor objects are checked and neither was written in place since.
    Copies and views are other tensors, with no certificate. Only the library's own writers call this.
    """
    remember("masked_rows", out, mask, torch.isfinite(values).all())
    return out


def _certified(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """True when ``x`` carries a still-valid certificate for ``mask`` whose values are all finite
    (then ``x`` is finite and zero off ``mask``); False means "not proven", never "bad"."""
    flag = recall("masked_rows", x, mask)
    return flag is not None and bool(flag)


def check_finite_and_zero_off_mask(name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`check_finite` then :func:`check_zero_off_mask` (the same errors, in that order),
    reading ``x`` once when both pass, and not at all when ``x`` carries a valid certificate from
    :func:`certify_masked_rows` (written from finite per-row values under this very mask)."""
    if _certified(x, mask) or zero_off_mask(x, mask, finite=True):
        return x
    check_finite(name, x)
    return check_zero_off_mask(name, x, mask)


def check_zero_off_mask(name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Raise ValueError naming the first row where ``x != 0`` while ``mask`` is False.

    ``x`` and the bool ``mask`` have the same shape. ``-0.0`` counts as 0; NaN counts as non-zero.
    """
    if zero_off_mask(x, mask):
        return x
    bad = (x != 0) & ~mask
    if bool(bad.any()):
        row = first_bad_row(bad)
        raise ValueError(f"{name} expected 0 wherever response_mask is 0, got non-zero values in row {row}")
    return x


def as_group_ids(name: str, ids: Any, batch: int) -> torch.Tensor:
    """Convert group ids ``[B]`` (ints, strings such as prompt uids, or a tensor) to dense int64 ids.

    Dense ids follow the sorted order of the labels, so ``["b", "a", "b"]`` becomes ``[1, 0, 1]``;
    converting dense ids again returns them unchanged. Labels of different types (ints and
    strings) never fall in one group.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer or string group ids, got a {ids.dtype} tensor")
        if ids.dim() != 1:
            raise ValueError(f"{name}: expected shape [B] = ({batch},), got {tuple(ids.shape)}")
        arr = ids.detach().cpu().numpy()
    else:
        arr = np.asarray(ids, dtype=object if not isinstance(ids, np.ndarray) else None)
        if arr.ndim != 1:
            raise ValueError(f"{name}: expected shape [B] = ({batch},), got {arr.shape}")
        if arr.dtype.kind == "f":
            raise TypeError(f"{name}: expected integer or string group ids, got floats ({arr.dtype})")
    if arr.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [B] = ({batch},), got ({arr.shape[0]},)")
    if arr.dtype == object:
        # Rows in a run of one and the same object (SkyRL's uids: G references to one string) share
        # its type and label, so each run's first row stands for the run.
        starts = _object_runs(arr)
        heads = arr if starts is None else arr[starts]
        kinds = set(map(type, heads.tolist()))
        if any(k is float or k is bool for k in kinds):
            raise TypeError(f"{name}: expected integer or string group ids, got {sorted(k.__name__ for k in kinds)}")
        if len(kinds) > 1:
            # Mixed ints and strings would never compare equal; keep them distinct but hashable.
            arr = np.array([f"{type(v).__name__}:{v}" for v in arr.tolist()], dtype=object)
            inverse = _dense_labels(arr, strings=True)
        elif starts is None:
            inverse = _dense_labels(arr, strings=kinds == {str})
        else:
            inverse = _dense_labels(heads, strings=kinds == {str})
            inverse = np.repeat(inverse, np.diff(np.append(starts, arr.shape[0])))
    else:
        inverse = np.unique(arr, return_inverse=True)[1]
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64, copy=False))


def _object_runs(arr: np.ndarray) -> np.ndarray | None:
    """First row of every run of one and the same object in a 1-D object array (identity, not
    equality), or None when runs are too short to pay (more than half the rows start one) or the
    array is empty.

    Read from the array's own pointer slots through a read-only integer view (no copy, no Python
    call per row): two slots hold the same object exactly when they hold the same address."""
    n = arr.shape[0]
    if n == 0:
        return None
    slots = {
        "shape": arr.shape, "strides": arr.strides, "typestr": np.dtype(np.uintp).str, "version": 3,
        "data": (arr.__array_interface__["data"][0], True),
    }
    addresses = np.asarray(types.SimpleNamespace(__array_interface__=slots, owner=arr))
    starts = np.flatnonzero(np.concatenate(([True], addresses[1:] != addresses[:-1])))
    return starts if 2 * starts.size <= n else None


def _dense_labels(arr: np.ndarray, *, strings: bool = False) -> np.ndarray:
    """``np.unique(arr, return_inverse=True)[1]`` for a 1-D object array of hashable labels
    (``strings``: every label is a ``str``).

    ``np.unique`` sorts all ``B`` Python objects (65,536 string uids: 20 ms). Here only the
    distinct labels are sorted (:func:`_sorted_positions`) and numbered; rows in runs of one label
    (SkyRL's uids come as ``G`` consecutive copies) are looked up once per run. Same ids: dense, in
    sorted order of the labels, equal labels sharing one id. Unhashable labels take ``np.unique``.
    """
    n = arr.shape[0]
    try:
        starts = np.flatnonzero(np.concatenate(([True], np.asarray(arr[1:] != arr[:-1], dtype=bool))))
        heads = arr[starts].tolist() if 2 * starts.size <= n else arr.tolist()
        distinct = list(dict.fromkeys(heads))  # in order of first appearance
        rank = np.empty(len(distinct), dtype=np.int64)
        rank[_sorted_positions(distinct, strings)] = np.arange(len(distinct))
    except (TypeError, ValueError):  # unhashable, unorderable or odd labels: np.unique decides
        return np.unique(arr, return_inverse=True)[1]
    if len(distinct) == len(heads):  # every run a label of its own: ``distinct`` is ``heads``
        dense = rank
    else:
        code = dict(zip(distinct, rank.tolist()))
        dense = np.fromiter(map(code.__getitem__, heads), dtype=np.int64, count=len(heads))
    if len(heads) == n:
        return dense
    return np.repeat(dense, np.diff(np.append(starts, n)))


def _sorted_positions(labels: list, strings: bool) -> np.ndarray:
    """``[K]`` the positions of the distinct ``labels`` in their sorted order (``sorted``'s order).

    For ``str`` labels (``strings``) that are all ASCII, numpy sorts integer keys, the first 8
    bytes of each label read big-endian (NUL-padded, so a key never orders two labels against
    their string order); only labels whose keys tie are compared as strings, in Python. Python's
    own sort of 8,192 uuid strings costs 2-3x more. Otherwise ``sorted`` decides.

    Raises:
        TypeError: the labels cannot be ordered.
    """
    if strings:
        try:
            keys = np.array(labels, dtype="S8").view(">u8")
        except UnicodeEncodeError:
            keys = None
        if keys is not None:
            order = np.argsort(keys)
            ordered = keys[order]
            tied = np.flatnonzero(ordered[1:] == ordered[:-1])
            if tied.size:
                # Runs of equal keys: [first, last] spans of consecutive tied pairs.
                breaks = np.flatnonzero(np.diff(tied) > 1)
                firsts, lasts = tied[np.append(0, breaks + 1)], tied[np.append(breaks, tied.size - 1)] + 1
                order = order.tolist()
                for first, last in zip(firsts.tolist(), lasts.tolist()):
                    order[first : last + 1] = sorted(order[first : last + 1], key=labels.__getitem__)
                order = np.array(order, dtype=np.int64)
            return order
    return np.array(sorted(range(len(labels)), key=labels.__getitem__), dtype=np.int64)


def check_number(name: str, value: Any, *, low: float = -math.inf, low_open: bool = False) -> float:
    """Return ``value`` as a float, raising TypeError unless it is a real number (not a bool) and
    ValueError unless it is finite and ``>= low`` (``> low`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")
    return value
