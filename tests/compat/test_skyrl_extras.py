"""Per-sample fields under the peers' keyword names reach the native estimators through the façade:
SkyRL's ``reward_components`` (GDPO, PR #2104), verl's ``non_tensor_batch`` + ``config.gdpo_*`` and
its tensor keywords for the optimal token baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyrl_fn import AdvantageInput
from skyrl_fn.compat import AdvantageEstimatorRegistry, compute_advantages_and_returns
from skyrl_fn.estimators import gdpo, optimal_token_baseline

B, T = 6, 4
INDEX = np.array([0, 0, 0, 1, 1, 1])


def _batch():
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(T)[None, :] < torch.tensor([4, 3, 2, 4, 1, 3])[:, None]
    rewards = torch.zeros(B, T)
    comps = torch.randint(0, 3, (B, 2), generator=gen).float()
    return rewards, mask.float(), comps


def _native(rewards, mask, **extras):
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=INDEX, extras=extras)


def test_skyrl_reward_components_become_gdpo_components():
    rewards, mask, comps = _batch()
    adv, _ = compute_advantages_and_returns(
        token_level_rewards=rewards, response_mask=mask, index=INDEX, adv_estimator="gdpo",
        reward_components=comps, reward_component_names=["accuracy", "format"],
    )
    want = gdpo(_native(rewards, mask, accuracy=comps[:, 0], format=comps[:, 1]), reward_keys=("accuracy", "format"))
    torch.testing.assert_close(adv, want.advantages)
    assert not torch.allclose(adv, torch.zeros_like(adv))


def test_verl_non_tensor_batch_and_config_keys_and_weights():
    rewards, mask, comps = _batch()
    fn = AdvantageEstimatorRegistry.get("gdpo")
    adv, _ = fn(
        token_level_rewards=rewards, response_mask=mask, index=INDEX,
        config={"gdpo_reward_keys": ["acc", "fmt"], "gdpo_reward_weights": [1.0, 0.5]},
        non_tensor_batch={"acc": comps[:, 0].numpy(), "fmt": comps[:, 1].numpy(), "uid": np.array(["a"] * B, dtype=object)},
    )
    want = gdpo(_native(rewards, mask, acc=comps[:, 0], fmt=comps[:, 1]), reward_keys=("acc", "fmt"), reward_weights=(1.0, 0.5))
    torch.testing.assert_close(adv, want.advantages)


def test_verl_tensor_keywords_feed_the_optimal_token_baseline():
    rewards, mask, _ = _batch()
    rewards[torch.arange(B), mask.sum(-1).long() - 1] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    lp = -torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    q = torch.exp(lp) ** 2 + 0.1
    adv, ret = AdvantageEstimatorRegistry.get("optimal_token_baseline")(
        token_level_rewards=rewards, response_mask=mask, index=INDEX, old_log_probs=lp, sum_pi_squared=q,
    )
    want = optimal_token_baseline(_native(rewards, mask, old_log_probs=lp, sum_pi_squared=q))
    torch.testing.assert_close(adv, want.advantages)
    torch.testing.assert_close(ret, want.returns)


def test_a_missing_component_and_a_bad_shape_name_the_keyword():
    rewards, mask, comps = _batch()
    with pytest.raises(ValueError, match="reward_keys: 'acc' is not a per-sample field of the batch"):
        AdvantageEstimatorRegistry.get("gdpo")(token_level_rewards=rewards, response_mask=mask, index=INDEX, gdpo_reward_keys=["acc"])
    with pytest.raises(ValueError, match="reward_component_names: expected 2 names"):
        AdvantageEstimatorRegistry.get("gdpo")(token_level_rewards=rewards, response_mask=mask, index=INDEX, reward_components=comps, reward_component_names=["a"])
    with pytest.raises(ValueError, match="reward_components: expected a \\[B, K\\]"):
        AdvantageEstimatorRegistry.get("gdpo")(token_level_rewards=rewards, response_mask=mask, index=INDEX, reward_components=comps[:3])
