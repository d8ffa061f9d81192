"""Seconds per training step with one step of asynchrony (``--trainer.max-staleness 1``) vs the
synchronous loop (``0``), on Ray with one rollout worker and one policy trainer (one torch thread
each, so each can have its own core).

The configuration is chosen so that sampling and training take about the same time (printed: the
median ``rollout_seconds`` and ``update_seconds`` of the synchronous steps), which is where overlap
helps most: the ideal ratio is 0.5, the goal of issue 16 is <= 0.65.

One set of actors runs both modes, alternating blocks of ``--block`` steps (synchronous steps are
``skyrl_fn.trainer.loop.run_step``; asynchronous ones take their batch from
``skyrl_fn.trainer.async_loop.AsyncRollouts``, exactly as ``train`` does), so load drift on a shared
machine hits both alike and no actor start-up is timed. A step's time is the wall time from one
step's end to the next's; the first step of each block (the switch) is dropped. Reported: the
median step time of each mode and their ratio, and the machine's own headroom measured in the same
run: the time of two CPU-bound single-thread processes in parallel over the same work done one
after the other (0.5 on two idle cores; near 1.0 when other load leaves no second core to
overlap on, and then no asynchrony can show).

    .venv/bin/python bench/async.py [--blocks 8] [--block 5] [launcher flags...]
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
from skyrl_fn.cli import parse_config, resolve_names  # noqa: E402

#: Sampling and training of similar length on 2 CPU cores (tiny Llama, digits task, GRPO).
BALANCED = [
    "--trainer.prompts-per-step", "16", "--rollout.samples-per-prompt", "8", "--rollout.max-new-tokens", "12",
    "--trainer.micro-batch-size", "64", "--trainer.torch-threads", "1", "--ray.rollout-workers", "1",
    "--algorithm.off-policy-correction", "tis", "--logging.no-progress",
]


def _matmuls(n: int) -> float:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t = time.perf_counter()
    for _ in range(n):
        a @ a
    return time.perf_counter() - t


def parallel_headroom(n: int = 300) -> float:
    """Wall time of two single-thread matmul loops in parallel / the same two one after the other."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_matmuls, [1, 1])  # workers started and warm
        t = time.perf_counter()
        pool.apply(_matmuls, (n,))
        pool.apply(_matmuls, (n,))
        one_after_other = time.perf_counter() - t
        t = time.perf_counter()
        pool.map(_matmuls, [n, n])
        return (time.perf_counter() - t) / one_after_other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="blocks per mode")
    ap.add_argument("--block", type=int, default=5, help="steps per block")
    args, rest = ap.parse_known_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from skyrl_fn.distributed.ray_workers import RayWorkers
    from skyrl_fn.trainer.async_loop import AsyncRollouts
    from skyrl_fn.trainer.experience import kl_controller_of
    from skyrl_fn.trainer.loop import rollout_seed, run_step, seed_everything
    from skyrl_fn.tasks.base import DataState, next_prompts

    steps = 2 * args.blocks * args.block
    argv = [*BALANCED, *rest, "--trainer.max-staleness", "1", "--trainer.steps", str(steps + 1), "--logging.run-dir", tempfile.mkdtemp(prefix="bench_async_")]
    run = resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)
    cfg = run.config
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="bench_async_ray_"))
    seed_everything(cfg.trainer.seed)
    task = run.make_task()
    pool = RayWorkers(run)
    headroom = [parallel_headroom()]
    times: dict[int, list[float]] = {0: [], 1: []}
    rollout, update = [], []
    try:
        kl, data, step = kl_controller_of(run), DataState(seed=cfg.trainer.seed), 0
        for b in range(2 * args.blocks):
            k = b % 2
            ahead = AsyncRollouts(run, pool, task, data, start=step, seed_of=rollout_seed) if k else None
            last = time.perf_counter()
            for i in range(args.block):
                if ahead is None:
                    examples, data = next_prompts(task, data, cfg.trainer.prompts_per_step)
                    metrics, kl = run_step(run, pool, step, examples, kl)
                    rollout.append(metrics["rollout_seconds"])
                    update.append(metrics["update_seconds"])
                else:
                    batch = ahead.take(step)
                    metrics, kl = run_step(run, pool, step, batch.examples, kl, generated=batch.handle)
                    ahead.consumed(batch, step)
                    data = ahead.data_state
                now = time.perf_counter()
                if i:
                    times[k].append(now - last)
                last, step = now, step + 1
            # The batch left in flight by an asynchronous block is dropped; its prompts come again.
            if k:
                headroom.append(parallel_headroom())
    finally:
        pool.close()
        ray.shutdown()
    sync, one = statistics.median(times[0]), statistics.median(times[1])
    print(f"synchronous steps: rollout {statistics.median(rollout):.3f} s, update {statistics.median(update):.3f} s (medians)")
    print(f"K=0 {sync:.3f} s/step, K=1 {one:.3f} s/step ({len(times[0])} steps each); step time K=1 / K=0 = {one / sync:.3f} (goal <= 0.65, ideal 0.5)")
    print(f"machine headroom (two processes in parallel / one after the other, median of {len(headroom)}): {statistics.median(headroom):.2f} (0.5 on two idle cores)")


if __name__ == "__main__":
    main()
