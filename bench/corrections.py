"""Cost of composable off-policy corrections inside the policy objective.

Times ``policy_objective(regular, token_mean)`` forward + backward on ``B x T`` float32 without a
correction (the baseline, measured in the same run), with one piece, with SkyRL's four-piece
order as a ``compose_corrections`` chain, and with the fused all-in-one ``off_policy_correction``
(the same four steps in one function). Prints the median ms of ``--repeats`` runs after warm-up and
the ratio to the baseline.

    .venv/bin/python bench/corrections.py [--rows 256] [--tokens 1024] [--repeats 11] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from skyrl_fn.losses import (
    compose_corrections,
    geo_mask,
    icepop,
    off_policy_correction,
    outlier_veto,
    policy_objective,
    regular,
    tis,
    tis_sequence,
    token_mean,
)
from skyrl_fn.core.records import PolicyLossInput


def _fused(batch: PolicyLossInput):
    return off_policy_correction(
        batch.old_log_probs, batch.rollout_log_probs, batch.loss_mask, tis_ratio_type="sequence", tis_cap=5.0,
        token_mask_low=0.5, token_mask_high=5.0, sequence_mask_metric="geometric",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, t = args.rows, args.tokens
    lp0 = -3 * torch.rand(b, t, generator=g) - 0.05
    old = lp0 + 0.05 * torch.randn(b, t, generator=g)
    roll = old + 0.05 * torch.randn(b, t, generator=g)
    mask = torch.arange(t)[None, :] < torch.randint(t // 4, t + 1, (b, 1), generator=g)
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()

    variants = {
        "no correction (baseline)": None,
        "tis": compose_corrections(tis),
        "chain: outlier_veto, icepop, tis_sequence, geo_mask": compose_corrections(outlier_veto, icepop, tis_sequence, geo_mask),
        "fused off_policy_correction (same steps but the veto)": _fused,
    }

    def once(correction) -> float:
        lp = lp0.clone().requires_grad_()
        batch = PolicyLossInput.unchecked(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask, rollout_log_probs=roll)
        t0 = time.perf_counter()
        out = policy_objective(batch, loss=regular, aggregation=token_mean, correction=correction)
        out.loss.backward()
        return (time.perf_counter() - t0) * 1e3

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for c in variants.values():
            once(c)
    for _ in range(args.repeats):  # interleaved rounds: load changes hit every variant alike
        for name, c in variants.items():
            times[name].append(once(c))
    base = statistics.median(times["no correction (baseline)"])
    print(f"B={b} T={t} float32, forward+backward of policy_objective(regular, token_mean), {args.threads} threads")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<55} {med:8.2f} ms  x{med / base:5.2f}")


if __name__ == "__main__":
    main()
