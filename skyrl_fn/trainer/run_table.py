"""The run's table: the algorithm pieces plus the built-in tasks, rewards and rollout backends.

``DEFAULT_TABLE`` holds the algorithm pieces (estimators, losses, KL estimators, aggregations).
Training also chooses a task (``--data.task``), optionally a reward (``--data.reward``) and a
rollout backend (``--rollout.backend``) by name; their built-ins live here, above the modules that
define them, so the tasks and rollout layers never dispatch on strings. A plugin registers its own
the same way as an estimator::

    def register(table):
        return table.register("my_task", my_task_factory, kind="task")

:func:`with_run_builtins` adds every built-in that a table lacks (the launcher and
``skyrl_fn.trainer.run.resolve`` apply it, so a table built from ``DEFAULT_TABLE`` trains as is).
"""

from __future__ import annotations

from typing import Callable

from skyrl_fn.rollout.vllm_backend import vllm_backend
from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.tasks.arithmetic import arithmetic_components, arithmetic_reward, arithmetic_task
from skyrl_fn.tasks.gsm8k import gsm8k_task, math_answer_reward
from skyrl_fn.rollout.base import hf_backend
from skyrl_fn.tasks.base import char_credit_reward, digits_task, step_credit_reward

__all__ = ["RUN_BUILTINS", "RUN_KINDS", "with_run_builtins", "RUN_TABLE"]

#: The kinds a training run adds to the algorithm pieces.
RUN_KINDS: tuple[str, ...] = ("task", "reward", "rollout_backend")

#: (kind, name, factory or function) of every built-in task, reward and rollout backend.
RUN_BUILTINS: tuple[tuple[str, str, Callable], ...] = (
    ("task", "digits", digits_task),
    ("task", "arithmetic", arithmetic_task),
    ("task", "gsm8k", gsm8k_task),
    ("reward", "char_credit", char_credit_reward),
    ("reward", "step_credit", step_credit_reward),
    ("reward", "math", math_answer_reward),
    ("reward", "arithmetic", arithmetic_reward),
    ("reward", "arithmetic_components", arithmetic_components),
    ("rollout_backend", "hf", hf_backend),
    ("rollout_backend", "vllm", vllm_backend),
)


def with_run_builtins(table: AlgorithmTable) -> AlgorithmTable:
    """``table`` plus every built-in task, reward and rollout backend it does not hold yet (an
    entry the table already has under that kind and name, e.g. a plugin's replacement, is kept)."""
    for kind, name, fn in RUN_BUILTINS:
        if (kind, name) not in table:
            table = table.register(name, fn, kind=kind)
    return table


#: ``DEFAULT_TABLE`` with the run built-ins: what the launcher starts from.
RUN_TABLE: AlgorithmTable = with_run_builtins(DEFAULT_TABLE)
