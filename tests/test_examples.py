"""Each example in examples/ runs (in-process, as ``__main__``) and shows what it claims."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, capsys) -> tuple[dict, str]:
    globs = runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return globs, capsys.readouterr().out


@pytest.mark.parametrize("name", ["custom_baseline.py", "reward_shaping.py", "credit_assignment.py", "multi_objective.py"])
def test_examples_are_short_and_documented(name):
    text = (EXAMPLES / name).read_text()
    assert len(text.splitlines()) <= 60
    assert text.startswith('"""') and f"examples/{name}" in text


def test_custom_baseline(capsys):
    globs, out = run("custom_baseline.py", capsys)
    adv = globs["advantages"]
    dr, loo, shrunk = adv["dr_grpo"], adv["rloo"], adv["shrunk_baseline"]
    torch.testing.assert_close(loo, dr * 3 / 2)  # RLOO = n/(n-1) Dr. GRPO
    # b = 0.7 * group mean (2/3 for "easy", 1/3 for "hard") + 0.3 * batch mean (1/2).
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    base = 0.7 * torch.tensor([2 / 3] * 3 + [1 / 3] * 3) + 0.3 * 0.5
    torch.testing.assert_close(shrunk, scores - base)
    assert "shrunk_baseline" in out and "partial(shrunk_mean, lam=0.7)" in out
    assert ("advantage_estimator", "shrunk_baseline") in globs["table"]


def test_reward_shaping(capsys):
    globs, out = run("reward_shaping.py", capsys)
    plain, shaped = globs["plain"], globs["shaped_adv"]
    assert plain[1] == plain[2]  # same raw reward, different lengths: GRPO cannot tell them apart
    assert shaped[1] > shaped[2]  # the length penalty can
    assert plain[0] / plain[1].abs() > shaped[0] / shaped[1].abs()  # tanh tames the outlier
    assert "the shorter one now gets the larger advantage: True" in out


def test_credit_assignment(capsys):
    globs, out = run("credit_assignment.py", capsys)
    flat, spread = globs["flat"], globs["spread"]
    mask = globs["mask"]
    assert torch.equal(spread[0], flat[0] * torch.tensor([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]))
    assert torch.equal(spread[1], flat[1] * torch.tensor([1 / 4, 1 / 2, 1, 0, 0]))
    assert torch.equal(spread[~mask], torch.zeros(int((~mask).sum())))
    assert "credit grows toward the end" in out
    with pytest.raises(ValueError, match="gamma"):
        globs["table"].compute_advantages("discounted_outcome", globs["batch"], gamma=1.5)


def test_multi_objective(capsys):
    globs, out = run("multi_objective.py", capsys)
    adv = globs["advantages"]
    assert adv[0] > adv[1] > adv[2] > adv[3]  # correct & clean > correct & toxic > formatted > neither
    assert float(adv.abs().max()) <= 2.0  # clip_advantages(2.0)
    assert "did you mean 'correct'" in globs["error"] and "['correct', 'format'" in globs["error"]
    assert "correct and clean beats correct but toxic: True" in out
