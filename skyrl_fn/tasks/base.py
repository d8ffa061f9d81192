"""Tasks: prompts with a verifiable reward, and a checkpointable prompt stream.

The embedded task (``digits``) needs no data: example ``i`` is a pure function of ``(seed, i)``.
Its reward gives partial credit per correct character, so a tiny randomly initialised model gets
a dense learning signal from the first step::

    reward(y, a) = #{i : y_i = a_i} / max(|a|, |y|)        in [0, 1]

(a response longer than the answer is penalised through the denominator).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import attrs

from skyrl_fn.core.table import HyperValue
from skyrl_fn.models.model import DIGITS_ALPHABET

__all__ = [
    "DataConfig", "Example", "Task", "DigitsTask", "DataState", "next_prompts", "char_credit", "step_credit",
    "DataError", "RewardError", "check_data_path", "reward_function_name", "digits_task", "char_credit_reward",
    "step_credit_reward", "Rewarded",
]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task: prompts and the verifiable reward."""

    task: str = "digits"
    """Task registered in the table (built-ins: digits = embedded synthetic digit-string task for the
    tiny model; arithmetic = seeded arithmetic and word problems answered as '#### N', for
    pretrained models; gsm8k = prompt/answer jsonl at data.path). A plugin registers its own:
    table.register(name, factory, kind="task")."""
    task_args: dict[str, HyperValue] = dataclasses.field(default_factory=dict)
    """Arguments of the chosen task factory beyond the data config (typed flags
    --data.task-args.NAME from its signature), only those to change."""
    reward: str = ""
    """Reward registered in the table to score responses instead of the task's own (built-ins:
    char_credit, step_credit, math, arithmetic, arithmetic_components = arithmetic with its parts
    correct and format as per-sample fields); empty = the task's own reward."""
    reward_args: dict[str, HyperValue] = dataclasses.field(default_factory=dict)
    """Arguments of the chosen reward (typed flags --data.reward-args.NAME), only those to change."""
    path: str | None = None
    """gsm8k: jsonl of {"prompt", "answer"} rows (see launch/prep_gsm8k.py)."""
    digits_op: Literal["count", "copy", "reverse", "sort", "increment"] = "count"
    """digits: count = continue counting up from a digit for k digits ("n:74>" -> "7890");
    copy/reverse/sort/increment transform a digit string."""
    min_digits: int = 3
    """digits: shortest input string."""
    max_digits: int = 5
    """digits: longest input string."""
    shuffle: bool = True
    """gsm8k: reshuffle the rows every epoch (seeded)."""
    min_value: int = 2
    """arithmetic: smallest operand."""
    max_value: int = 60
    """arithmetic: largest operand."""
    arithmetic_kinds: tuple[Literal["add", "add_sub", "word"], ...] = ("add", "add_sub", "word")
    """arithmetic: problem kinds, cycled (a + b; a + b - c; a word problem of a + b - c)."""
    format_credit: float = 0.0
    """arithmetic: reward of a well-formatted ('#### N') wrong answer, in [0, 1)."""


class DataError(ValueError):
    """The task's data cannot be used: the message names the field or ``file:line``, what was
    expected and what was found."""


class RewardError(RuntimeError):
    """A reward function raised; the message names the function and the sample."""


@attrs.frozen(kw_only=True)
class Example:
    """One prompt and its reference answer.

    Attributes:
        index: position in the task's sequence of examples.
        prompt: the prompt text given to the model.
        answer: the reference answer the reward compares against.
    """

    index: int
    prompt: str
    answer: str


@runtime_checkable
class Task(Protocol):
    """A task: indexed examples and a reward in ``[0, 1]``."""

    name: str
    alphabet: str
    """Characters the embedded character tokenizer needs for this task."""

    def example(self, index: int) -> Example:
        """Example ``index`` (deterministic)."""
        ...

    def size(self) -> int | None:
        """Number of distinct examples, or None for an endless generator."""
        ...

    def reward(self, response: str, example: Example) -> Any:
        """The reward of ``response`` for ``example`` in ``[0, 1]``: a number, or a mapping with
        ``"score"`` and the per-sample fields the task factory declares
        (``skyrl_fn.tasks.scoring.provides``)."""
        ...


