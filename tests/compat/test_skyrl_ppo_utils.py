"""SkyRL 0.3.0's ``ppo_utils`` functions through the façade: estimators equal SkyRL's loops on
every position, KL estimates, masked mean, reductions, KL controllers, names and error wording."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.compat import (
    AdaptiveKLController,
    AdvantageEstimator,
    AdvantageEstimatorRegistry,
    AlgorithmConfig,
    FixedKLController,
    KLCtrlConfig,
    apply_loss_reduction_to_advantages_minibatch,
    compute_advantages_and_returns,
    compute_approx_kl,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_maxrl_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_rloo_outcome_advantage,
    get_kl_controller,
    masked_mean,
    reduce_loss,
    register_advantage_estimator,
)
from skyrl_fn.compat import skyrl_train

_spec = importlib.util.spec_from_file_location(
    "skyrl_reference_loops", pathlib.Path(__file__).parent.parent / "estimators" / "skyrl_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


@pytest.fixture(autouse=True)
def clean_registries():
    AdvantageEstimatorRegistry.reset()
    yield
    AdvantageEstimatorRegistry.reset()


@st.composite
def skyrl_batches(draw, min_valid: int = 1):
    """What SkyRL's trainer passes: float 0/1 masks, rewards anywhere (padding too), string uids."""
    b = draw(st.integers(1, 7))
    t = draw(st.integers(2 if b < min_valid else 1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(b, t, generator=g) > 0.35).double()
    flat = mask.view(-1)
    flat[: min(min_valid, flat.numel())] = 1.0
    groups = draw(st.integers(1, 3))
    index = np.array([f"uid{int(i)}" for i in torch.randint(0, groups, (b,), generator=g)])
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    return rewards, mask, index, values


@given(skyrl_batches(), st.booleans())
def test_grpo_equals_skyrl_loop_on_every_position(batch, norm):
    rewards, mask, index, _ = batch
    adv, ret = compute_grpo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index, grpo_norm_by_std=norm)
    want, _ = ref.grpo(rewards.clone(), mask, list(index), norm_by_std=norm)
    torch.testing.assert_close(adv, want)
    assert torch.equal(adv, ret)


@given(skyrl_batches())
def test_rloo_and_maxrl_equal_skyrl_loops(batch):
    rewards, mask, index, _ = batch
    torch.testing.assert_close(
        compute_rloo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index)[0],
        ref.rloo(rewards.clone(), mask, list(index))[0],
    )
    torch.testing.assert_close(
        compute_maxrl_advantage(token_level_rewards=rewards, response_mask=mask, index=index)[0],
        ref.maxrl(rewards.clone(), mask, list(index))[0],
    )


@given(skyrl_batches(min_valid=2), st.floats(0.0, 1.0))
def test_reinforce_plus_plus_equals_skyrl_loop_with_padding_returns(batch, gamma):
    rewards, mask, _, _ = batch
    adv, ret = compute_reinforce_plus_plus_outcome_advantage(token_level_rewards=rewards, response_mask=mask, gamma=gamma)
    want_adv, want_ret = ref.reinforce_plus_plus(rewards, mask, gamma)
    torch.testing.assert_close(ret, want_ret)  # also where the mask is 0: SkyRL's loop value
    torch.testing.assert_close(adv, want_adv)


@given(skyrl_batches(min_valid=2), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_equals_skyrl_loop_also_with_holes_in_the_mask(batch, gamma, lambd):
    rewards, mask, _, values = batch
    adv, ret = compute_gae_advantage_return(token_level_rewards=rewards, values=values, response_mask=mask, gamma=gamma, lambd=lambd)
    want_adv, want_ret = ref.gae_skyrl(rewards, values, mask, gamma, lambd)
    torch.testing.assert_close(ret, want_ret)
    torch.testing.assert_close(adv, want_adv)  # whitened with the mask's statistics, not re-masked


def test_estimators_name_the_callers_arguments():
    rewards, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"^index: expected shape \[B\] = \(2,\), got \(3,\)") as err:
        compute_grpo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=np.array(["a", "a", "b"]))
    assert "group_ids" not in str(err.value)
    with pytest.raises(ValueError, match="^index: expected"):
        AdvantageEstimatorRegistry.get("grpo")(token_level_rewards=rewards, response_mask=mask, index=np.array(["a"]))
    with pytest.raises(ValueError, match="^values: expected a \\[B, T\\] tensor"):
        compute_gae_advantage_return(token_level_rewards=rewards, values=None, response_mask=mask, gamma=1.0, lambd=1.0)


