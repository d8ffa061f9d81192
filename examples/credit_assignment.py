"""Custom temporal credit assignment: spread a group-centred outcome reward back over the tokens
with a discount, so tokens near the end of a response get more of the credit::

    A_{i,t} = gamma^(L_i - 1 - k_{i,t}) * (s_i - mean_{g(i)}(s)) * m_{i,t}

where ``k_{i,t}`` is the index of token t among the valid tokens of row i and ``L_i`` the length.
Run: .venv/bin/python examples/credit_assignment.py
"""

import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, group_mean, outcome_estimator

centred = outcome_estimator(baseline=group_mean)  # Dr. GRPO: (s_i - mean_g s) on every token


@torch.no_grad()
def discounted_outcome(batch: AdvantageInput, *, gamma: float = 0.9) -> AdvantageOutput:
    """Discounted reward-to-go of the centred outcome. [B, T] -> [B, T]; gamma in (0, 1]."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma: expected a discount in (0, 1], got {gamma!r}")
    mask = batch.response_mask
    k = mask.cumsum(-1) - 1  # [B, T] index among valid tokens
    steps_left = (mask.sum(-1, keepdim=True) - 1 - k).to(batch.token_level_rewards.dtype)
    adv = torch.where(mask, centred(batch).advantages * gamma**steps_left, 0)
    return AdvantageOutput(advantages=adv, returns=adv)


table = DEFAULT_TABLE.register("discounted_outcome", discounted_outcome)

mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
rewards = torch.tensor([[0.0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])  # sample 0 solved it, sample 1 did not
batch = AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=[7, 7])

flat = table.compute_advantages("dr_grpo", batch).advantages
spread = table.compute_advantages("discounted_outcome", batch, gamma=0.5).advantages
print("dr_grpo (same credit for every token):\n", flat)
print("discounted_outcome, gamma=0.5 (credit grows toward the end):\n", spread)
