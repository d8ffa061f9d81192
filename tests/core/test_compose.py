"""skyrl_fn.core.compose.chain: composition correctness, ordering errors, hyperparameter passthrough,
register-in-one-call, no input mutation."""

from __future__ import annotations

import functools
import inspect

import attrs
import pytest
import torch

import skyrl_fn
from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, PolicyLossInput, PolicyLossOutput
from skyrl_fn.core.compose import AdvantageTransform, Chain, RewardTransform, chain
from skyrl_fn.estimators import gae, grpo, rloo
from skyrl_fn.transforms import (
    clip_advantages,
    group_mean,
    group_median,
    leave_one_out,
    normalize_by_length,
    outcome_estimator,
    scale_rewards,
    whiten,
)


def make_batch(seed: int = 0, b: int = 8, t: int = 5, groups: int = 2) -> AdvantageInput:
    g = torch.Generator().manual_seed(seed)
    rewards = 3 * torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=torch.arange(b) % groups)


def test_outcome_estimator_group_mean_chain_equals_dr_grpo():
    for seed in range(5):
        batch = make_batch(seed)
        want = DEFAULT_TABLE.compute_advantages("dr_grpo", batch).advantages
        assert torch.equal(chain(outcome_estimator(baseline=group_mean))(batch).advantages, want)


def test_grpo_then_clip_clips():
    batch = make_batch(1)
    plain = grpo(batch).advantages
    assert float(plain.abs().max()) > 1.0  # the test can fail: something must be clipped
    clipped = chain(grpo, clip_advantages(1.0))(batch).advantages
    assert torch.equal(clipped, plain.clamp(-1, 1))


def test_chain_runs_pieces_in_order_on_the_transformed_batch():
    batch = make_batch(2)
    got = chain(scale_rewards(2.0), scale_rewards(-1.0), grpo, normalize_by_length(), clip_advantages(0.3))(batch)
    b2 = scale_rewards(-1.0)(scale_rewards(2.0)(batch))
    want = clip_advantages(0.3)(normalize_by_length()(grpo(b2), b2), b2)
    assert torch.equal(got.advantages, want.advantages)
    # Order of advantage transforms matters: clip then normalise differs from normalise then clip.
    other = chain(scale_rewards(2.0), scale_rewards(-1.0), grpo, clip_advantages(0.3), normalize_by_length())(batch)
    assert not torch.equal(got.advantages, other.advantages)


def test_scale_invariance_shows_transforms_reach_the_estimator():
    batch = make_batch(3)
    assert torch.allclose(chain(scale_rewards(5.0), grpo)(batch).advantages, grpo(batch).advantages, atol=1e-5)
    torch.testing.assert_close(chain(scale_rewards(5.0), rloo)(batch).advantages, 5.0 * rloo(batch).advantages)


def test_register_in_one_call_and_compute():
    table = DEFAULT_TABLE.register("clipped_rloo", chain(outcome_estimator(baseline=leave_one_out), whiten(), clip_advantages(1.0)))
    assert ("advantage_estimator", "clipped_rloo") in table
    assert ("advantage_estimator", "clipped_rloo") not in DEFAULT_TABLE
    out = table.compute_advantages("clipped_rloo", make_batch(4))
    assert isinstance(out, AdvantageOutput) and float(out.advantages.abs().max()) <= 1.0


def test_hyperparameters_pass_through_to_the_estimator():
    est = chain(scale_rewards(1.0), grpo, clip_advantages(10.0))
    sig = inspect.signature(est)
    assert list(sig.parameters) == ["batch", "epsilon", "norm_by_std"]
    assert sig.parameters["epsilon"].default == 1e-6 and sig.parameters["epsilon"].kind is inspect.Parameter.KEYWORD_ONLY
    table = DEFAULT_TABLE.register("c", est)
    assert table.entry("advantage_estimator", "c").hyperparameters() == {"epsilon": 1e-6, "norm_by_std": True}
    batch = make_batch(5)
    got = table.compute_advantages("c", batch, norm_by_std=False)
    assert torch.equal(got.advantages, grpo(batch, norm_by_std=False).advantages.clamp(-10, 10))
    with pytest.raises(ValueError, match="unknown hyperparameter 'epsilom'; did you mean 'epsilon'"):
        table.compute_advantages("c", batch, epsilom=1.0)


