"""Policy losses: hand-computed values, gradcheck, masking, the ratio-1 special case, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput, PolicyLossOutput, UnknownNameError
from skyrl_fn.algorithm import compute_policy_loss
from skyrl_fn.losses import pg, ppo
from loss_batches import POLICY_LOSSES, make_batch, with_log_probs

T64 = torch.float64

# hyperparameters that make every loss exercise its special branch on the small random batches
BRANCHY = {"clip_cov": {"clip_cov_lb": -10.0, "clip_cov_ub": 10.0, "clip_cov_ratio": 0.2}}


def single_row(log_ratio, adv, *, lp=None, mask=None) -> PolicyLossInput:
    """One row with the given per-token log-ratio ``log_probs - old_log_probs`` and advantages."""
    log_ratio = torch.tensor(log_ratio, dtype=T64)[None]
    lp = torch.full_like(log_ratio, -1.0) if lp is None else torch.tensor(lp, dtype=T64)[None]
    lp = lp.clone().requires_grad_()
    m = torch.ones_like(log_ratio, dtype=torch.bool) if mask is None else torch.tensor(mask)[None]
    return PolicyLossInput(
        log_probs=lp, old_log_probs=lp.detach() - log_ratio, advantages=torch.tensor(adv, dtype=T64)[None], loss_mask=m
    )


def grad(out: PolicyLossOutput, batch: PolicyLossInput) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.token_loss.sum(), batch.log_probs)
    return g


# -- hand-computed values ------------------------------------------------------------------


def test_regular_hand_values_and_clip_metrics():
    ln = math.log
    b = single_row([ln(1.5), ln(0.5), ln(0.5), ln(1.5)], [1.0, 1.0, -1.0, -1.0])
    out = ppo.regular(b, eps_clip_low=0.2, eps_clip_high=0.2)
    torch.testing.assert_close(out.token_loss[0], torch.tensor([-1.2, -0.5, 0.8, 1.5], dtype=T64))
    g = grad(out, b)[0]
    # clipped tokens (0: A>0 above 1.2; 2: A<0 below 0.8) have no gradient; the others -A r
    torch.testing.assert_close(g, torch.tensor([0.0, -0.5, 0.0, 1.5], dtype=T64))
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(0.25)
    assert float(out.metrics["clip_frac_low"]) == pytest.approx(0.25)
    assert float(out.metrics["clip_ratio"]) == pytest.approx(0.5)
    assert float(out.metrics["ratio_max"]) == pytest.approx(1.5)
    assert float(out.metrics["ratio_min"]) == pytest.approx(0.5)
    assert float(out.metrics["approx_kl"]) == pytest.approx(-(2 * ln(1.5) + 2 * ln(0.5)) / 4)


def test_asymmetric_clip_higher():
    b = single_row([math.log(1.25)], [1.0])
    assert float(ppo.regular(b, eps_clip_high=0.28).token_loss.detach()) == pytest.approx(-1.25)
    assert float(ppo.regular(b, eps_clip_high=0.2).token_loss.detach()) == pytest.approx(-1.2)


def test_dual_clip_bounds_negative_advantages_only():
    b = single_row([math.log(4.0), math.log(4.0)], [-1.0, 1.0])
    out = ppo.dual_clip(b, clip_ratio_c=3.0)
    torch.testing.assert_close(out.token_loss[0], torch.tensor([3.0, -1.2], dtype=T64))
    assert float(out.metrics["clip_frac_dual"]) == pytest.approx(0.5)
    assert torch.equal(grad(out, b), torch.zeros(1, 2, dtype=T64))
    assert torch.allclose(ppo.regular(b).token_loss[0, 0], torch.tensor(4.0, dtype=T64))


def test_cispo_weight_is_clipped_ratio_without_gradient():
    b = single_row([math.log(0.5), math.log(7.0)], [2.0, 1.0], lp=[-1.0, -0.5])
    out = pg.cispo(b)  # SkyRL defaults: low 0 -> bound 1, high 5 -> bound 6
    torch.testing.assert_close(out.token_loss[0], torch.tensor([2.0, 3.0], dtype=T64))
    torch.testing.assert_close(grad(out, b)[0], torch.tensor([-2.0, -6.0], dtype=T64))
    assert float(out.metrics["clip_frac_low"]) == pytest.approx(0.5)
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(0.5)


def test_sapo_gate_at_ratio_one_matches_plain_policy_gradient():
    b = single_row([0.0, 0.0], [1.0, -2.0])
    out = ppo.sapo(b, tau_pos=1.0, tau_neg=1.05)
    # gate(1) = sigmoid(0) * 4 / tau = 2 / tau
    torch.testing.assert_close(out.token_loss[0], torch.tensor([-2.0, 2.0 * 2.0 / 1.05], dtype=T64))
    torch.testing.assert_close(grad(out, b)[0], torch.tensor([-1.0, 2.0], dtype=T64))
    far = single_row([math.log(3.0)], [1.0])
    g = grad(ppo.sapo(far), far)[0, 0]
    # unclipped PPO would give -A r = -3 here; the soft gate damps it: -4 sigmoid'(2) r = -1.26
    assert float(g) == pytest.approx(-4 * 3 * math.exp(-2) / (1 + math.exp(-2)) ** 2)


def test_gspo_uses_the_sequence_ratio():
    up = single_row([0.2, 0.4], [1.0, 1.0])
    out = ppo.gspo(up)
    torch.testing.assert_close(out.token_loss[0], torch.tensor([-1.2, -1.2], dtype=T64))  # s = e^0.3 > 1.2
    assert torch.equal(grad(out, up), torch.zeros(1, 2, dtype=T64))
    down = single_row([0.2, 0.4], [-1.0, -1.0])
    out = ppo.gspo(down)
    s = math.exp(0.3)
    torch.testing.assert_close(out.token_loss[0], torch.tensor([s, s], dtype=T64))
    torch.testing.assert_close(grad(out, down)[0], torch.tensor([s, s], dtype=T64))


def test_geo_mean_clips_log_ratios_by_advantage_sign():
    pos = single_row([0.1, 0.5], [1.0, 1.0])
    out = ppo.geo_mean(pos, eps_clip_low=0.2, eps_clip_high=0.2)
    torch.testing.assert_close(out.token_loss[0], torch.full((2,), -math.exp(0.15), dtype=T64))
    neg = single_row([0.1, 0.5], [-1.0, -1.0])
    out = ppo.geo_mean(neg, eps_clip_low=0.2, eps_clip_high=0.2)
    torch.testing.assert_close(out.token_loss[0], torch.full((2,), math.exp(0.3), dtype=T64))
    # with sequence_mean aggregation the result is verl's mean over sequences of -Abar R
    r = compute_policy_loss(DEFAULT_TABLE, "geo_mean", neg, aggregation="sequence_mean")
    assert float(r.loss.detach()) == pytest.approx(math.exp(0.3))


def test_plain_gradients_reinforce_gpg_cross_entropy_importance_sampling():
    b = single_row([0.0, math.log(2.0)], [1.5, -1.0], lp=[-0.5, -2.0])
    for fn in (pg.reinforce, pg.gpg):
        torch.testing.assert_close(fn(b).token_loss[0], torch.tensor([0.75, -2.0], dtype=T64))
    torch.testing.assert_close(pg.cross_entropy(b).token_loss[0], torch.tensor([0.5, 2.0], dtype=T64))
    out = pg.importance_sampling(b)
    torch.testing.assert_close(out.token_loss[0], torch.tensor([-1.5, 2.0], dtype=T64))
    assert float(out.metrics["importance_ratio"]) == pytest.approx(1.5)


def test_rollout_is_zeroes_tokens_outside_the_trust_interval():
    lp = torch.tensor([[-1.0, -1.0, -1.0]], dtype=T64, requires_grad=True)
    roll = lp.detach() - torch.tensor([[math.log(1.1), math.log(1.5), math.log(0.5)]], dtype=T64)
    b = PolicyLossInput(
        log_probs=lp, old_log_probs=lp.detach(), advantages=torch.ones(1, 3, dtype=T64),
        loss_mask=torch.ones(1, 3, dtype=torch.bool), rollout_log_probs=roll,
    )
    out = pg.rollout_is(b)
    torch.testing.assert_close(out.token_loss[0], torch.tensor([1.1, 0.0, 0.0], dtype=T64))
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(1 / 3)
    assert float(out.metrics["clip_frac_low"]) == pytest.approx(1 / 3)


def test_dppo_drops_tokens_that_moved_too_far():
    # p_old = 0.5 -> p = 0.9 (moved +0.4 > 0.2) is dropped for A > 0, kept for A < 0
    lp = torch.tensor([[math.log(0.9), math.log(0.9), math.log(0.6)]], dtype=T64, requires_grad=True)
    old = torch.full((1, 3), math.log(0.5), dtype=T64)
    b = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=torch.tensor([[1.0, -1.0, 1.0]], dtype=T64),
                        loss_mask=torch.ones(1, 3, dtype=torch.bool))
    out = ppo.dppo(b)
    expect = torch.tensor([0.0, 1.8 * math.log(0.9), -1.2 * math.log(0.6)], dtype=T64)
    torch.testing.assert_close(out.token_loss[0], expect)
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(1 / 3)
    kl = ppo.dppo(b, dppo_divergence="kl", eps_clip_high=0.05)
    assert float(kl.token_loss[0, 0]) == 0.0 and float(kl.token_loss[0, 1]) != 0.0


def test_kl_cov_penalises_the_top_covariance_token():
    lp = torch.tensor([[-0.1, -1.0, -2.0, -3.0, -0.5]], dtype=T64, requires_grad=True)
    adv = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.1]], dtype=T64)
    old = lp.detach() - 0.1
    b = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=torch.ones(1, 5, dtype=torch.bool))
    out = DEFAULT_TABLE.policy_loss("kl_cov")(b, kl_cov_frac=0.2, ppo_kl_coef=1.0)  # k = 1 token
    base = -adv * math.exp(0.1)
    expect = base.clone()
    expect[0, 0] += 0.1  # token 0 has the largest (A - mean A)(lp - mean lp)
    torch.testing.assert_close(out.token_loss, expect)
    assert float(out.metrics["kl_cov_selected_frac"]) == pytest.approx(0.2)


def test_clip_cov_is_seeded_and_detaches_the_selected_tokens():
    b = make_batch(6, 10, seed=3, spread=0.05)
    fn = DEFAULT_TABLE.policy_loss("clip_cov")
    hyper = dict(clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_cov_ratio=0.1)
    out1, out2 = fn(b, **hyper), fn(b, **hyper)
    assert torch.equal(out1.token_loss, out2.token_loss)
    n_valid = int(b.loss_mask.sum())
    n_sel = round(float(out1.metrics["cov_clip_frac"]) * n_valid)
    assert n_sel == max(int(0.1 * n_valid), 1)
    reg = ppo.regular(b)
    dropped = (out1.token_loss == 0) & (reg.token_loss != 0)
    assert int(dropped.sum()) == n_sel
    g = grad(out1, b)
    assert torch.equal(g[dropped], torch.zeros_like(g[dropped]))
    others = [fn(b, clip_cov_seed=s, **hyper).token_loss for s in range(1, 6)]
    assert any(not torch.equal(o, out1.token_loss) for o in others)


# -- properties of every registered loss ---------------------------------------------------------


# Losses with a stop-gradient coefficient (their gradient is by design not the derivative of their
# value): gradcheck them where the coefficient is locally constant, and check the surrogate gradient
# against its formula in test_stop_gradient_surrogates.
FROZEN = {
    "cispo": {"cispo_eps_clip_low": 0.0, "cispo_eps_clip_high": 0.0},  # weight clamp(r, 1, 1) = 1
    "dppo": {"dppo_ratio_cap": 1e-3},  # weight min(r, 1e-3) = 1e-3
    "rollout_is": {"eps_clip_low": 0.0, "eps_clip_high": 0.0},  # empty interval (1, 1): weight 0
}


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_gradcheck_float64(name):
    batch = make_batch(3, 5, seed=11)
    if name == "gspo":  # one valid token per row: sequence ratio = token ratio, no stop-gradient gap
        batch = PolicyLossInput(log_probs=batch.log_probs, old_log_probs=batch.old_log_probs,
                                advantages=batch.advantages, loss_mask=torch.arange(5)[None, :].expand(3, 5) == 0)
    fn = DEFAULT_TABLE.policy_loss(name)
    hyper = {**BRANCHY.get(name, {}), **FROZEN.get(name, {})}
    lp0 = batch.log_probs.detach().clone().requires_grad_()

    def f(lp):
        return fn(with_log_probs(batch, lp), **hyper).token_loss

    assert torch.autograd.gradcheck(f, (lp0,), eps=1e-6, atol=1e-5)


def test_stop_gradient_surrogates():
    b = make_batch(4, 6, seed=21, spread=0.4)
    m, adv = b.loss_mask, b.advantages
    lp, old, roll = b.log_probs.detach(), b.old_log_probs, b.rollout_log_probs
    r = torch.exp(lp - old)

    def g(name, **hyper):
        return grad(DEFAULT_TABLE.policy_loss(name)(b, **hyper), b)

    torch.testing.assert_close(g("cispo", cispo_eps_clip_low=0.1, cispo_eps_clip_high=0.1),
                               torch.where(m, -adv * r.clamp(0.9, 1.1), 0))
    r_roll = torch.exp(lp - roll)
    keep = (r_roll > 0.8) & (r_roll < 1.2)
    torch.testing.assert_close(g("rollout_is"), torch.where(m & keep, -adv * r_roll, 0))
    valid = torch.where(adv > 0, lp.exp() - old.exp() <= 0.2, lp.exp() - old.exp() >= -0.2)
    torch.testing.assert_close(g("dppo", dppo_ratio_cap=1.5), torch.where(m & valid, -adv * r.clamp(max=1.5), 0))
    seq = torch.exp(torch.where(m, lp - old, 0).sum(-1, keepdim=True) / m.sum(-1, keepdim=True))
    clipped = ((adv > 0) & (seq > 1.2)) | ((adv < 0) & (seq < 0.8))
    torch.testing.assert_close(g("gspo"), torch.where(m & ~clipped, -adv * seq, 0))


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_gradient_exactly_zero_at_masked_tokens_even_with_nan_padding(name):
    batch = make_batch(4, 7, seed=5)
    pad = ~batch.loss_mask
    lp = torch.where(pad, torch.full_like(batch.log_probs, float("nan")), batch.log_probs.detach()).requires_grad_()
    old = torch.where(pad, torch.full_like(lp, float("-inf")), batch.old_log_probs)
    dirty = PolicyLossInput(
        log_probs=lp, old_log_probs=old, advantages=torch.where(pad, float("nan"), batch.advantages),
        loss_mask=batch.loss_mask, rollout_log_probs=torch.where(pad, float("nan"), batch.rollout_log_probs),
    )
    out = DEFAULT_TABLE.policy_loss(name)(dirty, **BRANCHY.get(name, {}))
    assert torch.equal(out.token_loss[pad], torch.zeros_like(out.token_loss[pad]))
    assert torch.isfinite(out.token_loss).all()
    (g,) = torch.autograd.grad(out.token_loss.sum(), lp)
    assert torch.equal(g[pad], torch.zeros_like(g[pad]))
    assert torch.isfinite(g).all()
    for key, value in out.metrics.items():
        assert torch.isfinite(value), key


@pytest.mark.parametrize("name", [n for n in POLICY_LOSSES if n != "cross_entropy"])
def test_ratio_one_and_zero_advantages_give_zero_loss_and_gradient(name):
    base = make_batch(3, 6, seed=2)
    lp = base.log_probs.detach().clone().requires_grad_()
    batch = PolicyLossInput(
        log_probs=lp, old_log_probs=lp.detach().clone(), advantages=torch.zeros_like(lp),
        loss_mask=base.loss_mask, rollout_log_probs=lp.detach().clone(),
    )
    out = DEFAULT_TABLE.policy_loss(name)(batch)
    assert torch.equal(out.token_loss, torch.zeros_like(out.token_loss))
    (g,) = torch.autograd.grad(out.token_loss.sum(), lp)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("name", ["regular", "dual_clip", "gspo", "cispo", "dppo", "sapo", "geo_mean", "rollout_is"])
def test_ratio_one_gives_the_plain_policy_gradient(name):
    base = make_batch(3, 6, seed=4)
    lp = base.log_probs.detach().clone().requires_grad_()
    batch = PolicyLossInput(log_probs=lp, old_log_probs=lp.detach().clone(), advantages=base.advantages,
                            loss_mask=base.loss_mask, rollout_log_probs=lp.detach().clone())
    (g,) = torch.autograd.grad(DEFAULT_TABLE.policy_loss(name)(batch).token_loss.sum(), lp)
    m, adv = batch.loss_mask, batch.advantages
    if name == "geo_mean":  # sequence-level: d/dlp_t of -Abar exp(mean d) at d = 0 is -Abar / n
        n = m.sum(-1, keepdim=True).to(T64)  # each of the n tokens carries -Abar R, R' = R / n
        expect = torch.where(m, -torch.where(m, adv, 0).sum(-1, keepdim=True) / n, 0)
    else:
        expect = torch.where(m, -adv, 0)
    torch.testing.assert_close(g, expect)


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_conformance(name):
    fn = DEFAULT_TABLE.policy_loss(name)
    assert fn.__doc__ and len(fn.__doc__) > 100
    batch = make_batch(3, 5, seed=8, dtype=torch.float32)
    before = [x.detach().clone() for x in (batch.log_probs, batch.old_log_probs, batch.advantages)]
    out1, out2 = fn(batch), fn(batch)
    assert isinstance(out1, PolicyLossOutput)
    assert out1.token_loss.shape == (3, 5) and out1.token_loss.dtype == torch.float32
    assert torch.equal(out1.token_loss, out2.token_loss)
    for x, y in zip(before, (batch.log_probs, batch.old_log_probs, batch.advantages)):
        assert torch.equal(x, y)
    for key in ("ratio_mean", "ratio_min", "ratio_max", "approx_kl", "clip_frac_low", "clip_frac_high", "clip_ratio"):
        v = out1.metrics[key]
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), key
    hyper = DEFAULT_TABLE.entry("policy_loss", name).hyperparameters()
    assert hyper is not None and all(not k.startswith("_") for k in hyper)


# -- bad inputs ---------------------------------------------------------------------------------


def test_shape_mismatch_and_nan_log_probs_name_the_field():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_log_probs"):
        PolicyLossInput(log_probs=lp, old_log_probs=torch.zeros(2, 4), advantages=lp, loss_mask=torch.ones(2, 3))
    bad = lp.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"log_probs: expected finite values, got NaN/inf in row 1"):
        PolicyLossInput(log_probs=bad, old_log_probs=lp, advantages=lp, loss_mask=torch.ones(2, 3))


def test_unknown_loss_aggregation_or_hyperparameter():
    batch = make_batch()
    with pytest.raises(UnknownNameError, match=r"unknown policy loss 'regulr'; did you mean 'regular'"):
        compute_policy_loss(DEFAULT_TABLE, "regulr", batch)
    with pytest.raises(UnknownNameError, match=r"unknown aggregation 'tokenmean'.*token_mean"):
        compute_policy_loss(DEFAULT_TABLE, "regular", batch, aggregation="tokenmean")
    with pytest.raises(ValueError, match=r"hyperparameter 'eps_clip'.*eps_clip_high"):
        compute_policy_loss(DEFAULT_TABLE, "regular", batch, hyper={"eps_clip": 0.1})
    with pytest.raises(TypeError, match="batch: expected a PolicyLossInput"):
        compute_policy_loss(DEFAULT_TABLE, "regular", {"log_probs": batch.log_probs})


@pytest.mark.parametrize(
    "name, hyper, field",
    [
        ("regular", {"eps_clip_low": -0.1}, "eps_clip_low"),
        ("dual_clip", {"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ("sapo", {"tau_neg": 0.0}, "tau_neg"),
        ("cispo", {"cispo_eps_clip_high": float("nan")}, "cispo_eps_clip_high"),
        ("dppo", {"dppo_divergence": "js"}, "dppo_divergence"),
        ("clip_cov", {"clip_cov_ratio": 0.0}, "clip_cov_ratio"),
        ("kl_cov", {"kl_cov_frac": 2.0}, "kl_cov_frac"),
    ],
)
def test_bad_hyperparameters_name_the_argument(name, hyper, field):
    with pytest.raises(ValueError, match=field):
        DEFAULT_TABLE.policy_loss(name)(make_batch(), **hyper)


def test_rollout_is_without_rollout_log_probs_uses_the_old_policy():
    b = make_batch()
    plain = PolicyLossInput(log_probs=b.log_probs, old_log_probs=b.old_log_probs, advantages=b.advantages,
                            loss_mask=b.loss_mask)
    same = PolicyLossInput(log_probs=b.log_probs, old_log_probs=b.old_log_probs, advantages=b.advantages,
                           loss_mask=b.loss_mask, rollout_log_probs=b.old_log_probs)
    assert torch.equal(pg.rollout_is(plain).token_loss, pg.rollout_is(same).token_loss)


def test_float32_and_bfloat16_inputs_keep_their_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        b = make_batch(2, 4, dtype=dtype)
        out = ppo.regular(b)
        assert out.token_loss.dtype == dtype
