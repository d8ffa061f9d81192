"""Scoring: a reward's named per-sample fields, declared with ``provides`` and returned with the score."""

from __future__ import annotations

import functools

import pytest
import torch

from skyrl_fn.tasks import provided_fields, provides
from skyrl_fn.tasks.base import DigitsTask, Example, RewardError, Rewarded
from skyrl_fn.tasks.scoring import reward_value, score_fields


@provides("correct", "length")
def _parts(response, example, *, bonus=0.0):
    correct = float(response.strip() == example.answer)
    return {"score": correct + bonus, "correct": correct, "length": float(len(response))}


def test_provides_is_read_through_partials_and_checks_its_names():
    assert provided_fields(_parts) == ("correct", "length")
    assert provided_fields(functools.partial(_parts, bonus=0.5)) == ("correct", "length")
    assert provided_fields(lambda r, e: 1.0) == () and provided_fields(None) == ()
    for bad, err in ((("score",), ValueError), (("a", "a"), ValueError), (("has space",), ValueError), (("",), ValueError)):
        with pytest.raises(err):
            provides(*bad)
    def hand_marked(response, example):
        return 0.0

    hand_marked.__skyrl_provides__ = "ab"
    with pytest.raises(TypeError, match="the string 'ab'"):
        provided_fields(hand_marked)


def test_reward_value_accepts_a_number_or_the_declared_mapping_only():
    assert reward_value(0.5) == (0.5, {})
    assert reward_value(torch.tensor(1.0)) == (1.0, {})
    assert reward_value({"score": 1, "a": 0.25}, ("a",)) == (1.0, {"a": 0.25})
    assert reward_value({"score": 1, "a": 0.25, "b": 2}, None) == (1.0, {})  # held-out evaluation: the score only
    with pytest.raises(TypeError, match=r"got \['a', 'b'\]; declare them with @provides\('b'\)"):
        reward_value({"score": 1, "a": 0.25, "b": 2}, ("a",))
    with pytest.raises(TypeError, match=r"expected fields \['a', 'b'\] besides 'score'"):
        reward_value({"score": 1, "a": 0.25}, ("a", "b"))
    with pytest.raises(TypeError, match="expected a mapping with 'score'"):
        reward_value({"a": 0.25}, ("a",))
    with pytest.raises(TypeError, match="expected a mapping with 'score' and the declared fields \\['a'\\], got float"):
        reward_value(0.5, ("a",))
    with pytest.raises(TypeError, match="a: expected a number, got str"):
        reward_value({"score": 1, "a": "x"}, ("a",))


def test_score_fields_gives_one_float32_tensor_per_field_row_aligned():
    task = Rewarded(task=DigitsTask(), fn=_parts, reward_name="parts")
    examples = [task.example(0), task.example(1)]
    responses = [examples[0].answer, "1", "12", examples[1].answer]
    scores, fields = score_fields(task, responses, examples, [0, 0, 1, 1], fields=("correct", "length"))
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert fields["correct"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert fields["length"].tolist() == [float(len(r)) for r in responses]
    _, none = score_fields(DigitsTask(), responses, examples, [0, 0, 1, 1])
    assert none == {}


def test_a_reward_that_returns_undeclared_or_non_finite_fields_names_the_sample():
    task = Rewarded(task=DigitsTask(), fn=_parts, reward_name="parts")
    examples = [task.example(0)]
    with pytest.raises(RewardError, match=r"_parts raised TypeError: expected fields \[\] .*declare them with @provides.*sample 0"):
        score_fields(task, ["1"], examples, [0])

    @provides("x")
    def nan_field(response, example):
        return {"score": 1.0, "x": float("nan")}

    with pytest.raises(RewardError, match=r"returned field 'x' = nan on sample 0"):
        score_fields(Rewarded(task=DigitsTask(), fn=nan_field, reward_name="n"), ["1"], examples, [0], fields=("x",))


def test_the_arithmetic_components_reward_splits_the_arithmetic_reward_into_correct_and_format():
    from skyrl_fn.tasks.arithmetic import arithmetic_components, arithmetic_reward

    example = Example(index=0, prompt="What is 2 + 3?", answer="5")
    assert provided_fields(functools.partial(arithmetic_components, format_credit=0.1)) == ("correct", "format")
    for response, correct, formatted in (("so #### 5", 1.0, 1.0), ("#### 6", 0.0, 1.0), ("5", 0.0, 0.0)):
        out = arithmetic_components(response, example, format_credit=0.1)
        assert out == {"score": arithmetic_reward(response, example, format_credit=0.1), "correct": correct, "format": formatted}
        assert out["score"] == pytest.approx(correct + 0.1 * formatted * (1 - correct))
