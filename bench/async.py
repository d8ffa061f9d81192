"""Seconds per training step with one step of asynchrony (``--trainer.max-staleness 1``) vs the
synchronous loop (``0``), on Ray with one rollout worker and one policy trainer (one torch thread
each, so each can have its own core).

The configuration is chosen so that sampling and training take about the same time (printed: the
median ``rollout_seconds`` and ``update_seconds`` of the synchronous run), which is where overlap
helps most: the ideal ratio is 0.5, the goal of issue 16 is <= 0.65. A step's time is the wall time
between consecutive ``on_step`` callbacks; the first ``--warmup`` steps are dropped and the median
is taken. Rounds alternate K = 0 and K = 1 in one Ray session so load drift hits both alike; the
ratio is the median over rounds of K=1 / K=0 of the same round.

    .venv/bin/python bench/async.py [--steps 16] [--warmup 3] [--rounds 3] [launcher flags...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skyrl_fn import DEFAULT_TABLE  # noqa: E402
from skyrl_fn.launcher import parse_config, resolve_names  # noqa: E402

#: Sampling and training of similar length on 2 CPU cores (tiny Llama, digits task, GRPO).
BALANCED = [
    "--trainer.prompts-per-step", "16", "--rollout.samples-per-prompt", "8", "--rollout.max-new-tokens", "12",
    "--trainer.micro-batch-size", "64", "--trainer.torch-threads", "1",
    "--ray.rollout-workers", "1", "--trainer.ckpt-interval", "0", "--logging.no-progress",
    "--logging.no-tensorboard", "--logging.no-plot",
]


def measure(argv: list[str], k: int, *, steps: int, warmup: int) -> dict[str, float]:
    from skyrl_fn.launcher.ray_runner import train_on_ray

    run_dir = tempfile.mkdtemp(prefix=f"bench_async_k{k}_")
    args = [*BALANCED, *argv, "--trainer.steps", str(steps), "--trainer.max-staleness", str(k), "--logging.run-dir", run_dir]
    run = resolve_names(parse_config(args, DEFAULT_TABLE), DEFAULT_TABLE)
    stamps, rows = [], []

    def on_step(m):
        stamps.append(time.perf_counter())
        rows.append(m)

    train_on_ray(run, on_step=on_step)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][max(0, warmup - 1):]
    steady = rows[warmup:]
    return {
        "s_per_step": statistics.median(intervals),
        "rollout_s": statistics.median(r["rollout_seconds"] for r in steady),
        "update_s": statistics.median(r["update_seconds"] for r in steady),
        "reward_last": rows[-1]["reward"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args, rest = ap.parse_known_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="bench_async_ray_"))
    try:
        rounds = []
        for r in range(args.rounds):
            sync = measure(rest, 0, steps=args.steps, warmup=args.warmup)
            async_ = measure(rest, 1, steps=args.steps, warmup=args.warmup)
            rounds.append((sync, async_))
            print(
                f"round {r + 1}: K=0 {sync['s_per_step']:.3f} s/step (rollout {sync['rollout_s']:.3f} s, update {sync['update_s']:.3f} s); "
                f"K=1 {async_['s_per_step']:.3f} s/step; ratio {async_['s_per_step'] / sync['s_per_step']:.3f}",
                flush=True,
            )
    finally:
        ray.shutdown()
    ratio = statistics.median(a["s_per_step"] / s["s_per_step"] for s, a in rounds)
    print(
        f"median over {args.rounds} rounds: K=0 {statistics.median(s['s_per_step'] for s, _ in rounds):.3f} s/step, "
        f"K=1 {statistics.median(a['s_per_step'] for _, a in rounds):.3f} s/step; step time K=1 / K=0 = {ratio:.3f} (goal <= 0.65, ideal 0.5)"
    )


if __name__ == "__main__":
    main()
