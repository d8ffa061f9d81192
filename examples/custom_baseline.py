"""Custom baseline: score each sample against a group mean shrunk toward the batch mean.

    b_i = lam * mean_{g(i)}(s) + (1 - lam) * mean_batch(s),     A_{i,t} = (s_i - b_i) * m_{i,t}

lam = 1 is Dr. GRPO, lam = 0 the batch-mean baseline; in between, small groups borrow strength
from the batch. Run: .venv/bin/python examples/custom_baseline.py
"""

import functools

import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, batch_mean, chain, group_mean, outcome_estimator


def shrunk_mean(scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int, *, lam: float = 0.5) -> torch.Tensor:
    """[B] baseline: ``lam * group_mean + (1 - lam) * batch_mean`` of the outcome scores [B]."""
    return lam * group_mean(scores, group_ids, num_groups) + (1 - lam) * batch_mean(scores, group_ids, num_groups)


# One call names the new estimator; the table is a new value, DEFAULT_TABLE is unchanged.
estimator = chain(outcome_estimator(baseline=functools.partial(shrunk_mean, lam=0.7)))
table = DEFAULT_TABLE.register("shrunk_baseline", estimator)

# Two prompts, three samples each; the outcome reward sits on the last response token.
outcome = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
mask = torch.tensor([[1, 1, 1, 1]] * 3 + [[1, 1, 1, 0]] * 3, dtype=torch.bool)
rewards = torch.zeros(6, 4)
rewards[torch.arange(6), mask.sum(-1) - 1] = outcome
batch = AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=["easy"] * 3 + ["hard"] * 3)

advantages = {}
for name in ("dr_grpo", "rloo", "shrunk_baseline"):
    out = table.compute_advantages(name, batch)
    advantages[name] = out.advantages[:, 0]  # one value per sample, on every response token
    print(f"{name:>16}: {[round(a, 3) for a in advantages[name].tolist()]}")
print(f"estimator: {estimator!r}")