def test_partial_estimator_and_nested_chain():
    dr = functools.partial(grpo, norm_by_std=False)
    inner = chain(scale_rewards(2.0), dr)
    # A keyword fixed by the partial is the estimator's identity, not a hyperparameter.
    assert "norm_by_std" not in inspect.signature(inner).parameters
    outer = chain(scale_rewards(0.5), inner, clip_advantages(1.0))
    batch = make_batch(6)
    assert torch.equal(outer(batch).advantages, chain(dr, clip_advantages(1.0))(batch).advantages)
    assert list(inspect.signature(outer).parameters) == ["batch", "epsilon"]


def test_estimator_with_no_hyperparameters_rejects_any():
    table = DEFAULT_TABLE.register("loo", chain(outcome_estimator(baseline=leave_one_out)))
    assert table.entry("advantage_estimator", "loo").hyperparameters() == {}
    with pytest.raises(ValueError, match="unknown hyperparameter 'gamma'"):
        table.compute_advantages("loo", make_batch(), gamma=0.9)


def test_repr_is_readable():
    est = chain(scale_rewards(2), functools.partial(grpo, norm_by_std=False), clip_advantages(1))
    assert repr(est) == "chain(scale_rewards(2.0), partial(grpo, norm_by_std=False), clip_advantages(1.0))"
    assert repr(chain(outcome_estimator(baseline=group_mean), whiten())) == (
        "chain(outcome_estimator(baseline=group_mean), whiten(eps=1e-08))"
    )


def test_chain_is_frozen_and_declares_its_kind():
    est = chain(grpo)
    assert isinstance(est, Chain) and est.__skyrl_kind__ == "advantage_estimator"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        est.estimator = rloo
    assert est.pieces == (grpo,)
    assert inspect.signature(Chain)  # the class itself still has a (constructor) signature


def _policy_loss(batch: PolicyLossInput) -> PolicyLossOutput:
    return PolicyLossOutput(token_loss=batch.log_probs)


def _plain(batch):
    return batch


@pytest.mark.parametrize(
    "pieces, error, message",
    [
        ((), ValueError, "got nothing"),
        ((scale_rewards(1.0), whiten()), ValueError, "exactly one advantage estimator, got none"),
        ((grpo, rloo), ValueError, r"exactly one advantage estimator, got 2: grpo \(piece 0\), rloo \(piece 1\)"),
        ((grpo, scale_rewards(1.0)), ValueError, r"reward transform scale_rewards\(1.0\) \(piece 1\) comes after the estimator"),
        ((whiten(), grpo), ValueError, r"advantage transform whiten\(eps=1e-08\) \(piece 0\) comes before the estimator"),
        ((grpo, 3.0), TypeError, "piece 1 expected a RewardTransform, an advantage estimator or an AdvantageTransform, got float"),
        ((_policy_loss,), TypeError, "got a policy_loss"),
        ((_plain, grpo), TypeError, r"piece 0 \(_plain\) declares no kind.*RewardTransform\(fn\)"),
    ],
)
def test_bad_chains_fail_with_clear_errors(pieces, error, message):
    with pytest.raises(error, match=message):
        chain(*pieces)


def test_user_pieces_must_return_the_right_record():
    batch = make_batch()
    with pytest.raises(TypeError, match="reward transform drop: expected it to return an AdvantageInput, got Tensor"):
        chain(RewardTransform(lambda b: b.token_level_rewards, name="drop"), grpo)(batch)
    with pytest.raises(TypeError, match="expected it to return an AdvantageOutput, got tuple"):
        chain(grpo, AdvantageTransform(lambda out, b: (out.advantages, out.returns)))(batch)
    remask = RewardTransform(lambda b: attrs.evolve(b, response_mask=torch.ones_like(b.response_mask)), name="remask")
    with pytest.raises(ValueError, match="remask: expected the response_mask unchanged"):
        chain(remask, grpo)(batch)
    with pytest.raises(TypeError, match="RewardTransform.fn: expected a callable, got int"):
        RewardTransform(1)


def test_user_pieces_wrap_plain_functions():
    def double(b: AdvantageInput) -> AdvantageInput:
        return attrs.evolve(b, token_level_rewards=2 * b.token_level_rewards)

    def negate(out: AdvantageOutput, b: AdvantageInput) -> AdvantageOutput:
        return attrs.evolve(out, advantages=-out.advantages)

    est = chain(RewardTransform(double), rloo, AdvantageTransform(negate))
    batch = make_batch(7)
    torch.testing.assert_close(est(batch).advantages, -2 * rloo(batch).advantages)
    assert "RewardTransform(" in repr(est) and "double" in repr(est)


