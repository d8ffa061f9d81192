"""Multi-objective rewards: combine several reward heads carried in ``batch.extras``.

``[B]`` heads (outcome rewards) land on each row's last valid token, ``[B, T]`` heads are used as
token rewards; the weighted sum then feeds GRPO. Run: .venv/bin/python examples/multi_objective.py
"""

import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, chain, clip_advantages, weighted_sum
from skyrl_fn.estimators import grpo

weights = {"correct": 1.0, "format": 0.2, "toxicity": -1.0}
table = DEFAULT_TABLE.register("multi_objective", chain(weighted_sum(weights), grpo, clip_advantages(2.0)))

mask = torch.ones(4, 3, dtype=torch.bool)
toxicity = torch.zeros(4, 3)
toxicity[1, 1] = 0.8  # sample 1 is correct but says something toxic mid-answer
batch = AdvantageInput(
    token_level_rewards=torch.zeros(4, 3),  # unused: the heads below define the reward
    response_mask=mask,
    group_ids=["q1"] * 4,
    extras={
        "correct": torch.tensor([1.0, 1.0, 0.0, 0.0]),  # [B] outcome heads
        "format": torch.tensor([1.0, 1.0, 1.0, 0.0]),
        "toxicity": toxicity,  # [B, T] token head
    },
)

out = table.compute_advantages("multi_objective", batch)
advantages = out.advantages[:, 0]
print("per-sample advantages:", [round(a, 3) for a in advantages.tolist()])
print("correct and clean beats correct but toxic:", bool(advantages[0] > advantages[1]))

# A typo in a head name fails loudly, listing the heads that exist.
try:
    DEFAULT_TABLE.register("typo", chain(weighted_sum({"corect": 1.0}), grpo)).compute_advantages("typo", batch)
except ValueError as err:
    error = str(err)
    print("error:", error)
