"""The arithmetic task: seeded, disjoint splits, correct answers, the '#### N' reward."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.tasks.arithmetic import INSTRUCTION, ArithmeticTask, final_answer, format_reward
from skyrl_fn.trainer.config import EvalConfig, resolve
from skyrl_fn.tasks.base import DataConfig, DataState, next_prompts
from skyrl_fn.trainer.evaluate import eval_due, heldout_examples, heldout_task
from skyrl_fn.tasks.choice import make_task


def _value(question: str) -> int:
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if "+" in question and "-" in question:
        return nums[0] + nums[1] - nums[2]
    if "+" in question:
        return nums[0] + nums[1]
    return nums[0] + nums[1] - nums[2]  # word problem: has a, gets b, gives away c


@given(st.integers(0, 50), st.integers(0, 500), st.sampled_from(["train", "eval"]))
def test_examples_are_pure_and_correct(seed, index, split):
    task = ArithmeticTask(seed=seed, split=split)
    e = task.example(index)
    assert e == task.example(index) and e.prompt.endswith(INSTRUCTION)
    question = e.prompt[: -len(INSTRUCTION)]
    assert int(e.answer) == _value(question) >= 0
    assert task.reward(f"so\n#### {e.answer}", e) == 1.0


def test_splits_are_disjoint_and_seeded():
    train = {ArithmeticTask(seed=s).example(i).prompt for s in range(3) for i in range(800)}
    held = {ArithmeticTask(seed=s, split="eval").example(i).prompt for s in range(3) for i in range(150)}
    assert train and held and not train & held
    a = [ArithmeticTask(seed=0).example(i).prompt for i in range(20)]
    assert a != [ArithmeticTask(seed=1).example(i).prompt for i in range(20)]
    assert ArithmeticTask().heldout() == ArithmeticTask(split="eval")


def _arithmetic(prompt: str) -> tuple:
    nums = [int(x) for x in re.findall(r"\d+", prompt.split("Think briefly")[0])]
    return (tuple(sorted(nums[:2])), *nums[2:])


def test_commuted_twins_and_word_problems_share_a_split():
    train = {_arithmetic(ArithmeticTask(min_value=1, max_value=9).example(i).prompt) for i in range(3000)}
    held = {_arithmetic(ArithmeticTask(min_value=1, max_value=9, split="eval").example(i).prompt) for i in range(300)}
    assert held and not train & held  # no 3 + 4 in train with 4 + 3 held out, nor the same numbers worded


def test_the_heldout_set_has_distinct_prompts():
    small = ArithmeticTask(kinds=("add",), min_value=1, max_value=9)  # 81 questions, ~1/8 held out
    _, examples = heldout_examples(small, EvalConfig(size=48))
    prompts = [e.prompt for e in examples]
    assert len(set(prompts)) == len(prompts) < 48


def test_kinds_and_ranges():
    task = ArithmeticTask(kinds=("add",), min_value=1, max_value=9)
    for i in range(50):
        q = task.example(i).prompt
        a, b = map(int, re.findall(r"\d+", q)[:2])
        assert q.startswith("What is") and "-" not in q.split("?")[0] and 1 <= a <= 9 and 1 <= b <= 9
    kinds = [ArithmeticTask().example(i).prompt for i in range(3)]
    assert "+" in kinds[0] and "-" in kinds[1] and "gives away" in kinds[2]


def test_reward_and_extraction():
    assert final_answer("12 + 3 = 15\n#### 15") == 15
    assert final_answer("#### 1,234 then #### -7") == -7
    assert final_answer("#### 3 + 4 = 7\nso that is it") == 7  # the answer line's last number
    assert final_answer("#### 3\n4 + 5") == 3 and final_answer("#### none") is None
    assert final_answer("the answer is 15") is None
    assert format_reward("#### 15", 15) == 1.0
    assert format_reward("#### 14", 15, format_credit=0.1) == 0.1
    assert format_reward("15", 15, format_credit=0.1) == 0.0  # right number, wrong format: nothing


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(split="test"), "split"),
        (dict(min_value=5, max_value=6), "max_value"),
        (dict(kinds=("mul",)), "kinds"),
        (dict(format_credit=1.0), "format_credit"),
        (dict(heldout_every=1), "heldout_every"),
    ],
)
def test_bad_settings_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kw)


def test_the_config_builds_it_and_streams_it():
    task = make_task(DataConfig(task="arithmetic", min_value=1, max_value=9, arithmetic_kinds=("add",), format_credit=0.2), seed=3)
    assert isinstance(task, ArithmeticTask) and task.format_credit == 0.2 and task.seed == 3
    batch, state = next_prompts(task, DataState(seed=3), 4)
    assert [e.index for e in batch] == [0, 1, 2, 3] and state.position == 4
    held, examples = heldout_examples(task, EvalConfig(size=5))
    assert held.split == "eval" and len(examples) == 5


def test_heldout_needs_a_split_or_a_file(tmp_path):
    digits = make_task(DataConfig(), seed=0)
    with pytest.raises(ValueError, match="eval.path"):
        heldout_task(digits, EvalConfig(every=2))
    path = tmp_path / "held.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4"}\n')
    held, examples = heldout_examples(digits, EvalConfig(every=2, path=str(path), size=10))
    assert [e.answer for e in examples] == ["2", "4"]


def test_eval_schedule_and_resolve_checks(make_config, table):
    cfg = make_config(data={"task": "arithmetic"}, eval={"every": 3}, trainer={"steps": 7})
    assert [d for d in range(8) if eval_due(cfg, d)] == [0, 3, 6, 7]
    assert not any(eval_due(make_config(), d) for d in range(5))
    resolve(cfg, table)
    with pytest.raises(ValueError, match="eval.path"):
        resolve(make_config(eval={"every": 3}), table)  # digits has no held-out split
    with pytest.raises(ValueError, match="eval.size"):
        resolve(make_config(data={"task": "arithmetic"}, eval={"size": 0}), table)
    with pytest.raises(ValueError, match="data.format_credit"):
        resolve(make_config(data={"task": "arithmetic", "format_credit": 1.5}), table)
