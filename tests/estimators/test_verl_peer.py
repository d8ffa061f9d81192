"""GDPO and the optimal token baselines against verl 0.9.1's own ``core_algos`` (skipped without it).

Install verl ``--no-deps`` (plus ``omegaconf tensordict pyvers codetiming orjson packaging pyyaml``)
into a scratch directory and put it on ``PYTHONPATH`` to run these; the venv's own torch and numpy
are used. Batches are random, with interleaved groups of mixed size (size-1 groups included) and
right-padded or gappy masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batches import random_batch
from skyrl_fn import DEFAULT_TABLE, AdvantageInput
from skyrl_fn.estimators import gdpo, optimal_token_baseline, tir_optimal_token_baseline

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

SEEDS = range(20)


def _components(batch: AdvantageInput, seed: int, k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    # Small integer-valued scores: many ties and constant groups, as 0/1 accuracy or format rewards.
    return {f"r{j}": torch.randint(0, 3, (batch.batch_size,), generator=gen).double() * (j + 1) for j in range(k)}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_gdpo_matches_verl(seed, norm_by_std):
    batch, _, mask, index = random_batch(seed, empty_rows=False)
    if int(batch.response_mask.sum()) < 2:
        pytest.skip("verl's masked_whiten raises below 2 valid tokens (our deviation: zeros)")
    k = 1 + seed % 3
    comps = _components(batch, seed, k)
    weights = [1.0, 0.5, 2.0][:k]
    lengths = batch.response_mask.sum(-1)
    prompt_len = 3
    attention = torch.cat([torch.ones(batch.batch_size, prompt_len, dtype=torch.long), batch.response_mask.long()], dim=1)
    verl_adv, _ = core_algos.compute_gdpo_outcome_advantage(
        token_level_rewards=batch.token_level_rewards.clone(), response_mask=mask.clone(), index=np.array(index),
        norm_adv_by_std_in_grpo=norm_by_std,
        config={"gdpo_reward_keys": list(comps), "gdpo_reward_weights": weights},
        non_tensor_batch={key: v.numpy() for key, v in comps.items()},
        batch={"prompts": torch.zeros(batch.batch_size, prompt_len), "attention_mask": attention},
    )
    assert lengths.min() >= 1
    ours = gdpo(
        AdvantageInput(token_level_rewards=batch.token_level_rewards, response_mask=batch.response_mask,
                       group_ids=batch.group_ids, extras=comps),
        reward_keys=tuple(comps), reward_weights=weights, norm_by_std=norm_by_std,
    )
    # verl builds each component in float32; compare at that precision.
    torch.testing.assert_close(ours.advantages, verl_adv.to(torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", SEEDS[:15])
def test_gdpo_without_components_is_verls_fallback(seed):
    batch, rewards, mask, index = random_batch(seed, empty_rows=False)
    if int(batch.response_mask.sum()) < 2:
        pytest.skip("verl's masked_whiten raises below 2 valid tokens")
    verl_adv, _ = core_algos.compute_gdpo_outcome_advantage(token_level_rewards=rewards.clone(), response_mask=mask.clone(), index=np.array(index))
    # verl's size-1 groups divide by float32 (1 + epsilon): a relative 5e-8 off in float64.
    torch.testing.assert_close(DEFAULT_TABLE.compute_advantages("gdpo", batch).advantages, verl_adv, rtol=1e-6, atol=1e-7)


def _otb_fields(batch: AdvantageInput, seed: int, *, with_is: bool) -> dict[str, torch.Tensor]:
    """Valid OTB inputs: a random distribution per step, the sampled token's log-prob and sum pi^2."""
    gen = torch.Generator().manual_seed(2000 + seed)
    b, t = batch.token_level_rewards.shape
    probs = torch.softmax(3 * torch.randn(b, t, 6, generator=gen, dtype=torch.float64), dim=-1)
    token = torch.randint(0, 6, (b, t), generator=gen)
    fields = {
        "old_log_probs": probs.gather(-1, token[..., None]).squeeze(-1).log(),
        "sum_pi_squared": probs.square().sum(-1),
    }
    if with_is:
        fields["rollout_is_weights"] = torch.rand(b, t, generator=gen, dtype=torch.float64) * 2
    return fields


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("tail", [True, False])
def test_optimal_token_baselines_match_verl(seed, gaps, with_is, tail):
    batch, rewards, mask, index = random_batch(seed, gaps=gaps, min_group=1 + seed % 2)
    fields = _otb_fields(batch, seed, with_is=with_is)
    ours_batch = AdvantageInput(token_level_rewards=batch.token_level_rewards, response_mask=batch.response_mask, group_ids=batch.group_ids, extras=fields)
    kwargs = dict(
        token_level_rewards=rewards.clone(), response_mask=mask.clone(), index=np.array(index),
        old_log_probs=fields["old_log_probs"].clone(), sum_pi_squared=fields["sum_pi_squared"].clone(),
        rollout_is_weights=fields.get("rollout_is_weights"), handle_zero_tail=tail,
    )
    for ours_fn, verl_fn in (
        (optimal_token_baseline, core_algos.compute_optimal_token_baseline_advantage),
        (tir_optimal_token_baseline, core_algos.compute_multi_turn_optimal_token_baseline_advantage),
    ):
        adv, ret = verl_fn(**kwargs)
        ours = ours_fn(ours_batch, handle_zero_tail=tail)
        torch.testing.assert_close(ours.advantages, adv * mask, rtol=1e-9, atol=1e-9)
        # Deviation: our returns are zero off the mask (verl keeps the reward-to-go inside holes).
        torch.testing.assert_close(ours.returns, ret * mask, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["kl", "kl+", "k1", "k1+", "abs", "abs+", "k2", "k2+", "mse", "mse+", "k3", "k3+", "low_var_kl", "low_var_kl+"])
def test_kl_names_match_verls_kl_penalty_in_value_and_gradient(name):
    gen = torch.Generator().manual_seed(7)
    lp = (torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    ref = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    ours = DEFAULT_TABLE.get("kl_estimator", name)(lp, ref)
    lp_v = lp.detach().clone().requires_grad_(True)
    theirs = core_algos.kl_penalty(lp_v, ref, name)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), lp)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), lp_v)
    torch.testing.assert_close(g_ours, g_theirs)