def char_credit(response: str, answer: str) -> float:
    """``#{i : response_i = answer_i} / max(|answer|, |response|)``; 1.0 for two empty strings."""
    n = max(len(answer), len(response))
    if n == 0:
        return 1.0
    return sum(1 for x, y in zip(response, answer) if x == y) / n


def step_credit(response: str, answer: str) -> float:
    """Credit for counting: the first character if it equals the answer's, and each later one if
    it is the successor (mod 10) of the response's previous character::

        (1[y_0 = a_0] + sum_{1 <= i < |a|} 1[y_i = (y_{i-1} + 1) mod 10]) / max(|a|, |y|)

    A response equal to the answer scores 1; one started at the wrong digit but counted
    correctly keeps the credit of every correct step (the dense part of the signal); characters
    past the answer's length earn nothing and enlarge the denominator (so stopping matters).
    """
    n = max(len(answer), len(response))
    if n == 0:
        return 1.0
    hits = 0
    for i, c in enumerate(response[: len(answer)]):
        if i == 0:
            hits += c == answer[:1]
        elif c.isdigit() and response[i - 1].isdigit():
            hits += int(c) == (int(response[i - 1]) + 1) % 10
    return hits / n


_OPS = {"count": "n", "copy": "c", "reverse": "r", "sort": "s", "increment": "i"}


@attrs.frozen(kw_only=True)
class DigitsTask:
    """The embedded synthetic task: transform a digit string.

    ``count`` (the default): prompt ``"n:<a><k>>"``, answer the ``k`` digits counting up from
    ``a`` modulo 10 (``"n:74>"`` -> ``"7890"``), ``k`` in ``[min_digits, max_digits]``.
    The others: prompt ``"<op>:<digits>>"``, answer the transformed string: ``copy`` (the
    string), ``reverse``, ``sort`` (ascending), ``increment`` (each digit + 1 mod 10).

    Attributes:
        op: the transformation.
        min_digits, max_digits: length range of the input string.
        seed: data seed; example ``i`` depends only on ``(seed, i)``.
    """

    op: str = "count"
    min_digits: int = 3
    max_digits: int = 5
    seed: int = 0
    name: str = "digits"
    alphabet: str = DIGITS_ALPHABET

    def __attrs_post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"op: expected one of {sorted(_OPS)}, got {self.op!r}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"min_digits/max_digits: expected 1 <= min <= max, got {self.min_digits}, {self.max_digits}")

    def size(self) -> int | None:
        """None: an endless generator."""
        return None

    def example(self, index: int) -> Example:
        """Example ``index``: a pure function of ``(seed, index)``."""
        rng = random.Random(self.seed * 1_000_003 + index)
        n = rng.randint(self.min_digits, self.max_digits)
        if self.op == "count":
            if n > 9:
                raise ValueError(f"max_digits: expected <= 9 for op 'count' (one-digit length), got {n}")
            a = rng.randint(0, 9)
            return Example(index=index, prompt=f"n:{a}{n}>", answer="".join(str((a + i) % 10) for i in range(n)))
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        return Example(index=index, prompt=f"{_OPS[self.op]}:{digits}>", answer=self.transform(digits))

    def transform(self, digits: str) -> str:
        """The answer for ``digits`` (not for ``count``, whose prompt is not a digit string)."""
        if self.op == "copy":
            return digits
        if self.op == "reverse":
            return digits[::-1]
        if self.op == "sort":
            return "".join(sorted(digits))
        return "".join(str((int(c) + 1) % 10) for c in digits)

    def reward(self, response: str, example: Example) -> float:
        """``count``: :func:`step_credit`; the others: :func:`char_credit` against the answer."""
        if self.op == "count":
            return step_credit(response.strip(), example.answer)
        return char_credit(response.strip(), example.answer)


