"""Micro-batches cut from rows ordered by response length: the same losses, metrics, parameters,
per-row outputs and skip reports as micro-batches cut in row order, with fewer padding columns."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from skyrl_fn.core.records import PolicyLossInput
from skyrl_fn.losses.objective import SUMMED_METRICS
from skyrl_fn.models.model import build_critic, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.trainer import critic as critic_module
from skyrl_fn.trainer import forward, learner
from skyrl_fn.trainer.critic import critic_update
from skyrl_fn.trainer.forward import attended_columns
from skyrl_fn.trainer.learner import batched_log_probs, batched_values, make_experience, make_train_state, policy_update
from skyrl_fn.trainer.micro_batches import in_row_order, length_order
from skyrl_fn.trainer.run import resolve

PROMPTS = ["n:74>", "n:35>", "n:0>", "n:912>"]
MBS = 4


@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=12))
def test_length_order_is_a_stable_longest_first_permutation(lengths):
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    order = length_order(mask)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    want = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # ties keep row order
    assert order.tolist() == want
    rows = torch.arange(len(lengths)) * 10
    assert torch.equal(in_row_order(rows[order], order), rows)


def _in_row_order(mp):
    """Micro-batches cut in row order (the reference)."""
    for module in (learner, critic_module, forward):
        mp.setattr(module, "length_order", lambda mask: torch.arange(mask.shape[0]))


@pytest.fixture
def sampled(make_config):
    """A batch of 16 rows whose lengths are not in order (4 micro-batches of 4)."""
    cfg = make_config(rollout={"samples_per_prompt": 4, "max_new_tokens": 8}, trainer={"micro_batch_size": MBS})
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    rollout = HFBackend(model.eval(), tok, cfg.rollout).generate(PROMPTS, seed=0)
    order = length_order(rollout.response_mask)
    assert not torch.equal(order, torch.arange(rollout.batch_size))

    def width(rows):  # the padded response columns of micro-batches cut from `rows`
        _, mask = rollout.sequences()
        t = rollout.response_ids.shape[1]
        return sum(attended_columns(mask[rows[s : s + MBS]], t)[1] for s in range(0, len(rows), MBS))

    assert width(order) < width(torch.arange(rollout.batch_size))  # the ordering cuts columns
    return tok, model, rollout


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum_norm", "prompt_mean"])
def test_an_ordered_update_equals_the_update_in_row_order(make_config, table, monkeypatch, sampled, reduction):
    tok, model, rollout = sampled
    cfg = make_config(
        algorithm={"loss_reduction": reduction, "update_epochs": 2, "entropy_coef": 0.01, "use_kl_loss": True, "kl_loss_coef": 0.1},
        rollout={"samples_per_prompt": 4, "max_new_tokens": 8}, trainer={"micro_batch_size": MBS},
    )
    run = resolve(cfg, table)
    ref = batched_log_probs(build_tiny_model(cfg.model, tok, seed=1), rollout, micro_batch_size=MBS)
    exp, _ = make_experience(run, rollout, torch.linspace(0, 1, rollout.batch_size), ref_log_probs=ref)

    def update():
        m = copy.deepcopy(model)
        out = policy_update(run, make_train_state(m, lr=1e-2), exp)  # old log-probs from the first epoch
        return out, dict(m.named_parameters())

    got, got_params = update()
    with monkeypatch.context() as mp:
        _in_row_order(mp)
        want, want_params = update()
    assert got.keys() == want.keys() and got["skipped"] == 0.0
    # The update's sums; the loss's own metrics (ratio_mean, clip fractions, ...) are means per
    # micro-batch, so they follow which rows share one once the ratio leaves 1 (epoch 2).
    for k in ("loss", *SUMMED_METRICS, "grad_norm", "lr"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    for name, p in want_params.items():
        torch.testing.assert_close(got_params[name], p, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("names", "ordered"), [
    ({}, True), ({"loss_reduction": "prompt_mean"}, True),
    ({"loss_reduction": "token_mean_legacy"}, False), ({"policy_loss": "clip_cov"}, False),
])
def test_only_a_microbatch_invariant_objective_is_reordered(make_config, table, names, ordered):
    """``token_mean_legacy`` and the covariance-selecting losses depend on which rows share a
    micro-batch: their updates keep the row order (SkyRL's), whatever the lengths."""
    assert resolve(make_config(algorithm=names), table).algorithm.microbatch_invariant is ordered


def test_a_legacy_update_keeps_the_row_order(make_config, table, monkeypatch, sampled):
    tok, model, rollout = sampled
    cfg = make_config(algorithm={"loss_reduction": "token_mean_legacy"}, rollout={"samples_per_prompt": 4, "max_new_tokens": 8}, trainer={"micro_batch_size": MBS})
    run = resolve(cfg, table)
    exp, _ = make_experience(run, rollout, torch.linspace(0, 1, rollout.batch_size))
    reordered = []
    monkeypatch.setattr(learner, "length_order", lambda mask: reordered.append(1) or length_order(mask))
    policy_update(run, make_train_state(copy.deepcopy(model), lr=1e-2), exp)
    assert not reordered


def test_ordered_passes_and_critic_update_equal_those_in_row_order(make_config, table, monkeypatch, sampled):
    tok, model, rollout = sampled
    cfg = make_config(
        algorithm={"advantage_estimator": "gae", "update_epochs": 2}, rollout={"samples_per_prompt": 4, "max_new_tokens": 8},
        trainer={"micro_batch_size": MBS},
    )
    run = resolve(cfg, table)
    critic = build_critic(cfg.model, tok, seed=0)

    def passes():
        lp = batched_log_probs(model, rollout, micro_batch_size=MBS)
        values = batched_values(critic, rollout, micro_batch_size=MBS)
        exp, _ = make_experience(run, rollout, torch.linspace(0, 1, rollout.batch_size), old_log_probs=lp, values=values)
        c = copy.deepcopy(critic)
        out = critic_update(run, make_train_state(c, lr=1e-2), exp)
        return lp, values, out, dict(c.named_parameters())

    got = passes()
    with monkeypatch.context() as mp:
        _in_row_order(mp)
        want = passes()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # per row, in row order
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for k in want[2]:
        assert got[2][k] == pytest.approx(want[2][k], rel=1e-4, abs=1e-6), k
    for name, p in want[3].items():
        torch.testing.assert_close(got[3][name], p, atol=1e-5, rtol=1e-4, msg=name)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.integers(0, 15))
def test_a_skipped_step_names_the_callers_row(make_config, table, sampled, row):
    """A non-finite advantage past the input checks (built unchecked, as a kernel that reads an
    unvalidated field would see it): the loss is NaN, the step skipped, and the reason names the
    caller's row, not its place in the length order."""
    _, model, rollout = sampled
    assume(int(length_order(rollout.response_mask)[row]) != row)  # a row the order moves
    cfg = make_config(rollout={"samples_per_prompt": 4, "max_new_tokens": 8}, trainer={"micro_batch_size": MBS})
    run = resolve(cfg, table)
    scores = torch.linspace(0, 1, rollout.batch_size)
    exp, _ = make_experience(run, rollout, scores)
    advantages = exp.advantages.clone()
    advantages[row] = float("nan")
    bad = attrs.evolve(exp, advantages=advantages)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(learner, "PolicyLossInput", PolicyLossInput.unchecked)
        out = policy_update(run, make_train_state(model, lr=1e-2), bad, scores=scores)
    length = int(rollout.response_mask[row].sum())
    assert out["skipped"] == 1.0
    assert f"row {row} (reward {float(scores[row]):.4g}, length {length}): advantages" in out["skip_reason"]
    assert out["skip_reason"].count("row ") == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
