"""``PropertyViolation`` and the compact tables a failing check prints.

Notation: ``B`` rows, ``T`` tokens. A violation names the property first, then the function, the
offending positions and the (shrunk) batch as one line per row.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from skyrl_fn.core.properties import DESCRIPTIONS
from skyrl_fn.core.records import AdvantageInput, PolicyLossInput

__all__ = ["PropertyViolation", "positions", "format_batch", "fmt"]

_MAX_POSITIONS = 8


class PropertyViolation(AssertionError):
    """A function broke a property. ``str(err)`` starts with the property name.

    Attributes:
        property: the property name (``skyrl_fn.core.properties``).
        function: a label of the function checked.
        batch: the (shrunk) input record that shows it, or None.
        positions: offending ``(row, token)`` or ``(row,)`` positions (at most a few).
        detail: one line saying what went wrong.
    """

    __module__ = "skyrl_fn.testing"  # shown by pytest; the public home of the class

    def __init__(
        self,
        property: str,
        detail: str,
        *,
        function: str = "",
        batch: Any = None,
        positions: Sequence[tuple[int, ...]] = (),
        extra: Sequence[str] = (),
    ) -> None:
        self.property, self.detail, self.function = property, detail, function
        self.batch, self.positions = batch, tuple(positions)
        lines = [f"{property}: {detail}"]
        if property in DESCRIPTIONS:
            lines.append(f"  property: {DESCRIPTIONS[property]}")
        if function:
            lines.append(f"  function: {function}")
        if self.positions:
            shown = ", ".join(str(p) for p in self.positions[:_MAX_POSITIONS])
            more = f" ... ({len(self.positions)} in all)" if len(self.positions) > _MAX_POSITIONS else ""
            label = "(row, token)" if len(self.positions[0]) == 2 else "(row,)"
            lines.append(f"  offending positions {label}: {shown}{more}")
        lines.extend(f"  {line}" for line in extra)
        if batch is not None:
            lines.extend(f"  {line}" for line in format_batch(batch))
        super().__init__("\n".join(lines))


def positions(bad: torch.Tensor) -> list[tuple[int, ...]]:
    """The positions where the boolean tensor ``bad`` ([B] or [B, T]) is True, as int tuples."""
    return [tuple(int(i) for i in p) for p in torch.nonzero(bad.detach().cpu())]


def fmt(x: float) -> str:
    """A short, exact-enough rendering of one number."""
    return f"{x:.6g}"


def _row(values: torch.Tensor) -> str:
    return "[" + ", ".join(fmt(float(v)) for v in values.detach().cpu().tolist()) + "]"


def _mask_row(mask: torch.Tensor) -> str:
    return "".join("1" if bool(v) else "0" for v in mask.cpu().tolist())


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def format_batch(batch: Any) -> list[str]:
    """Lines describing a record (or a ``(token_loss, loss_mask)`` pair), one per row."""
    if isinstance(batch, AdvantageInput):
        b, t = batch.token_level_rewards.shape
        head = f"batch: AdvantageInput B={b}, T={t}, {str(batch.token_level_rewards.dtype).replace('torch.', '')}"
        cols = ["row", "group", "mask", "token_level_rewards"]
        extra = [c for c in ("values", "reward_baselines") if getattr(batch, c) is not None]
        cols += extra
        rows = []
        for i in range(b):
            r = [str(i), str(int(batch.group_ids[i])), _mask_row(batch.response_mask[i]), _row(batch.token_level_rewards[i])]
            if batch.values is not None:
                r.append(_row(batch.values[i]))
            if batch.reward_baselines is not None:
                r.append(fmt(float(batch.reward_baselines[i])))
            rows.append(r)
        return [head] + ["  " + line for line in _table(cols, rows)]
    if isinstance(batch, PolicyLossInput):
        b, t = batch.log_probs.shape
        head = f"batch: PolicyLossInput B={b}, T={t}, {str(batch.log_probs.dtype).replace('torch.', '')}"
        fields = ["log_probs", "old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs"]
        fields = [f for f in fields if getattr(batch, f) is not None]
        rows = [
            [str(i), _mask_row(batch.loss_mask[i])] + [_row(getattr(batch, f)[i]) for f in fields] for i in range(b)
        ]
        return [head] + ["  " + line for line in _table(["row", "mask"] + fields, rows)]
    if hasattr(batch, "ref_log_probs") and hasattr(batch, "log_probs"):  # a strategies.LogProbPair
        b, t = batch.log_probs.shape
        head = f"batch: log-prob pair B={b}, T={t}, {str(batch.log_probs.dtype).replace('torch.', '')}"
        rows = [[str(i), _row(batch.log_probs[i]), _row(batch.ref_log_probs[i])] for i in range(b)]
        return [head] + ["  " + line for line in _table(["row", "log_probs", "ref_log_probs"], rows)]
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(x, torch.Tensor) for x in batch):
        loss, mask = batch
        b, t = loss.shape
        head = f"batch: token_loss B={b}, T={t}, {str(loss.dtype).replace('torch.', '')}"
        rows = [[str(i), _mask_row(mask[i]), _row(loss[i])] for i in range(b)]
        return [head] + ["  " + line for line in _table(["row", "mask", "token_loss"], rows)]
    return [f"batch: {batch!r}"]
