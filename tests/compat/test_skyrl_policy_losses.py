"""SkyRL's built-in policy losses through the façade, both eras, against per-token formulas written
out here: SkyRL 0.3.0 returns the masked sum and a metrics dict, the seed era the reduction named
by ``config.loss_reduction`` and a float clip ratio."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.compat import (
    LOSSES_WITH_OLD_LOGPROBS,
    LOSSES_WITHOUT_OLD_LOGPROBS,
    AlgorithmConfig,
    CISPOConfig,
    ClipCovConfig,
    DPPOConfig,
    KLCovConfig,
    OffPolicyCorrectionConfig,
    PolicyLossRegistry,
    PolicyLossType,
    SAPOConfig,
    compute_policy_loss_clip_cov,
    dppo_policy_loss,
    register_policy_loss,
    rollout_is_policy_loss,
)
from skyrl_fn.compat import skyrl_train

LO, HI, C = 0.15, 0.25, 2.5


@pytest.fixture(autouse=True)
def clean_registries():
    PolicyLossRegistry.reset()
    skyrl_train.PolicyLossRegistry.reset()
    yield
    PolicyLossRegistry.reset()
    skyrl_train.PolicyLossRegistry.reset()


def data(seed: int, b: int = 3, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5 - 1.5
    lp = (old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    rollout = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    return lp, old, rollout, adv, mask


def config(name: str, **more) -> AlgorithmConfig:
    return AlgorithmConfig(
        policy_loss_type=name, eps_clip_low=LO, eps_clip_high=HI, clip_ratio_c=C,
        sapo=SAPOConfig(tau_pos=0.8, tau_neg=1.3), cispo=CISPOConfig(cispo_eps_clip_low=0.1, cispo_eps_clip_high=0.4),
        dppo=DPPOConfig(dppo_type=more.pop("dppo_type", "binary_tv"), delta_low=0.05, delta_high=0.08), **more,
    )


def per_token(name, lp, old, rollout, adv):
    """(per-token loss, clipped-or-masked indicator) as each loss is defined."""
    r = torch.exp(lp - old)
    if name in ("regular", "dual_clip"):
        l1, l2 = -adv * r, -adv * r.clamp(1 - LO, 1 + HI)
        loss = torch.maximum(l1, l2)
        if name == "dual_clip":
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * C), loss)
        return loss, l2 > l1
    if name == "gspo":
        s_log = (lp - old).mean(dim=-1, keepdim=True)  # recomputed below with the mask by the caller
        raise AssertionError(s_log)
    if name == "cispo":
        w = r.detach().clamp(1 - 0.1, 1 + 0.4)
        return -adv * w * lp, (r < 0.9) | (r > 1.4)
    if name == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, 0.8), torch.full_like(adv, 1.3))
        return -torch.sigmoid(tau * (r - 1)) * 4 / tau * adv, torch.zeros_like(adv, dtype=torch.bool)
    if name == "rollout_is":
        rr = torch.exp(lp - rollout)
        inside = (rr > 1 - LO) & (rr < 1 + HI)
        return -(torch.where(inside, rr, 0.0).detach() * adv * lp), ~inside
    if name in ("binary_tv", "binary_kl"):
        mu = rollout
        p, q = torch.exp(lp.detach()), torch.exp(mu)
        if name == "binary_tv":
            drop = ((adv > 0) & (p - q > 0.08)) | ((adv < 0) & (q - p > 0.05))
        else:
            d = q * (mu - lp.detach()) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
            drop = ((adv > 0) & (p > q) & (d > 0.08)) | ((adv < 0) & (p < q) & (d > 0.05))
        return -(torch.exp(lp - mu) * adv * (~drop).double()), drop
    if name == "cross_entropy":
        return -lp, torch.zeros_like(adv, dtype=torch.bool)
    if name == "importance_sampling":
        return -(r * adv), torch.zeros_like(adv, dtype=torch.bool)
    raise KeyError(name)


def gspo_token(lp, old, adv, mask):
    s = torch.exp(torch.clamp(((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True), max=10)).detach()
    s = s * torch.exp(lp - lp.detach())
    l1, l2 = -adv * s, -adv * s.clamp(1 - LO, 1 + HI)
    return torch.maximum(l1, l2), l2 > l1


NAMES = ["regular", "dual_clip", "gspo", "cispo", "sapo", "rollout_is", "cross_entropy", "importance_sampling"]


@given(st.integers(0, 2**16), st.sampled_from(NAMES))
def test_030_losses_are_the_masked_sum_of_the_per_token_formula(seed, name):
    lp, old, rollout, adv, mask = data(seed)
    if name == "gspo":
        want_tok, clipped = gspo_token(lp, old, adv, mask)
    else:
        want_tok, clipped = per_token(name, lp, old, rollout, adv)
    loss, metrics = PolicyLossRegistry.get(name)(lp, old, adv, config(name), mask, rollout if name == "rollout_is" else None)
    want = (want_tok * mask).sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(want, lp)[0])
    if name == "importance_sampling":
        ratio = torch.exp(lp - old).detach()
        assert metrics == {"importance_ratio": pytest.approx(float((ratio * mask).sum() / mask.sum()))}
    elif name in ("sapo", "cross_entropy"):
        assert metrics == {"clip_ratio": 0.0}
    else:
        assert metrics["clip_ratio"] == pytest.approx(float((clipped.double() * mask).sum() / mask.sum()))
    # the seed era: the same per-token loss, reduced inside, and a float clip ratio
    if name in skyrl_train.PolicyLossRegistry._skyrl_defaults:
        for reduction, reduce in (
            ("token_mean", lambda x: (x * mask).sum() / mask.sum()),
            ("sequence_mean", lambda x: ((x * mask).sum(-1) / mask.sum(-1)).mean()),
            ("seq_mean_token_sum_norm", lambda x: (x * mask).sum(-1).mean() / 9),
        ):
            cfg = dataclasses.replace(config(name), loss_reduction=reduction, max_seq_len=9)
            seed_loss, clip = skyrl_train.PolicyLossRegistry.get(name)(lp, old, adv, cfg, mask)
            torch.testing.assert_close(seed_loss, reduce(want_tok))
            assert isinstance(clip, float)


@pytest.mark.parametrize("dppo_type", ["binary_tv", "binary_kl"])
def test_dppo_masks_by_divergence_against_the_rollout_policy(dppo_type):
    lp, old, rollout, adv, mask = data(5, b=4, t=6)
    cfg = config("dppo", dppo_type=dppo_type)
    want_tok, drop = per_token(dppo_type, lp, old, rollout, adv)
    loss, metrics = PolicyLossRegistry.get("dppo")(lp, old, adv, cfg, mask, rollout)
    torch.testing.assert_close(loss, (want_tok * mask).sum())
    assert metrics["clip_ratio"] == pytest.approx(float((drop.double() * mask).sum() / mask.sum()))
    without, _ = dppo_policy_loss(lp, old, adv, cfg, mask, None)  # mu = old without rollout log-probs
    assert not torch.allclose(loss, without)
    assert PolicyLossType.DPPO == "dppo" and PolicyLossType("dppo") is PolicyLossType.DPPO


def test_dppo_type_is_checked_where_it_enters():
    with pytest.raises(ValueError, match="dppo.dppo_type: expected 'binary_tv' or 'binary_kl', got 'tv'"):
        DPPOConfig(dppo_type="tv")
    lp, old, rollout, adv, mask = data(0)
    with pytest.raises(ValueError, match="dppo.dppo_type: Unknown DPPO type: 'kl'"):
        dppo_policy_loss(lp, old, adv, {"dppo": {"dppo_type": "kl"}}, mask, rollout)


@pytest.mark.parametrize("loss_fn", [rollout_is_policy_loss, dppo_policy_loss])
def test_skip_path_losses_run_without_old_log_probs(loss_fn):
    lp, _, rollout, adv, mask = data(1)
    loss, _ = loss_fn(lp, None, adv, AlgorithmConfig(policy_loss_type="x"), mask, rollout)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="^old_log_probs: expected a \\[B, T\\] tensor when off_policy_correction"):
        loss_fn(lp, None, adv, AlgorithmConfig(off_policy_correction=OffPolicyCorrectionConfig(tis_ratio_type="token")), mask, rollout)
    assert {"rollout_is", "dppo"} == set(LOSSES_WITHOUT_OLD_LOGPROBS)
    assert "regular" in LOSSES_WITH_OLD_LOGPROBS and not LOSSES_WITH_OLD_LOGPROBS & LOSSES_WITHOUT_OLD_LOGPROBS
    with pytest.raises(ValueError, match="^old_log_probs: policy loss 'regular' expected"):
        PolicyLossRegistry.get("regular")(lp, None, adv, AlgorithmConfig(), mask, rollout)
    with pytest.raises(ValueError, match="^rollout_logprobs: rollout_is expected"):
        rollout_is_policy_loss(lp, lp.detach(), adv, AlgorithmConfig(), mask, None)


def test_clip_cov_draws_from_the_global_rng_and_kl_cov_reports_no_clipping():
    lp, old, _, adv, mask = data(2, b=4, t=8)
    cfg = AlgorithmConfig(policy_loss_type="clip_cov", clip_cov=ClipCovConfig(clip_ratio=0.5, clip_cov_lb=-5.0, clip_cov_ub=5.0))
    torch.manual_seed(42)
    a, ma = compute_policy_loss_clip_cov(lp, old, adv, cfg, mask)
    torch.manual_seed(42)
    b, _ = compute_policy_loss_clip_cov(lp, old, adv, cfg, mask)
    torch.testing.assert_close(a, b)  # reproducible under torch.manual_seed, as SkyRL's randperm
    regular, _ = PolicyLossRegistry.get("regular")(lp, old, adv, AlgorithmConfig(), mask)
    assert not torch.allclose(a, regular) and 0 < ma["clip_ratio"] <= 1
    kl_cfg = AlgorithmConfig(policy_loss_type="kl_cov", kl_cov=KLCovConfig(kl_cov_frac=0.5, ppo_kl_coef=1.0))
    kl_loss, kl_metrics = PolicyLossRegistry.get("kl_cov")(lp, old, adv, kl_cfg, mask)
    assert kl_metrics == {"clip_ratio": 0.0} and torch.isfinite(kl_loss)


def test_off_policy_correction_config_changes_the_loss_and_use_tis_is_translated():
    lp, old, rollout, adv, mask = data(4)
    tis = OffPolicyCorrectionConfig(tis_ratio_type="token", token_tis_ratio_clip_high=1.1)
    plain, _ = PolicyLossRegistry.get("regular")(lp, old, adv, AlgorithmConfig(), mask, rollout)
    cfg = AlgorithmConfig(eps_clip_low=LO, eps_clip_high=HI, off_policy_correction=tis)
    corrected, metrics = PolicyLossRegistry.get("regular")(lp, old, adv, cfg, mask, rollout)
    want_tok, _ = per_token("regular", lp, old, rollout, adv)
    w = torch.exp(old - rollout).clamp(max=1.1)
    torch.testing.assert_close(corrected, (want_tok * w * mask).sum())
    assert "tis_token_clip_high_ratio" in metrics and "is_ratio_mean" in metrics
    assert not torch.allclose(plain, corrected)
    # the deprecated use_tis is translated as SkyRL's validate_cfg does, never dropped
    legacy = AlgorithmConfig(use_tis=True, tis_imp_ratio_cap=1.1)
    assert legacy.off_policy_correction == tis
    with pytest.raises(ValueError, match="tis_imp_ratio_cap: expected a cap > 0 with use_tis=True, got -1.0"):
        AlgorithmConfig(use_tis=True)
    # the seed era reads use_tis / tis_imp_ratio_cap itself
    seed_cfg = {"policy_loss_type": "regular", "eps_clip_low": LO, "eps_clip_high": HI, "use_tis": True,
                "tis_imp_ratio_cap": 1.1, "loss_reduction": "token_mean"}
    seed_loss, _ = skyrl_train.PolicyLossRegistry.get("regular")(lp, old, adv, seed_cfg, mask, rollout)
    torch.testing.assert_close(seed_loss, (want_tok * w * mask).sum() / mask.sum())


def test_policy_loss_type_and_reduction_are_checked():
    lp, old, _, adv, mask = data(0)
    with pytest.raises(ValueError, match="policy_loss_type: loss_type must be either 'regular' or 'dual_clip', got 'gspo'"):
        PolicyLossRegistry.get("regular")(lp, old, adv, AlgorithmConfig(policy_loss_type="gspo"), mask)
    with pytest.raises(ValueError, match="loss_reduction: loss_reduction must be either"):
        skyrl_train.PolicyLossRegistry.get("regular")(lp, old, adv, {"loss_reduction": "prompt_mean"}, mask)
    with pytest.raises(ValueError, match="^Unknown policy loss 'regulr'; did you mean 'regular'"):
        PolicyLossRegistry.get("regulr")


def test_loss_mask_none_trains_on_every_token_and_a_fully_masked_batch_is_finite():
    lp, old, _, adv, _ = data(6)
    cfg = dict(policy_loss_type="regular", eps_clip_low=LO, eps_clip_high=HI)
    want_tok, _ = per_token("regular", lp, old, None, adv)
    torch.testing.assert_close(PolicyLossRegistry.get("regular")(lp, old, adv, cfg)[0], want_tok.sum())
    for reduction in ("token_mean", "sequence_mean"):
        loss, _ = skyrl_train.PolicyLossRegistry.get("regular")(lp, old, adv, {**cfg, "loss_reduction": reduction}, torch.zeros_like(adv))
        assert torch.isfinite(loss) and loss.item() == 0.0


def test_user_losses_keep_their_return_shape_in_both_eras():
    @register_policy_loss("with_dict")
    def with_dict(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_log_probs=None):
        return torch.tensor(1.5), {"clip_ratio": 0.3}

    @skyrl_train.register_policy_loss("with_float")
    def with_float(log_probs, old_log_probs, advantages, config, loss_mask=None):
        return torch.tensor(2.5), 0.4

    assert PolicyLossRegistry.get("with_dict") is with_dict
    assert skyrl_train.PolicyLossRegistry.get("with_float") is with_float
    args = dict(log_probs=torch.zeros(1, 1), old_log_probs=torch.zeros(1, 1), advantages=torch.ones(1, 1))
    assert with_dict(**args, config=AlgorithmConfig(policy_loss_type="with_dict")) == (1.5, {"clip_ratio": 0.3})
    loss, clip = with_float(**args, config={"policy_loss_type": "with_float"})
    assert loss.item() == 2.5 and clip == 0.4


def test_seed_era_adapter_refuses_an_off_policy_correction_it_cannot_apply():
    lp, old, rollout, adv, mask = data(3)
    cfg = {"off_policy_correction": {"tis_ratio_type": "token"}, "loss_reduction": "token_mean"}
    loss, _ = PolicyLossRegistry.get("reinforce")(lp, old, adv, cfg, mask, rollout)  # 0.3.0: applied
    plain, _ = PolicyLossRegistry.get("reinforce")(lp, old, adv, {}, mask, rollout)
    assert not torch.allclose(loss, plain)
    with pytest.raises(ValueError, match="config.off_policy_correction: the seed-era policy loss 'reinforce' cannot apply it"):
        skyrl_train.PolicyLossRegistry.get("reinforce")(lp, old, adv, cfg, mask, rollout)
