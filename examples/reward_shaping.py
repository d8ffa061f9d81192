"""Reward shaping: transform rewards before the estimator, then use a built-in estimator.

Reward-model scores are unbounded, so squash them with tanh, and charge 0.02 per response token
so that, at equal reward, shorter answers win. Run: .venv/bin/python examples/reward_shaping.py
"""

import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, chain, length_penalty, shape_rewards
from skyrl_fn.estimators import grpo


def squash(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: ``tanh`` of every token reward (a new tensor; inputs untouched)."""
    return torch.tanh(rewards)


shaped = chain(shape_rewards(squash), length_penalty(0.02), grpo)
table = DEFAULT_TABLE.register("shaped_grpo", shaped)

# One prompt, four answers: a huge outlier score, and two equally good answers of different length.
lengths = torch.tensor([3, 3, 8, 5])
mask = torch.arange(8)[None, :] < lengths[:, None]
rewards = torch.zeros(4, 8)
rewards[torch.arange(4), lengths - 1] = torch.tensor([40.0, 2.0, 2.0, -1.0])
batch = AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[0, 0, 0, 0])

plain = table.compute_advantages("grpo", batch).advantages[:, 0]
# Hyperparameters of the estimator pass through the chain (here GRPO's epsilon).
shaped_adv = table.compute_advantages("shaped_grpo", batch, epsilon=1e-4).advantages[:, 0]
print(f"pieces:      {shaped!r}")
print(f"plain grpo:  {[round(a, 3) for a in plain.tolist()]}")
print(f"shaped grpo: {[round(a, 3) for a in shaped_adv.tolist()]}")
print("answers 1 and 2 score the same; the shorter one now gets the larger advantage:",
      bool(shaped_adv[1] > shaped_adv[2]))
