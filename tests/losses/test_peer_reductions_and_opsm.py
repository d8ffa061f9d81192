"""SkyRL 0.3.0's loss reductions (``apply_loss_reduction_to_advantages_minibatch``: ``prompt_mean``,
``token_mean_legacy`` and the rest) and TRL's off-policy sequence mask (``GRPOTrainer.
get_off_policy_mask``) run from the peers' own files (skipped without ``$SKYRL_FN_PEERS``, see
``tests/peers.py``) against ``reduction_weights``, ``prompt_mean``, ``token_mean_legacy`` and ``opsm``."""

from __future__ import annotations

from typing import List, Optional, Tuple

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skyrl_fn.losses import opsm, prompt_mean, reduction_weights, token_mean_legacy
from tests.losses.loss_batches import make_batch
from tests.peers import peer_function


@pytest.fixture(scope="module")
def skyrl_reduction():
    return peer_function(
        "skyrl/backends/skyrl_train/utils/ppo_utils.py", "apply_loss_reduction_to_advantages_minibatch",
        {"torch": torch, "List": List, "Optional": Optional, "Tuple": Tuple},
    )


@pytest.fixture(scope="module")
def trl_opsm():
    return peer_function("trl/trainer/grpo_trainer.py", "GRPOTrainer.get_off_policy_mask", {"torch": torch})


def _contiguous_prompts(seed: int, b: int, t: int):
    """Loss, a soft-or-hard mask and prompt ids for ``b`` rows in contiguous prompts of random
    sizes (SkyRL's ``prompt_boundaries`` are slices), with SkyRL's boundaries."""
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.6
    sizes = []
    while sum(sizes) < b:
        sizes.append(min(int(torch.randint(1, 4, (1,), generator=gen)), b - sum(sizes)))
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return loss, mask, ids, [(s, s + n) for s, n in zip(starts, sizes)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 12), t=st.integers(1, 6),
       reduction=st.sampled_from(["token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm", "prompt_mean"]))
def test_reduction_weights_are_skyrls(skyrl_reduction, seed, b, t, reduction):
    loss, mask, ids, bounds = _contiguous_prompts(seed, b, t)
    mbs = [d for d in range(1, b + 1) if b % d == 0][seed % len([d for d in range(1, b + 1) if b % d == 0])]
    m = mask.double()
    theirs = skyrl_reduction(torch.ones(b, t, dtype=torch.float64), m, reduction, mbs, 7, prompt_boundaries=bounds)
    ours = reduction_weights(m, reduction=reduction, max_seq_len=7, micro_batch_size=mbs, group_ids=ids)
    torch.testing.assert_close(ours * m, theirs * m)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 12), t=st.integers(1, 6))
def test_prompt_mean_and_token_mean_legacy_are_skyrls_sums(skyrl_reduction, seed, b, t):
    # SkyRL's loss is sum(per_token_loss * mask * scaled advantage-weight); ours the aggregation.
    loss, mask, ids, bounds = _contiguous_prompts(seed, b, t)
    m = mask.double()
    w = skyrl_reduction(torch.ones(b, t, dtype=torch.float64), m, "prompt_mean", 1, 1, prompt_boundaries=bounds)
    torch.testing.assert_close(prompt_mean(loss, mask, group_ids=ids), (loss * m * w).sum())
    for mbs in [d for d in range(1, b + 1) if b % d == 0]:
        w = skyrl_reduction(torch.ones(b, t, dtype=torch.float64), m, "token_mean_legacy", mbs, 1)
        ours = sum(token_mean_legacy(loss[a:a + mbs], mask[a:a + mbs], global_seqs=b) for a in range(0, b, mbs))
        torch.testing.assert_close(ours, (loss * m * w).sum())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), delta=st.floats(0.01, 1.0), outcome=st.booleans())
def test_opsm_is_trls_get_off_policy_mask(trl_opsm, seed, delta, outcome):
    x = make_batch(6, 7, seed=seed, spread=0.8)
    if outcome:  # outcome advantages, TRL's (B, 1)
        adv = torch.randn(6, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x = attrs.evolve(x, advantages=adv.expand_as(x.advantages).clone())
    m = x.loss_mask.double()
    keep = trl_opsm(
        advantages=x.advantages[:, :1] if outcome else x.advantages, per_token_logps=x.log_probs,
        sampling_per_token_logps=x.rollout_log_probs, mask=m, off_policy_threshold=delta,
    )
    ours = opsm(x, delta=delta)
    assert torch.equal(ours.loss_mask, x.loss_mask & keep.bool().expand_as(m))
