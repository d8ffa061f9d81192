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