@attrs.frozen(kw_only=True)
class DataState:
    """Where the prompt stream is: the only data state a checkpoint needs.

    Attributes:
        position: number of prompts consumed so far.
        seed: shuffling seed (finite tasks reshuffle every epoch).
    """

    position: int = 0
    seed: int = 0


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(seed * 7_919 + epoch).shuffle(order)
    return order


def next_prompts(task: Task, state: DataState, n: int, *, shuffle: bool = True) -> tuple[list[Example], DataState]:
    """The next ``n`` examples and the advanced state (pure: the same state gives the same batch).

    Endless tasks read indices ``position .. position + n - 1``; finite ones walk a per-epoch
    permutation seeded by ``(seed, epoch)``.
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    size = task.size()
    out = []
    for k in range(state.position, state.position + n):
        if size is None:
            idx = k
        else:
            epoch, off = divmod(k, size)
            idx = _epoch_order(size, state.seed, epoch, shuffle)[off]
        out.append(task.example(idx))
    return out, attrs.evolve(state, position=state.position + n)


def check_data_path(path: str | None, *, field: str = "data.path") -> str:
    """``path`` if it names a readable regular file, else :class:`DataError` saying what it is."""
    if not path:
        raise DataError(f"{field}: expected a jsonl file path, got {path!r}")
    if not os.path.exists(path):
        raise DataError(f"{field}: expected an existing jsonl file, got {path!r} (no such file)")
    if os.path.isdir(path):
        raise DataError(f"{field}: expected a jsonl file, got {path!r} (a directory)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{field}: expected a readable jsonl file, got {path!r} (permission denied)")
    return path


def reward_function_name(task: object) -> str:
    """``Class.reward`` of a task, or the reward function chosen by ``--data.reward`` (how errors
    and ``nonfinite.reward_rows`` name the reward)."""
    fn = task.fn if isinstance(task, Rewarded) else getattr(task, "reward", None)
    fn = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(fn, "__qualname__", None) or f"{type(task).__name__}.reward"
def digits_task(data: DataConfig, *, seed: int = 0) -> DigitsTask:
    """The built-in task ``digits``: :class:`DigitsTask` from ``data.digits_op``,
    ``data.min_digits`` and ``data.max_digits``."""
    return DigitsTask(op=data.digits_op, min_digits=data.min_digits, max_digits=data.max_digits, seed=seed)


def char_credit_reward(response: str, example: Example) -> float:
    """The built-in reward ``char_credit``: :func:`char_credit` of the stripped response."""
    return char_credit(response.strip(), example.answer)


def step_credit_reward(response: str, example: Example) -> float:
    """The built-in reward ``step_credit``: :func:`step_credit` of the stripped response."""
    return step_credit(response.strip(), example.answer)


@attrs.frozen(kw_only=True)
class Rewarded:
    """``task`` scored by another reward function (``--data.reward NAME``); everything else,
    held-out split included, is the task's own.

    Attributes:
        task: the task giving the examples.
        fn: ``fn(response, example) -> float`` (a table entry of kind ``reward`` with its
            arguments bound), or a mapping with ``"score"`` and the fields ``fn`` declares
            (``skyrl_fn.tasks.scoring``).
        reward_name: the name it was chosen by, for messages.
    """

    task: Task
    fn: Callable[[str, Example], Any]
    reward_name: str

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def alphabet(self) -> str:
        return self.task.alphabet

    def example(self, index: int) -> Example:
        return self.task.example(index)

    def size(self) -> int | None:
        return self.task.size()

    def reward(self, response: str, example: Example) -> Any:
        return self.fn(response, example)

    def rescore(self, task: Task) -> "Rewarded":
        """``task`` (e.g. a held-out set) scored by the same reward."""
        return attrs.evolve(self, task=task)

    def __getattr__(self, name: str):
        if name == "heldout":  # only when the task has a held-out split of its own
            heldout = getattr(self.task, "heldout")
            return lambda: self.rescore(heldout())
        raise AttributeError(name)