def test_chain_never_mutates_its_input():
    values = torch.randn(8, 5)
    batch = attrs.evolve(make_batch(8), values=values)
    before = [batch.token_level_rewards.clone(), batch.response_mask.clone(), batch.group_ids.clone(), values.clone()]
    est = chain(scale_rewards(3.0), gae, whiten(), clip_advantages(0.5), normalize_by_length())
    DEFAULT_TABLE.register("x", est).compute_advantages("x", batch, gamma=0.9, lambd=0.8)
    after = [batch.token_level_rewards, batch.response_mask, batch.group_ids, values]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_chain_runs_without_grad():
    rewards = torch.randn(4, 3, requires_grad=True)
    batch = AdvantageInput(token_level_rewards=rewards, response_mask=torch.ones(4, 3), group_ids=[0, 0, 1, 1])
    out = chain(scale_rewards(2.0), grpo, whiten())(batch)
    assert not out.advantages.requires_grad


def test_exported_from_the_package():
    for name in ("chain", "Chain", "RewardTransform", "AdvantageTransform", "outcome_estimator", "group_mean", "whiten",
                 "clip_advantages", "weighted_sum", "scale_rewards"):
        assert name in skyrl_fn.__all__ and hasattr(skyrl_fn, name)


@pytest.mark.parametrize("name", DEFAULT_TABLE.names("advantage_estimator"))
def test_every_builtin_chains_with_its_hyperparameters(name):
    entry = DEFAULT_TABLE.entry("advantage_estimator", name)
    est = chain(scale_rewards(1.0), entry.fn, clip_advantages(0.5))
    table = DEFAULT_TABLE.register(f"{name}_clipped", est)
    assert table.entry("advantage_estimator", f"{name}_clipped").hyperparameters() == entry.hyperparameters()
    g = torch.Generator().manual_seed(11)
    batch = attrs.evolve(make_batch(11), values=torch.randn(8, 5, generator=g), reward_baselines=torch.randn(8, generator=g))
    got = table.compute_advantages(f"{name}_clipped", batch)
    assert torch.equal(got.advantages, DEFAULT_TABLE.compute_advantages(name, batch).advantages.clamp(-0.5, 0.5))


def test_estimator_taking_kwargs_shows_them_in_the_signature():
    def loose(batch: AdvantageInput, **hyper) -> AdvantageOutput:
        out = grpo(batch)
        return AdvantageOutput(advantages=hyper.get("scale", 1.0) * out.advantages, returns=out.returns)

    est = chain(loose)
    assert inspect.signature(est).parameters["hyper"].kind is inspect.Parameter.VAR_KEYWORD
    table = DEFAULT_TABLE.register("loose", est)
    assert table.entry("advantage_estimator", "loose").hyperparameters() is None
    batch = make_batch(12)
    torch.testing.assert_close(table.compute_advantages("loose", batch, scale=2.0).advantages, 2 * grpo(batch).advantages)


def test_chain_built_directly_checks_its_pieces():
    with pytest.raises(TypeError, match="reward_transforms: expected a tuple of RewardTransform"):
        Chain(reward_transforms=(whiten(),), estimator=grpo, advantage_transforms=())
    with pytest.raises(TypeError, match="estimator: expected an advantage estimator"):
        Chain(reward_transforms=(), estimator=scale_rewards(1.0), advantage_transforms=())
    assert Chain(reward_transforms=(), estimator=grpo, advantage_transforms=(whiten(),)).pieces[0] is grpo


_UNIVERSAL = ["shapes", "mask", "finite", "no_mutation", "deterministic", "permutation_equivariant"]
_GROUP = _UNIVERSAL + ["group_local", "shift_invariant"]


@pytest.mark.parametrize(
    "est, properties",
    [
        (chain(outcome_estimator(baseline=group_mean)), _GROUP),
        (chain(outcome_estimator(baseline=group_median)), _GROUP),
        (chain(outcome_estimator(baseline=leave_one_out)), _GROUP),
        (chain(scale_rewards(2.0), grpo, clip_advantages(1.0)), _GROUP + ["scale_invariant"]),
        (chain(scale_rewards(0.5), outcome_estimator(baseline=group_mean), whiten(), normalize_by_length()), _UNIVERSAL),
    ],
    ids=["group_mean", "group_median", "leave_one_out", "grpo_clipped", "whitened"],
)
def test_chains_pass_the_property_kit(est, properties):
    from hypothesis import HealthCheck, settings

    from skyrl_fn.testing import check_estimator

    # A few examples per property keeps this file fast; the built-ins get the full battery elsewhere.
    few = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    check_estimator(est, properties=properties, settings=few)
