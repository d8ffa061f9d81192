"""Non-finite guards: rows named, skips counted, too many consecutive skips stop the run."""

from __future__ import annotations

import math

import pytest
import torch

from skyrl_fn.trainer.nonfinite import (
    SKIP_REASON, SKIPPED, NonFiniteStepError, SkipCounter, SkippedStepWarning, describe_rows, nonfinite_rows, reward_rows,
)


def test_reward_rows_name_function_sample_and_prompt():
    scores = torch.tensor([0.5, math.nan, 1.0, math.inf])
    lines = reward_rows(scores, prompts=["p0", "p1"], responses=["a", "b", "c", "d"], group_ids=[0, 0, 1, 1], function="MyTask.reward")
    assert lines == [
        "MyTask.reward returned nan for sample 1 (prompt 'p0', response 'b')",
        "MyTask.reward returned inf for sample 3 (prompt 'p1', response 'd')",
    ]
    assert reward_rows(torch.ones(2), prompts=["p"], responses=["a", "b"], group_ids=[0, 0], function="f") == []


def test_nonfinite_rows_respect_the_mask_and_describe():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.zeros(3, 3)
    adv[0, 2] = math.nan  # masked out: not reported
    adv[1, 0] = math.inf
    lp = torch.zeros(3, 3)
    lp[2, 2] = math.nan
    rows = nonfinite_rows({"advantages": adv, "log_probs": lp, "ref_log_probs": None, "scores": torch.tensor([0.0, math.nan, 0.0])}, mask)
    assert rows == {1: ["advantages", "scores"], 2: ["log_probs"]}
    text = describe_rows(rows, rewards=torch.tensor([0.0, math.nan, 0.25]), lengths=mask.sum(-1))
    assert text == "row 1 (reward nan, length 1): advantages, scores; row 2 (reward 0.25, length 3): log_probs"
    assert describe_rows({}, rewards=torch.zeros(1), lengths=torch.ones(1)) == "no row holds a non-finite input or log-prob"


def test_skip_counter_counts_warns_and_stops():
    c = SkipCounter(limit=2)
    ok, bad = {SKIPPED: 0.0}, {SKIPPED: 1.0, SKIP_REASON: "a NaN reward"}
    with pytest.warns(SkippedStepWarning, match="step 1 skipped \\(1 so far\\): a NaN reward"):
        c = c.record(bad, step=1)
    c = c.record(ok, step=2)
    assert (c.consecutive, c.total) == (0, 1)
    with pytest.warns(SkippedStepWarning):
        c = c.record(bad, step=3).record(bad, step=4)
    assert (c.consecutive, c.total) == (2, 3)
    with pytest.raises(NonFiniteStepError, match="3 consecutive steps skipped \\(limit 2\\), the last, step 5, for a NaN reward"):
        c.record(bad, step=5)


@pytest.mark.parametrize("poison, max_norm", [(None, 1.0), ("grad", 1.0), ("grad", 0.0), ("loss", 1.0)])
def test_step_if_finite_never_lets_a_nan_reach_the_weights(poison, max_norm):
    from skyrl_fn.trainer.nonfinite import step_if_finite

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.ones(1, 3)).sum() * (math.nan if poison == "grad" else 1.0)
    loss.backward()
    norm, stepped = step_if_finite(model, opt, max_norm=max_norm, loss_finite=poison != "loss")
    assert stepped == (poison is None)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed == stepped and all(torch.isfinite(v).all() for v in model.state_dict().values())
    if not stepped:
        assert all(p.grad is None for p in model.parameters()) and not opt.state  # AdamW untouched
