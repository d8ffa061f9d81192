"""Clipped value loss and entropy from logits."""

from __future__ import annotations

import pytest
import torch

from skyrl_fn.losses import aggregate, entropy_from_logits, value_loss

F64 = torch.float64


def test_value_loss_hand_values_and_clip_fraction():
    v = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 0.0]], dtype=F64)
    ret = torch.tensor([[0.0, 1.0, 3.0]], dtype=F64)
    m = torch.tensor([[1, 1, 1]])
    out = value_loss(v, old, ret, m, value_clip=0.2)
    # token 0: v=1, clip to 0.7: max(1, 0.49) = 1; token 1: 1 both; token 2: v=2 clip 0.2: max(1, 7.84)
    torch.testing.assert_close(out.token_loss, 0.5 * torch.tensor([[1.0, 1.0, 7.84]], dtype=F64))
    assert float(out.metrics["vf_clip_frac"]) == pytest.approx(1 / 3)
    (g,) = torch.autograd.grad(out.token_loss.sum(), v)
    torch.testing.assert_close(g, torch.tensor([[1.0, -1.0, 0.0]], dtype=F64))  # clipped token: no gradient
    unclipped = value_loss(v, old, ret, m, value_clip=None)
    torch.testing.assert_close(unclipped.token_loss, 0.5 * torch.tensor([[1.0, 1.0, 1.0]], dtype=F64))
    # SkyRL's ppo_critic_loss reduction is sequence_mean
    assert float(aggregate(out.token_loss, m, "sequence_mean").detach()) == pytest.approx(0.5 * 9.84 / 3)


def test_value_loss_masking_gradcheck_and_errors():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    old, ret = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    m = torch.rand(3, 4, generator=g) > 0.3
    out = value_loss(v, old, ret, m)
    assert torch.equal(out.token_loss[~m], torch.zeros_like(out.token_loss[~m]))
    assert torch.autograd.gradcheck(lambda x: value_loss(x, old, ret, m).token_loss, (v,))
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, old, ret[:, :2], m)
    with pytest.raises(ValueError, match="value_clip"):
        value_loss(v, old, ret, m, value_clip=-1.0)
    bad = ret.clone()
    bad[m] = float("nan")
    with pytest.raises(ValueError, match="returns: expected finite"):
        value_loss(v, old, bad, m)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, float("-inf"), 0.0]]], dtype=F64)
    h = entropy_from_logits(logits)
    assert h.shape == (1, 2)
    assert float(h[0, 0]) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    p = torch.softmax(logits[0, 1], -1)
    ref = -(p[p > 0] * p[p > 0].log()).sum()
    assert float(h[0, 1]) == pytest.approx(float(ref))
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_logits, (x,))
    torch.testing.assert_close(entropy_from_logits(x), torch.distributions.Categorical(logits=x).entropy())
    with pytest.raises(TypeError, match="logits"):
        entropy_from_logits(torch.zeros(2, 3, dtype=torch.long))
