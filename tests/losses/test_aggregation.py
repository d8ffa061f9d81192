"""Aggregations: hand-computed values, micro-batch exactness (hypothesis), bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.algorithm import compute_policy_loss
from skyrl_fn.losses import aggregate, aggregation_name
from skyrl_fn.losses import aggregation as agg
from skyrl_fn.losses import group_token_totals, prompt_mean, reduction_weights, token_mean, token_mean_legacy
from loss_batches import AGGREGATIONS, LOCAL_LOSSES, make_batch, rows

LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_hand_values():
    assert float(agg.token_mean(LOSS, MASK)) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(agg.token_sum(LOSS, MASK)) == pytest.approx(10.0)
    assert float(agg.seq_mean_token_sum(LOSS, MASK)) == pytest.approx((6 + 4 + 0) / 3)
    assert float(agg.seq_mean_token_mean(LOSS, MASK)) == pytest.approx((2 + 4 + 0) / 3)
    assert float(agg.seq_mean_token_sum_norm(LOSS, MASK)) == pytest.approx((6 + 4) / (3 * 4))
    assert float(agg.seq_mean_token_sum_norm(LOSS, MASK, max_seq_len=10)) == pytest.approx(10 / 30)
    assert float(agg.token_mean(LOSS, MASK, global_tokens=8)) == pytest.approx(10 / 8)
    assert float(agg.seq_mean_token_mean(LOSS, MASK, global_seqs=torch.tensor(6.0))) == pytest.approx(1.0)


def test_skyrl_names_and_padding_values():
    assert aggregation_name("sequence_mean") == "seq_mean_token_mean"
    assert aggregation_name("seq-mean-token-sum-norm") == "seq_mean_token_sum_norm"
    assert DEFAULT_TABLE.get("aggregation", "sequence_mean") is agg.seq_mean_token_mean
    dirty = LOSS.clone()
    dirty[~MASK] = float("nan")
    for mode in AGGREGATIONS:
        assert torch.isfinite(aggregate(dirty, MASK, mode))
    empty = torch.zeros_like(MASK)
    assert float(agg.token_mean(LOSS, empty)) == 0.0  # no valid token: 0, not NaN


def test_matches_skyrl_reduce_loss_formulas():
    # SkyRL-Train: token_mean = masked_mean; sequence_mean = masked_mean(dim=-1).mean();
    # seq_mean_token_sum_norm = (sum(loss * mask, -1) / max_seq_len).mean()
    m = MASK.to(LOSS.dtype)
    ref_tm = (LOSS * m).sum() / m.sum()
    ref_sm = ((LOSS * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    ref_norm = ((LOSS * m).sum(-1) / 7).mean()
    assert torch.allclose(aggregate(LOSS, MASK, "token_mean"), ref_tm)
    assert torch.allclose(aggregate(LOSS, MASK, "sequence_mean"), ref_sm)
    assert torch.allclose(aggregate(LOSS, MASK, "seq_mean_token_sum_norm", max_seq_len=7), ref_norm)


@st.composite
def splits(draw):
    b = draw(st.integers(2, 7))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    perm = draw(st.permutations(range(b)))
    n_cuts = draw(st.integers(0, b - 1))
    cuts = sorted(draw(st.lists(st.integers(1, b - 1), min_size=n_cuts, max_size=n_cuts, unique=True)))
    return b, t, seed, list(perm), cuts


@pytest.mark.parametrize("mode", AGGREGATIONS)
@given(case=splits(), loss_name=st.sampled_from(LOCAL_LOSSES))
def test_micro_batches_accumulate_to_the_full_batch_gradient(mode, case, loss_name):
    b, t, seed, perm, cuts = case
    batch = make_batch(b, t, seed=seed, mask_p=0.4)
    lp = batch.log_probs
    norms = dict(
        global_tokens=float(batch.loss_mask.sum()), global_seqs=float(b), max_seq_len=t + 3
    )
    full = compute_policy_loss(DEFAULT_TABLE, loss_name, batch, aggregation=mode, **norms).loss
    (g_full,) = torch.autograd.grad(full, lp)

    total = torch.zeros((), dtype=lp.dtype)
    g_acc = torch.zeros_like(lp)
    order = torch.tensor(perm)
    for chunk in torch.tensor_split(order, cuts):
        part = rows(batch, chunk, lp)
        loss = compute_policy_loss(DEFAULT_TABLE, loss_name, part, aggregation=mode, **norms).loss
        (g,) = torch.autograd.grad(loss, lp)
        g_acc += g
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_acc, g_full, rtol=1e-10, atol=1e-12)


def test_without_global_normalisers_micro_batches_differ():
    """The failure the global normalisers prevent: local token counts change the loss scale."""
    batch = make_batch(4, 6, seed=1, mask_p=0.5)
    full = compute_policy_loss(DEFAULT_TABLE, "regular", batch, aggregation="token_mean").loss
    halves = [rows(batch, torch.tensor(i), batch.log_probs) for i in ([0], [1, 2, 3])]
    local = sum(compute_policy_loss(DEFAULT_TABLE, "regular", h, aggregation="token_mean").loss for h in halves) / 2
    assert not torch.allclose(local, full)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"loss_mask: expected shape \[B, T\]"):
        agg.token_mean(LOSS, MASK[:, :3])
    with pytest.raises(ValueError, match="token_loss: expected shape"):
        agg.token_sum(LOSS[0], MASK[0])
    with pytest.raises(TypeError, match="token_loss"):
        agg.token_mean(LOSS.long(), MASK)
    with pytest.raises(ValueError, match="global_tokens"):
        agg.token_mean(LOSS, MASK, global_tokens=0)
    with pytest.raises(ValueError, match="global_seqs"):
        agg.seq_mean_token_sum(LOSS, MASK, global_seqs=-3.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        agg.seq_mean_token_sum_norm(LOSS, MASK, max_seq_len=0)
    with pytest.raises(ValueError, match=r"unknown aggregation 'seq_mean'.*Available"):
        aggregate(LOSS, MASK, "seq_mean")


# -- SkyRL 0.3.0's prompt_mean and token_mean_legacy -----------------------------------------------
def _random_loss(seed: int, b: int = 9, t: int = 6):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.6
    ids = torch.randint(0, 4, (b,), generator=gen) * 7 - 5  # arbitrary labels, prompts interleaved
    return loss, mask, ids


def test_prompt_mean_hand_values():
    loss = torch.tensor([[1.0, 3.0], [5.0, 0.0], [2.0, 2.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    # prompt 0 = rows 0, 1: tokens 1, 3, 5 -> mean 3; prompt 1 = row 2: mean 2; over prompts: 2.5
    assert float(prompt_mean(loss, mask, group_ids=torch.tensor([0, 0, 1]))) == pytest.approx(2.5)


@pytest.mark.parametrize("seed", range(10))
def test_prompt_mean_equals_skyrl_reduction_weights_and_is_exact_under_micro_batching(seed):
    loss, mask, ids = _random_loss(seed)
    full = prompt_mean(loss, mask, group_ids=ids)
    dense = torch.unique(ids, return_inverse=True)[1]
    w = reduction_weights(mask, reduction="prompt_mean", group_ids=dense).to(loss.dtype)
    torch.testing.assert_close(full, (torch.where(mask, loss, 0) * w).sum())
    tokens, groups = group_token_totals(mask, ids)
    for cuts in ([(0, 4), (4, 9)], [(0, 1), (1, 2), (2, 9)]):
        parts = sum(prompt_mean(loss[a:z], mask[a:z], group_ids=ids[a:z], group_tokens=tokens[a:z], global_groups=groups) for a, z in cuts)
        torch.testing.assert_close(parts, full)


def test_prompt_mean_needs_the_rows_prompts():
    with pytest.raises(ValueError, match="group_ids: expected the \\[B\\] prompt id"):
        prompt_mean(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("seed", range(10))
def test_token_mean_legacy_equals_skyrl_per_micro_batch_token_means(seed):
    loss, mask, _ = _random_loss(seed, b=12)
    for mbs in (1, 3, 4, 12):
        w = reduction_weights(mask, reduction="token_mean_legacy", micro_batch_size=mbs).to(loss.dtype)
        skyrl = (torch.where(mask, loss, 0) * w).sum()
        ours = sum(token_mean_legacy(loss[a:a + mbs], mask[a:a + mbs], global_seqs=12) for a in range(0, 12, mbs))
        torch.testing.assert_close(ours, skyrl)
    torch.testing.assert_close(token_mean_legacy(loss, mask), token_mean(loss, mask))  # one whole batch


def test_token_mean_legacy_is_micro_batch_dependent_and_does_not_promise_otherwise():
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    whole = token_mean_legacy(loss, mask)                                     # (3 + 4) / 4
    split = token_mean_legacy(loss[:1], mask[:1], global_seqs=2) + token_mean_legacy(loss[1:], mask[1:], global_seqs=2)
    assert float(whole) == pytest.approx(1.75) and float(split) == pytest.approx(2.5)  # (1 + 4) / 2
    assert "microbatch_invariant" not in DEFAULT_TABLE.entry("aggregation", "token_mean_legacy").promises
    assert "microbatch_invariant" in DEFAULT_TABLE.entry("aggregation", "prompt_mean").promises
