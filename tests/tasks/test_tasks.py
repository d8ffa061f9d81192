"""The embedded task: reward values, determinism, the checkpointable prompt stream."""

from __future__ import annotations

import attrs
import pytest

from skyrl_fn.tasks.base import DataConfig, DataState, DigitsTask, char_credit, digits_task, next_prompts, step_credit
from skyrl_fn.tasks.gsm8k import gsm8k_task


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("7890", "7890", 1.0),
        ("7891", "7890", 0.75),      # first, 8, 9 correct; 1 is not 9 + 1
        ("8901", "7890", 0.75),      # wrong start, three correct steps
        ("78", "7890", 0.5),         # stopped early
        ("789012", "7890", 4 / 6),   # did not stop: extra characters enlarge the denominator
        ("", "7890", 0.0),
        ("x890", "7890", 0.5),       # a non-digit breaks the chain
        ("90", "90", 1.0),           # 9 -> 0 wraps
    ],
)
def test_step_credit_values(response, answer, expected):
    assert step_credit(response, answer) == pytest.approx(expected)


@pytest.mark.parametrize(
    "response, answer, expected",
    [("123", "123", 1.0), ("124", "123", 2 / 3), ("1234", "123", 0.75), ("", "123", 0.0), ("", "", 1.0), ("321", "123", 1 / 3)],
)
def test_char_credit_values(response, answer, expected):
    assert char_credit(response, answer) == pytest.approx(expected)


def test_count_examples_are_pure_and_correct():
    task = DigitsTask(seed=3)
    for i in range(50):
        ex = task.example(i)
        assert ex == task.example(i)
        a, k = int(ex.prompt[2]), int(ex.prompt[3])
        assert ex.prompt == f"n:{a}{k}>" and 3 <= k <= 5
        assert ex.answer == "".join(str((a + j) % 10) for j in range(k))
        assert task.reward(ex.answer, ex) == 1.0
    assert [task.example(i) for i in range(20)] != [DigitsTask(seed=4).example(i) for i in range(20)]


@pytest.mark.parametrize("op, digits, answer", [("copy", "3141", "3141"), ("reverse", "3141", "1413"), ("sort", "3141", "1134"), ("increment", "3149", "4250")])
def test_transform_ops(op, digits, answer):
    task = DigitsTask(op=op)
    assert task.transform(digits) == answer
    ex = task.example(0)
    assert ex.answer == task.transform(ex.prompt[2:-1])
    assert task.reward(ex.answer, ex) == 1.0


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="op"):
        DigitsTask(op="divide")
    with pytest.raises(ValueError, match="min_digits"):
        DigitsTask(min_digits=4, max_digits=2)


def test_next_prompts_is_pure_and_advances():
    task = DigitsTask()
    s0 = DataState(seed=1)
    a, s1 = next_prompts(task, s0, 3)
    b, _ = next_prompts(task, s0, 3)
    assert a == b and s1.position == 3 and s0.position == 0
    c, s2 = next_prompts(task, s1, 2)
    whole, _ = next_prompts(task, s0, 5)
    assert a + c == whole and s2.position == 5


@attrs.frozen
class _Finite:
    n: int
    name: str = "finite"
    alphabet: str = "0123456789"

    def size(self):
        return self.n

    def example(self, index):
        from skyrl_fn.tasks.base import Example

        return Example(index=index, prompt=str(index), answer=str(index))

    def reward(self, response, example):
        return float(response == example.answer)


def test_finite_task_walks_seeded_epochs():
    task = _Finite(5)
    got, state = next_prompts(task, DataState(seed=0), 10)
    first, second = [e.index for e in got[:5]], [e.index for e in got[5:]]
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second or first != list(range(5))  # reshuffled per epoch (seeded)
    again, _ = next_prompts(task, DataState(seed=0, position=5), 5)
    assert [e.index for e in again] == second
    plain, _ = next_prompts(task, DataState(), 5, shuffle=False)
    assert [e.index for e in plain] == list(range(5))


def test_builtin_task_factories_read_their_config_fields():
    task = digits_task(DataConfig(digits_op="reverse", min_digits=2, max_digits=2), seed=4)
    assert (task.name, task.op, task.min_digits, task.seed) == ("digits", "reverse", 2, 4)
    with pytest.raises(ValueError, match="data.path"):
        gsm8k_task(DataConfig(task="gsm8k"))


class _Broken(DigitsTask):
    def reward(self, response, example):
        if response == "boom":
            raise ZeroDivisionError("division by zero")
        return float("nan") if response == "nan" else float("inf") if response == "inf" else 0.5


def test_a_raising_reward_names_the_function_and_the_sample():
    from skyrl_fn.tasks.base import RewardError
    from skyrl_fn.tasks.scoring import score_fields

    task = _Broken()
    examples = [task.example(0), task.example(1)]
    with pytest.raises(RewardError) as err:
        score_fields(task, ["1", "2", "boom"], examples, [0, 0, 1])
    msg = str(err.value)
    assert "_Broken.reward raised ZeroDivisionError: division by zero" in msg
    assert f"sample 2 (prompt 1 {examples[1].prompt!r}, response 'boom')" in msg