def test_advantage_estimator_is_skyrls_strenum():
    assert AdvantageEstimator("grpo") is AdvantageEstimator.GRPO and AdvantageEstimator.REINFORCE_PP == "reinforce++"
    assert [e.value for e in AdvantageEstimator] == ["gae", "grpo", "rloo", "reinforce++", "maxrl"]
    assert skyrl_train.AdvantageEstimator is AdvantageEstimator


def test_user_estimator_through_compute_advantages_and_returns_and_skyrl_error_wording():
    @register_advantage_estimator("twice")
    def twice(**kwargs):
        return kwargs["token_level_rewards"] * 2, kwargs["token_level_rewards"] * 3

    assert AdvantageEstimatorRegistry.get("twice") is twice
    rewards = torch.tensor([[1.0, 2.0]])
    adv, ret = compute_advantages_and_returns(
        token_level_rewards=rewards, response_mask=torch.ones(1, 2), index=np.array(["u"]), adv_estimator="twice", config={}
    )
    torch.testing.assert_close(adv, rewards * 2)
    torch.testing.assert_close(ret, rewards * 3)
    with pytest.raises(ValueError, match="^Unknown advantage estimator 'tw1ce'; did you mean 'twice'"):
        AdvantageEstimatorRegistry.get("tw1ce")
    with pytest.raises(ValueError, match="'nope' not registered"):
        AdvantageEstimatorRegistry.unregister("nope")


# -- KL ---------------------------------------------------------------------------------------------
KL = {
    "k1": lambda d: d,
    "abs": lambda d: d.abs(),
    "k2": lambda d: 0.5 * d * d,
    "k3": lambda d: torch.clamp(torch.exp(-d.clamp(-20, 20)) - 1 + d.clamp(-20, 20), -10, 10),
}


@pytest.mark.parametrize("kind", sorted(KL))
def test_approx_kl_formulas_soft_masks_and_no_nan_leak(kind):
    g = torch.Generator().manual_seed(3)
    lp, base = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(compute_approx_kl(lp, base, None, kl_estimator_type=kind), KL[kind](lp - base))
    mask = torch.tensor([[1.0, 0.5, 0.0, 0.25]] * 3)
    base_nan = base.clone()
    base_nan[:, 2] = float("nan")
    kl = compute_approx_kl(lp, base_nan, mask, kl_estimator_type=kind)
    assert bool(torch.isfinite(kl).all()) and bool((kl[:, 2] == 0).all())
    torch.testing.assert_close(kl[:, [0, 1, 3]], (KL[kind](lp - base) * mask)[:, [0, 1, 3]])
    # the seed era's function is the same (with SkyRL 0.3.0's NaN-safe masking)
    torch.testing.assert_close(skyrl_train.compute_approx_kl(lp, base_nan, mask, kl_estimator_type=kind), kl)


def test_approx_kl_errors():
    with pytest.raises(ValueError, match="Invalid KL estimator type: 'k4'"):
        compute_approx_kl(torch.zeros(1, 2), torch.zeros(1, 2), kl_estimator_type="k4")
    with pytest.raises(ValueError, match=r"^log_probs_base: expected shape"):
        compute_approx_kl(torch.zeros(1, 2), torch.zeros(1, 3), kl_estimator_type="k1")


# -- masked mean, reductions --------------------------------------------------------------------------
def test_masked_mean_with_and_without_dim():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_mean(x, m).item() == 1.5
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 0.0]))  # empty row: 0
    assert masked_mean(x, None).item() == 3.5
    assert skyrl_train.masked_mean is masked_mean


