"""Hyperparameter checks for the pieces, run when a piece is built (not at its first call)."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_number"]


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
