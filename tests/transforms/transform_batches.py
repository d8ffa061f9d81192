"""make_batch for the tests of skyrl_fn.transforms."""

from __future__ import annotations

import torch

from skyrl_fn import AdvantageInput


def make_batch(seed: int = 0, b: int = 8, t: int = 5, groups: int = 3, dtype=torch.float32, extras=None) -> AdvantageInput:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    ids = torch.arange(b) % groups
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=ids, extras=extras or {})
