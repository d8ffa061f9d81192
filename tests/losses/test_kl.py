"""KL estimators, the KL loss term, the reward penalty and the controllers."""

from __future__ import annotations

import math

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput, UnknownNameError
from skyrl_fn.algorithm import compute_policy_loss
from skyrl_fn.losses import (
    KLController,
    kl_controller,
    kl_penalty_rewards,
    kl_token_loss,
)
from loss_batches import make_batch

F64 = torch.float64
NAMES = DEFAULT_TABLE.names("kl_estimator")


def test_registered_names():
    verl = {"kl", "kl+", "low_var_kl", "low_var_kl+", "mse+"}  # verl's kl_penalty names: aliases
    assert set(NAMES) == {"k1", "abs", "k2", "mse", "k3", "k1+", "abs+", "k2+", "k3+"} | verl
    fn = lambda n: DEFAULT_TABLE.get("kl_estimator", n)  # noqa: E731
    assert (fn("kl"), fn("kl+"), fn("low_var_kl"), fn("low_var_kl+"), fn("mse+")) == (fn("k1"), fn("k1+"), fn("k3"), fn("k3+"), fn("k2+"))


def test_hand_values_and_clamps():
    lp = torch.tensor([[-1.0, -2.0, -1.0, -60.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -1.0, -1.0]], dtype=F64)
    d = lp - ref  # 0.5, -1, 0, -59
    get = lambda n: DEFAULT_TABLE.get("kl_estimator", n)(lp, ref)  # noqa: E731
    torch.testing.assert_close(get("k1"), d)
    torch.testing.assert_close(get("abs"), d.abs())
    torch.testing.assert_close(get("k2"), 0.5 * d**2)
    torch.testing.assert_close(get("mse"), 0.5 * d**2)
    x = torch.tensor([-0.5, 1.0, 0.0, 20.0], dtype=F64)  # ref - lp, clamped to +-20
    k3 = (torch.exp(x) - x - 1).clamp(-10, 10)
    torch.testing.assert_close(get("k3")[0], k3)
    assert float(get("k3")[0, 3]) == 10.0  # the +-10 clamp
    assert float(get("k3")[0, 0]) == pytest.approx(math.exp(-0.5) + 0.5 - 1)


@pytest.mark.parametrize("base", ["k1", "abs", "k2", "k3"])
def test_straight_through_value_of_estimator_gradient_of_k2(base):
    lp = torch.tensor([[-1.0, -2.0, -0.3]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.2]], dtype=F64)
    plus = DEFAULT_TABLE.get("kl_estimator", base + "+")(lp, ref)
    torch.testing.assert_close(plus, DEFAULT_TABLE.get("kl_estimator", base)(lp, ref))
    (g,) = torch.autograd.grad(plus.sum(), lp)
    torch.testing.assert_close(g, (lp - ref).detach())  # d/dlp of (lp - ref)^2 / 2


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_shape_errors(name):
    fn = DEFAULT_TABLE.get("kl_estimator", name)
    lp = torch.tensor([[-1.0, -2.0, -0.3]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.2]], dtype=F64)
    if not name.endswith("+") or name == "k2+":
        assert torch.autograd.gradcheck(lambda x: fn(x, ref), (lp,))
    with pytest.raises(ValueError, match="ref_log_probs"):
        fn(lp, ref[:, :2])


def test_kl_token_loss_masks_and_feeds_compute_policy_loss():
    b = make_batch(3, 5, seed=3)
    m = b.loss_mask
    kl = kl_token_loss(b.log_probs, b.ref_log_probs, m, estimator=DEFAULT_TABLE.get("kl_estimator", "k3"))
    seen = []
    kl_token_loss(b.log_probs, b.ref_log_probs, m, estimator=lambda lp, ref: seen.append((lp, ref)) or lp - ref)
    ((lp_in, ref_in),) = seen  # the estimator never sees padding
    assert torch.equal(lp_in[~m], torch.zeros_like(lp_in[~m])) and torch.equal(ref_in[~m], torch.zeros_like(ref_in[~m]))
    with pytest.raises(TypeError, match="estimator"):
        kl_token_loss(b.log_probs, b.ref_log_probs, m, estimator="k3")
    assert torch.equal(kl[~m], torch.zeros_like(kl[~m]))
    (g,) = torch.autograd.grad(kl.sum(), b.log_probs)
    assert torch.equal(g[~m], torch.zeros_like(g[~m]))
    plain = compute_policy_loss(DEFAULT_TABLE, "regular", b)
    with_kl = compute_policy_loss(DEFAULT_TABLE, "regular", b, kl_loss_coef=0.1, kl_estimator="k3")
    expect = plain.loss + 0.1 * torch.where(m, kl, 0).sum() / m.sum()
    torch.testing.assert_close(with_kl.loss, expect)
    assert float(with_kl.metrics["kl_loss"]) > 0
    no_ref = PolicyLossInput(log_probs=b.log_probs, old_log_probs=b.old_log_probs, advantages=b.advantages, loss_mask=m)
    with pytest.raises(ValueError, match="ref_log_probs"):
        compute_policy_loss(DEFAULT_TABLE, "regular", no_ref, kl_loss_coef=0.1)
    with pytest.raises(UnknownNameError, match="unknown kl estimator 'k4'"):
        compute_policy_loss(DEFAULT_TABLE, "regular", b, kl_loss_coef=0.1, kl_estimator="k4")


def test_kl_penalty_rewards():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, float("nan"), 0.6]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = kl_penalty_rewards(r, kl, m, coef=0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, 0.85], [0.3, 0.0, 0.0]]))
    assert torch.equal(r, torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]]))  # not mutated
    with pytest.raises(ValueError, match="coef"):
        kl_penalty_rewards(r, kl, m, coef=-1.0)
    with pytest.raises(ValueError, match="kl"):
        kl_penalty_rewards(r, kl[:, :2], m, coef=0.5)


def test_the_controller_follows_ziegler_et_al():
    fixed = kl_controller("fixed", kl_loss_coef=0.01)
    assert fixed.update(5.0, 64) is fixed and fixed.coef == 0.01
    c = KLController(coef=0.1, kind="adaptive", target=6.0, horizon=10000)
    up = c.update(9.0, 256)  # error clipped to +0.2
    assert up.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert c.coef == 0.1  # frozen: the old controller is unchanged
    down = c.update(5.4, 100)  # error -0.1
    assert down.coef == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    assert c.update(torch.tensor(6.0), 100).coef == pytest.approx(0.1)
    assert c.update(0.0, 10).coef == pytest.approx(0.1 * (1 - 0.2 * 10 / 10000))
    with pytest.raises(ValueError, match="horizon"):
        KLController(kind="adaptive", horizon=0)
    with pytest.raises(ValueError, match="kind"):
        kl_controller("pid")
    with pytest.raises(ValueError, match="coef"):
        KLController(coef=-1.0)
    assert kl_controller() == KLController(coef=0.001, kind="fixed")
