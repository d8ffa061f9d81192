"""Random estimator batches for the tests: ragged or gappy masks, interleaved groups of mixed size."""

from __future__ import annotations

import torch

from skyrl_fn import AdvantageInput


def random_batch(
    seed: int,
    *,
    b: int | None = None,
    t: int | None = None,
    dtype: torch.dtype = torch.float64,
    min_group: int = 1,
    max_group: int = 5,
    gaps: bool = False,
    outcome_only: bool = False,
    string_ids: bool = False,
    empty_rows: bool = True,
):
    """An ``AdvantageInput`` and the raw pieces the references take.

    Rewards are 0 off the mask (the peers sum every position). ``gaps`` draws masks with holes
    (multi-turn style) instead of right padding. Returns ``(batch, rewards, float_mask, index)``.
    """
    gen = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    t = t or randint(1, 12)
    sizes = []
    target = b or randint(1, 24)
    while sum(sizes) < target:
        sizes.append(randint(min_group, max_group))
    if b is not None:
        sizes[-1] -= sum(sizes) - b
        if sizes[-1] < min_group:  # fold the remainder into the previous group
            extra = sizes.pop()
            if sizes:
                sizes[-1] += extra
            else:
                sizes = [extra]
    labels = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=gen)]  # interleave the groups
    n = len(labels)
    if gaps:
        mask = torch.rand(n, t, generator=gen) < 0.7
        if not empty_rows:  # one valid token at a random position in every otherwise empty row
            at = torch.randint(0, t, (n,), generator=gen)
            mask[torch.arange(n), at] |= ~mask.any(-1)
    else:
        lengths = torch.randint(0 if empty_rows else 1, t + 1, (n,), generator=gen)
        mask = torch.arange(t)[None, :] < lengths[:, None]
    if outcome_only:
        rewards = torch.zeros(n, t, dtype=torch.float64)
        last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask
        rewards[last] = torch.randint(0, 2, (int(last.sum()),), generator=gen).double()
    else:
        rewards = torch.randn(n, t, generator=gen, dtype=torch.float64) * (torch.rand(n, t, generator=gen) < 0.6)
    rewards = (rewards * mask).to(dtype)
    values = (torch.randn(n, t, generator=gen, dtype=torch.float64) * mask).to(dtype)
    baselines = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    index = [f"uid-{int(g)}" for g in labels] if string_ids else [int(g) for g in labels]
    batch = AdvantageInput(
        token_level_rewards=rewards,
        response_mask=mask,
        group_ids=index,
        values=values,
        reward_baselines=baselines,
        extras=sampling_fields(seed, n, t, dtype),
    )
    return batch, rewards, mask.to(dtype), index


def sampling_fields(seed: int, b: int, t: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The per-sample fields the optimal token baselines read, valid ones: the sampled token's
    log-prob and the sum of squared probabilities of a random distribution over 5 tokens per
    step. Drawn from a generator of their own, so the rest of a batch does not depend on them."""
    gen = torch.Generator().manual_seed(seed + 7_000_003)
    probs = torch.softmax(2 * torch.randn(b, t, 5, generator=gen, dtype=torch.float64), dim=-1)
    token = torch.randint(0, 5, (b, t), generator=gen)
    return {
        "old_log_probs": probs.gather(-1, token[..., None])[..., 0].log().to(dtype),
        "sum_pi_squared": probs.square().sum(-1).to(dtype),
    }
