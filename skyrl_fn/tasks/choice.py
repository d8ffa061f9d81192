"""Choosing the task named by ``data.task``: ``digits`` (``skyrl_fn.tasks.base``), ``arithmetic``
(``skyrl_fn.tasks.arithmetic``) or ``gsm8k`` (``skyrl_fn.tasks.gsm8k``). Every task sits below
this module, so the task base never imports a task.
"""

from __future__ import annotations

from skyrl_fn.tasks.arithmetic import ArithmeticTask
from skyrl_fn.tasks.gsm8k import Gsm8kTask
from skyrl_fn.tasks.base import DataConfig, DataError, DigitsTask, Task, check_data_path

__all__ = ["make_task"]


def make_task(cfg: DataConfig, *, seed: int = 0) -> Task:
    """The task named by ``cfg.task``; gsm8k reads and checks every row of ``cfg.path``.

    Raises:
        DataError: a missing/unreadable path or a malformed row (``file:line`` named).
    """
    if cfg.task == "digits":
        return DigitsTask(op=cfg.digits_op, min_digits=cfg.min_digits, max_digits=cfg.max_digits, seed=seed)
    if cfg.task == "arithmetic":
        return ArithmeticTask(
            seed=seed, min_value=cfg.min_value, max_value=cfg.max_value, kinds=cfg.arithmetic_kinds,
            format_credit=cfg.format_credit,
        )
    if cfg.task == "gsm8k":
        return Gsm8kTask.from_jsonl(check_data_path(cfg.path))
    raise DataError(f"data.task: expected 'digits', 'arithmetic' or 'gsm8k', got {cfg.task!r}")