def test_reduce_loss_is_the_masked_sum_in_030_and_a_mean_in_the_seed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert reduce_loss(loss, mask).item() == 7.0 and reduce_loss(loss, None).item() == 21.0
    assert skyrl_train.reduce_loss(loss, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert skyrl_train.reduce_loss(loss, mask, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert skyrl_train.reduce_loss(loss, mask, "seq_mean_token_sum_norm", 5).item() == pytest.approx((3 + 4) / 10)
    assert skyrl_train.reduce_loss(loss, None, "token_mean").item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="Invalid loss reduction type: 'token_sum'"):
        skyrl_train.reduce_loss(loss, mask, "token_sum")
    with pytest.raises(ValueError, match="max_seq_len must be provided"):
        skyrl_train.reduce_loss(loss, mask, "seq_mean_token_sum_norm")


def _reference_reduction(a, m, reduction, micro, max_len, bounds):
    """Each reduction written as SkyRL describes it, over a per-token value ``a`` (loops, floats)."""
    b = a.shape[0]
    rows = [(float((a[i] * m[i]).sum()), float(m[i].sum())) for i in range(b)]
    if reduction == "token_mean":
        return sum(s for s, _ in rows) / max(sum(n for _, n in rows), 1.0)
    if reduction == "sequence_mean":
        return sum(s / max(n, 1.0) for s, n in rows) / b
    if reduction == "seq_mean_token_sum_norm":
        return sum(s for s, _ in rows) / (b * max_len)
    if reduction == "token_mean_legacy":
        k = b // micro
        means = []
        for j in range(k):
            part = rows[j * micro:(j + 1) * micro]
            means.append(sum(s for s, _ in part) / max(sum(n for _, n in part), 1.0))
        return sum(means) / k if k else 0.0
    prompts = []
    for start, end in bounds:
        part = rows[start:end]
        prompts.append(sum(s for s, _ in part) / max(sum(n for _, n in part), 1.0))
    return sum(prompts) / len(prompts)


@given(
    st.integers(1, 8), st.integers(1, 5), st.integers(0, 2**16),
    st.sampled_from(["token_mean", "sequence_mean", "seq_mean_token_sum_norm", "token_mean_legacy", "prompt_mean"]),
    st.integers(1, 4),
)
def test_scaled_advantages_summed_give_each_reduction(b, t, seed, reduction, micro):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.4).double()
    cuts = sorted(set(torch.randint(1, b + 1, (2,), generator=g).tolist()) | {b})
    bounds = list(zip([0, *cuts[:-1]], cuts))
    scaled = apply_loss_reduction_to_advantages_minibatch(
        advantages=adv, loss_mask=mask, loss_reduction=reduction, micro_batch_size=micro, max_seq_len=t + 2,
        prompt_boundaries=bounds,
    )
    want = _reference_reduction(adv, mask, reduction, micro, t + 2, bounds)
    assert reduce_loss(scaled, mask).item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_loss_reduction_errors_use_skyrls_wording():
    a, m = torch.ones(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="Invalid loss reduction type"):
        apply_loss_reduction_to_advantages_minibatch(a, m, "invalid", 1, 2)
    with pytest.raises(ValueError, match="`prompt_mean` loss reduction requires `prompt_boundaries`"):
        apply_loss_reduction_to_advantages_minibatch(a, m, "prompt_mean", 1, 2)
    zero = apply_loss_reduction_to_advantages_minibatch(a, torch.zeros(1, 2), "token_mean", 1, 2)
    assert reduce_loss(zero, torch.zeros(1, 2)).item() == 0.0  # all masked: 0, not NaN


# -- KL controllers -----------------------------------------------------------------------------------
@given(st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.lists(st.floats(0.0, 2.0), min_size=1, max_size=5))
def test_adaptive_controller_follows_the_proportional_rule(coef, target, kls):
    ctrl, want = AdaptiveKLController(init_kl_coef=coef, target=target, horizon=100), coef
    for kl in kls:
        ctrl.update(current=kl, n_steps=10)
        want *= 1 + max(-0.2, min(0.2, kl / target - 1)) * 10 / 100
    assert math.isclose(ctrl.value, want, rel_tol=1e-12)


def test_fixed_controller_and_get_kl_controller():
    ctrl = FixedKLController(kl_coef=0.1)
    ctrl.update(current=5.0, n_steps=10)
    assert ctrl.value == 0.1
    adaptive = get_kl_controller(AlgorithmConfig(kl_loss_coef=0.2, kl_ctrl=KLCtrlConfig(type="adaptive", kl_target=0.3, horizon=50)))
    assert isinstance(adaptive, AdaptiveKLController) and (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 0.3, 50)
    fixed = get_kl_controller({"kl_loss_coef": 0.05, "kl_ctrl": {"type": "fixed"}})
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    with pytest.raises(ValueError, match="kl_ctrl.horizon: horizon must be larger than 0. Got 0"):
        get_kl_controller(AlgorithmConfig(kl_ctrl=KLCtrlConfig(type="adaptive", horizon=0)))
    with pytest.raises(ValueError, match="kl_ctrl.type: Invalid KL controller type: 'pid'"):
        get_kl_controller(AlgorithmConfig(kl_ctrl=KLCtrlConfig(type="pid")))
