"""Optimal token baselines: ours (vectorised) vs verl 0.9.1's loops over groups and samples.

B=512 sequences, T=256 tokens, groups of 8, random right-padded lengths, 1 torch thread; each
call timed 5 times, the median printed, and the ratio verl / ours from the same run (the machine
is shared: compare ratios, and repeat). Needs verl importable (install it ``--no-deps`` into a
scratch directory with ``omegaconf tensordict pyvers codetiming orjson packaging pyyaml``)::

    PYTHONPATH=/tmp/peers .venv/bin/python bench/token_baseline.py
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from skyrl_fn import AdvantageInput
from skyrl_fn.estimators import optimal_token_baseline, tir_optimal_token_baseline

B, T, G = 512, 256, 8


def _median_seconds(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    try:
        import verl.trainer.ppo.core_algos as core_algos
    except ImportError as err:
        print(f"verl is not importable ({err}); see this script's docstring", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).float()
    probs = torch.softmax(torch.randn(B, T, 6, generator=g), -1)
    lp, q = probs[..., 0].log(), probs.square().sum(-1)
    index = np.repeat(np.arange(B // G), G)
    batch = AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=index, extras={"old_log_probs": lp, "sum_pi_squared": q})
    verl_kw = dict(token_level_rewards=rewards, response_mask=mask.float(), index=index, old_log_probs=lp, sum_pi_squared=q)
    pairs = (
        ("optimal_token_baseline", optimal_token_baseline, core_algos.compute_optimal_token_baseline_advantage),
        ("tir_optimal_token_baseline", tir_optimal_token_baseline, core_algos.compute_multi_turn_optimal_token_baseline_advantage),
    )
    for name, ours, theirs in pairs:
        a = _median_seconds(lambda: ours(batch))
        b = _median_seconds(lambda: theirs(**verl_kw))
        print(f"{name}: ours {a * 1e3:.1f} ms, verl {b * 1e3:.1f} ms, verl/ours {b / a:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
