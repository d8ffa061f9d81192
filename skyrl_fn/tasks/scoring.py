"""Scoring sampled responses: the reward of each, and the named per-sample fields a reward provides.

A reward function returns a number, or, when it provides per-sample fields (reward components for
GDPO, a verifier's confidence, ...), a mapping holding ``"score"`` and one number per field it
declares, as verl's ``compute_score`` returns ``{"score": ..., **extra_info}``::

    @provides("correct", "format")
    def my_reward(response: str, example: Example) -> dict[str, float]:
        correct = float(response.strip() == example.answer)
        formatted = float(response.strip().isdigit())
        return {"score": correct, "correct": correct, "format": formatted}

The declaration (:func:`provides`, on the reward function or on the task factory whose task's own
reward returns them) is read before any model loads: ``skyrl_fn.trainer.run.resolve`` checks that
every ``extras.<key>`` the chosen estimator and loss read is provided by the trainer or the task.
Each field becomes a ``[B]`` float32 tensor in the rollout (``RolloutBatch.extras``) and reaches
``AdvantageInput.extras`` and ``PolicyLossInput.extras`` under its name, through every rollout
worker, the Ray object store, batch transforms and micro-batching.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from skyrl_fn.core.requires import declaration
from skyrl_fn.tasks.base import Example, RewardError, Task, reward_function_name

__all__ = ["SCORE_KEY", "provides", "provided_fields", "reward_value", "score_fields"]

#: The key of the scalar reward in a reward function's mapping.
SCORE_KEY = "score"

F = TypeVar("F", bound=Callable)


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"provides: expected field names, got the string {names!r}")
    out = tuple(names)
    for n in out:
        if not isinstance(n, str) or not n or any(c.isspace() for c in n):
            raise ValueError(f"provides: expected non-empty field names without spaces, got {n!r}")
    if SCORE_KEY in out:
        raise ValueError(f"provides: {SCORE_KEY!r} is the reward itself, not a per-sample field")
    if len(set(out)) != len(out):
        raise ValueError(f"provides: expected each field once, got {list(out)}")
    return out


def provides(*names: str) -> Callable[[F], F]:
    """Decorator: the reward function (or the task factory, for its task's own reward) returns
    the per-sample fields ``names`` besides the score (module docstring).

    Raises:
        ValueError: an empty name, one with spaces, ``"score"``, or a name given twice.
    """
    declared = _check_names(names)

    def mark(fn: F) -> F:
        fn.__skyrl_provides__ = declared
        return fn

    return mark


def provided_fields(fn: Callable | None) -> tuple[str, ...]:
    """The fields ``fn`` declares with :func:`provides` (looking through ``functools.partial``, as
    the run binds a task's or reward's arguments); ``()`` when none or ``fn`` is None."""
    return _check_names(declaration(fn, "__skyrl_provides__")) if fn is not None else ()


def reward_value(result: Any, fields: Sequence[str] | None = ()) -> tuple[float, dict[str, float]]:
    """``(score, {field: value})`` of what a reward function returned.

    Args:
        result: a number, or a mapping with ``"score"`` and exactly the declared ``fields``.
        fields: the fields the reward declares (:func:`provided_fields`); None: only the score
            is wanted (held-out evaluation), whatever fields come with it.

    Raises:
        TypeError: a mapping without ``"score"`` or with other keys than the declared fields,
            a number where fields are declared, or a value that is not a number.
    """
    if isinstance(result, Mapping):
        if SCORE_KEY not in result:
            raise TypeError(f"expected a mapping with {SCORE_KEY!r} and the declared fields {list(fields)}, got keys {sorted(result)}")
        if fields is None:
            return _number(SCORE_KEY, result[SCORE_KEY]), {}
        got = sorted(k for k in result if k != SCORE_KEY)
        if got != sorted(fields):
            undeclared = sorted(set(got) - set(fields))
            hint = f"; declare them with @provides({', '.join(map(repr, undeclared))})" if undeclared else ""
            raise TypeError(f"expected fields {sorted(fields)} besides {SCORE_KEY!r} (the ones declared), got {got}{hint}")
        return _number(SCORE_KEY, result[SCORE_KEY]), {k: _number(k, result[k]) for k in fields}
    if fields:
        raise TypeError(f"expected a mapping with {SCORE_KEY!r} and the declared fields {list(fields)}, got {type(result).__name__} {result!r}")
    return _number(SCORE_KEY, result), {}


def _number(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{key}: expected a number, got {type(value).__name__} {value!r}") from None


def _sample(b: int, example: Example, response: str) -> str:
    return f"sample {b} (prompt {example.index} {example.prompt[:40]!r}, response {response[:40]!r})"


def score_fields(
    task: Task, responses: Sequence[str], examples: Sequence[Example], group_ids: Sequence[int], *, fields: Sequence[str] = ()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards ``[B]`` float32 of ``responses`` (response ``b`` answers ``examples[group_ids[b]]``)
    and the declared per-sample ``fields``, each ``[B]`` float32.

    Non-finite rewards are returned as they are (the training step skips a batch holding one and
    names each sample: ``skyrl_fn.trainer.nonfinite.reward_rows``).

    Raises:
        RewardError: the reward function raised or returned something else than a number or the
            declared mapping; names the function, the sample and the error.
    """
    scores: list[float] = []
    out: dict[str, list[float]] = {k: [] for k in fields}
    for b, (r, g) in enumerate(zip(responses, group_ids)):
        example = examples[int(g)]
        try:
            s, values = reward_value(task.reward(r, example), fields)
        except Exception as err:
            raise RewardError(
                f"reward: {reward_function_name(task)} raised {type(err).__name__}: {err} on {_sample(b, example, r)}"
            ) from err
        scores.append(s)
        for k, v in values.items():
            if not math.isfinite(v):
                raise RewardError(f"reward: {reward_function_name(task)} returned field {k!r} = {v} on {_sample(b, example, r)}; expected a finite number")
            out[k].append(v)
    return torch.tensor(scores, dtype=torch.float32), {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
