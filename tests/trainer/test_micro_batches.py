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
from skyrl_fn.models.model import ModelConfig, build_critic, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.trainer import critic as critic_module
from skyrl_fn.trainer import forward, learner
from skyrl_fn.trainer.critic import critic_update
from skyrl_fn.trainer.forward import attended_columns
from skyrl_fn.trainer.learner import batched_log_probs, batched_values, make_experience, make_train_state, policy_update
from skyrl_fn.trainer.micro_batches import even_bounds, in_row_order, length_order, micro_batch_bounds, micro_batch_overhead
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


def _mask(prompts: list[int], responses: list[int], lp: int = 4, t: int = 6) -> torch.Tensor:
    """``[B, lp + t]`` attention mask of left-padded prompts and right-padded responses."""
    cols = torch.arange(lp + t)[None, :]
    p, r = torch.tensor(prompts)[:, None], torch.tensor(responses)[:, None]
    return ((cols >= lp - p) & (cols < lp)) | ((cols >= lp) & (cols < lp + r))


def _work(prompts, responses, bounds, overhead=0) -> int:
    """Padded work of ``bounds`` plus the fixed cost per micro-batch (micro_batch_bounds' cost)."""
    fixed = max(overhead, max(prompts) + max(responses))
    return sum((e - s) * (max(prompts[s:e]) + max(responses[s:e])) + fixed for s, e in bounds)


def _compositions(b: int, most: int):
    """Every cut of ``b`` rows into consecutive micro-batches of 1..most rows."""
    if b == 0:
        yield []
        return
    for k in range(1, min(b, most) + 1):
        for rest in _compositions(b - k, most):
            yield [(0, k)] + [(s + k, e + k) for s, e in rest]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 6)), min_size=1, max_size=8), mbs=st.integers(1, 4),
    overhead=st.sampled_from([0, 12, 40]),
)
def test_micro_batch_bounds_are_the_least_work_cut(rows, mbs, overhead):
    """Consecutive, every row once, at most ``mbs`` rows each, and no cut (every one tried) has
    less work; never more work than SkyRL's cuts every ``mbs`` rows."""
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    bounds = micro_batch_bounds(_mask(prompts, responses), 6, mbs, overhead=overhead)
    assert [s for s, _ in bounds] == [0] + [e for _, e in bounds[:-1]] and bounds[-1][1] == len(rows)
    assert all(1 <= e - s <= mbs for s, e in bounds)
    least = min(_work(prompts, responses, c, overhead) for c in _compositions(len(rows), mbs))
    assert _work(prompts, responses, bounds, overhead) == least <= _work(prompts, responses, even_bounds(len(rows), mbs), overhead)


@given(b=st.integers(0, 40), mbs=st.integers(1, 9), p=st.integers(1, 4), r=st.integers(0, 6))
def test_rows_of_one_length_are_cut_every_micro_batch_size_rows(b, mbs, p, r):
    assert micro_batch_bounds(_mask([p] * b, [r] * b), 6, mbs) == even_bounds(b, mbs)


def test_one_long_row_among_short_ones_gets_a_micro_batch_of_its_own_unless_a_call_costs_more():
    """Fixed cuts of 4 would pad 3 short rows to the long row's 6 response columns (8 columns
    with the prompt): 15 token-columns more than a micro-batch of their own, if a call costs
    less than that."""
    mask = _mask([2] * 8, [6, 6, 6, 6, 6, 1, 1, 1])
    assert micro_batch_bounds(mask, 6, 4) == micro_batch_bounds(mask, 6, 4, overhead=14) == [(0, 4), (4, 5), (5, 8)]
    assert micro_batch_bounds(mask, 6, 4, overhead=16) == even_bounds(8, 4) == [(0, 4), (4, 8)]


def test_a_small_models_call_costs_many_rows_a_large_ones_less_than_one_and_a_gpus_is_not_guessed():
    """micro_batch_overhead: the embedded default's blocks (hidden 64) make a call cost ~300
    token-columns, a fifth of its whole batch's work (128 rows of <= 12 columns), so the batch is
    split only where that saves more; the bench's (hidden 256 x 4) ~30, less than one of its
    69-column rows (the floor of one row applies)."""
    tok = build_tokenizer()
    small = micro_batch_overhead(build_tiny_model(ModelConfig(), tok, seed=0))
    large = micro_batch_overhead(build_tiny_model(ModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512), tok, seed=0))
    assert 250 < small < 350 and 20 < large < 40
    assert micro_batch_overhead(torch.nn.Linear(3, 3)) == 0  # no transformer blocks
    assert micro_batch_overhead(torch.nn.Linear(3, 3, device="meta")) is None  # not on the CPU: not fitted there
    mask = _mask([2] * 8, [6, 6, 6, 6, 6, 1, 1, 1])
    assert micro_batch_bounds(mask, 6, 3, overhead=None) == even_bounds(8, 3)


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
