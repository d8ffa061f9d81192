"""Native pieces added for SkyRL 0.3.0's conventions: reduction weights (the mean moved into the
advantages), per-row sequence rejection, the DPPO-Binary keep mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput
from skyrl_fn.losses import REDUCTIONS, dppo, dppo_mask, reduction_weights, sequence_keep, sequence_mask


@st.composite
def masks(draw):
    b, t = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.rand(b, t, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.8]))


@given(masks(), st.integers(0, 2**16))
def test_weights_reproduce_the_native_aggregations(mask, seed):
    """sum(l m w) equals the aggregation of the same name, for any per-token loss l."""
    loss = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = mask.shape[1]
    for reduction, agg in (("token_mean", "token_mean"), ("sequence_mean", "seq_mean_token_mean"),
                           ("seq_mean_token_sum_norm", "seq_mean_token_sum_norm")):
        w = reduction_weights(mask, reduction=reduction, max_seq_len=t + 3).double()
        want = DEFAULT_TABLE.get("aggregation", agg)(loss, mask, max_seq_len=t + 3)
        torch.testing.assert_close((loss * mask * w).sum(), want)


@given(masks(), st.integers(1, 4))
def test_legacy_token_mean_and_prompt_mean_weights(mask, micro):
    b = mask.shape[0]
    m = mask.float()
    w = reduction_weights(mask, reduction="token_mean_legacy", micro_batch_size=micro)
    k = b // micro
    for j in range(k):  # every full micro-batch carries weight 1/k in total
        rows = slice(j * micro, (j + 1) * micro)
        assert float((m[rows] * w[rows]).sum()) == pytest.approx(1.0 / k if m[rows].sum() > 0 else 0.0, abs=1e-6)
    assert bool((w[k * micro:] == 0).all())  # rows past the last full micro-batch
    ids = torch.arange(b) % 3 - (torch.arange(b) == 0).long() * 10  # row 0 in no prompt (negative id)
    w = reduction_weights(mask, reduction="prompt_mean", group_ids=ids)
    present = sorted({int(i) for i in ids if i >= 0})
    for p in present:
        rows = ids == p
        assert float((m[rows] * w[rows]).sum()) == pytest.approx(1.0 / len(present) if m[rows].sum() > 0 else 0.0, abs=1e-6)
    assert bool((w[0] == 0).all())


def test_soft_masks_count_their_weight_and_errors_name_the_argument():
    soft = torch.tensor([[1.0, 0.5, 0.0]])
    torch.testing.assert_close(reduction_weights(soft), torch.full((1, 3), 1 / 1.5))
    assert set(REDUCTIONS) == {"token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm", "prompt_mean"}
    with pytest.raises(ValueError, match="reduction: expected one of .* got 'token_sum'"):
        reduction_weights(soft, reduction="token_sum")
    with pytest.raises(ValueError, match="max_seq_len: expected a positive int"):
        reduction_weights(soft, reduction="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="micro_batch_size: expected a positive int"):
        reduction_weights(soft, reduction="token_mean_legacy", micro_batch_size=0)
    with pytest.raises(ValueError, match="group_ids: expected a \\[B\\] tensor"):
        reduction_weights(soft, reduction="prompt_mean")


def test_sequence_keep_is_the_row_view_of_sequence_mask():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(5, 4, generator=g)
    rollout = old + torch.randn(5, 4, generator=g) * 0.3
    mask = torch.rand(5, 4, generator=g) > 0.3
    for metric, lo, hi in (("geometric", 0.9, 1.1), ("product", 0.7, 1.4), ("token", 0.6, 1.6)):
        keep, m1 = sequence_keep(old, rollout, mask, metric=metric, low=lo, high=hi)
        new, m2 = sequence_mask(old, rollout, mask, metric=metric, low=lo, high=hi)
        assert keep.shape == (5,) and torch.equal(new, mask & keep[:, None])
        assert {k: float(v) for k, v in m1.items()} == {k: float(v) for k, v in m2.items()}
    keep, _ = sequence_keep(old, rollout, torch.zeros_like(mask), metric="geometric", low=0.9, high=1.1)
    assert bool(keep.all())  # a row without valid tokens has ratio 1


def test_dppo_mask_matches_the_native_dppo_loss_and_keeps_zero_advantages():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(4, 6, generator=g) * 0.5 - 1
    lp = old + torch.randn(4, 6, generator=g) * 0.5
    adv = torch.randn(4, 6, generator=g)
    adv[0] = 0.0
    mask = torch.ones(4, 6, dtype=torch.bool)
    for divergence in ("tv", "kl"):
        keep = dppo_mask(lp, old, adv, divergence=divergence, delta_low=0.05, delta_high=0.1)
        assert bool(keep[0].all())
        batch = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask)
        out = dppo(batch, eps_clip_low=0.05, eps_clip_high=0.1, dppo_divergence=divergence)
        dropped = (out.token_loss == 0) & (adv != 0) & (lp != 0)
        assert torch.equal(dropped, ~keep & (adv != 0))
    with pytest.raises(ValueError, match="divergence: expected 'tv' or 'kl'"):
        dppo_mask(lp, old, adv, divergence="js")
    with pytest.raises(ValueError, match="delta_low"):
        dppo_mask(lp, old, adv, delta_low=-1.0)
