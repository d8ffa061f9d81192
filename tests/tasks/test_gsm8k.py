"""gsm8k: final-number extraction, the reward on the shipped fixture, data preparation."""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest

from skyrl_fn.tasks.base import DataConfig
from skyrl_fn.tasks.gsm8k import Gsm8kTask, extract_final_number, format_prompt, math_reward, normalize_number, prepare_gsm8k
from skyrl_fn.tasks.choice import make_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "gsm8k_tiny.jsonl")
EXPECTED = ["12", "8", "90", "1200", "7", "-5", "2.5", "18"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 * 4 = 12.\n#### 12", "12"),
        ("#### 1,200", "1200"),
        ("The answer is $7.50.", "7.5"),
        ("first 3 then 4 and finally 18", "18"),
        ("#### -5", "-5"),
        ("answer: 2.50", "2.5"),
        ("no numbers here", None),
        ("#### 5 but later 7", "5"),  # the marked answer wins over later numbers
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_normalize_number():
    assert normalize_number("1,234.500") == "1234.5"
    assert normalize_number("$3") == "3"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("abc") is None


def test_fixture_answers_and_rewards():
    task = Gsm8kTask.from_jsonl(FIXTURE)  # raw rows are converted on the fly
    assert task.size() == 8
    assert [task.example(i).answer for i in range(8)] == EXPECTED
    ex = task.example(3)
    assert ex.prompt.startswith("Question: A ticket costs $12.")
    assert task.reward("100 tickets cost 1,200 dollars.\n#### 1200", ex) == 1.0
    assert task.reward("#### 1200.00", ex) == 1.0
    assert task.reward("#### 120", ex) == 0.0
    assert task.reward("I do not know", ex) == 0.0
    assert math_reward("it is -5 degrees", "-5") == 1.0


def test_prepare_from_local_jsonl(tmp_path):
    out = tmp_path / "data" / "train.jsonl"
    assert prepare_gsm8k(str(out), source=FIXTURE, limit=5) == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == EXPECTED[:5]
    assert rows[0]["prompt"] == format_prompt(rows[0]["question"])
    task = make_task(DataConfig(task="gsm8k", path=str(out)))
    assert task.size() == 5 and task.example(4).answer == "7"


def test_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare_gsm8k(str(tmp_path / "x.jsonl"), source=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no number"}) + "\n")
    with pytest.raises(ValueError, match="final number"):
        prepare_gsm8k(str(tmp_path / "x.jsonl"), source=str(bad))


def test_prep_script(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny.jsonl"
    script = os.path.join(ROOT, "launch", "prep_gsm8k.py")
    monkeypatch.setattr(sys, "argv", [script, "--out", str(out), "--source", FIXTURE])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(script, run_name="__main__")
    assert stop.value.code == 0
    assert "wrote 8 rows" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 8
