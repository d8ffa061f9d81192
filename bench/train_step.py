"""Seconds per training step of the embedded default: Ray actors vs the same loop in-process.

Three runs of the default ``TrainConfig`` (tiny Llama, digits task, GRPO), checkpoints only at the
end, in the same process and the same Ray session: in-process (``--ray.no-use-ray``), Ray in the
default hybrid layout (the policy trainer samples itself), and Ray with one separate rollout worker
(``--ray.rollout-workers 1``: the policy's weights are pushed to it after every update). A step's
time is the wall time between consecutive ``on_step`` callbacks (so Ray's scheduling and object
transfers are included); the first ``--warmup`` steps are dropped and the median is reported.
Rounds alternate the modes so load drift hits all alike; the ratio compares each mode's best round.

    .venv/bin/python bench/train_step.py [--steps 30] [--warmup 5] [--rounds 3] [launcher flags...]

Prints the overhead ratio ``ray / in-process`` (goal <= 1.10, for the default layout) and tokens/s
of rollout and of training (response tokens / (step time - rollout time)).
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


def measure(run, *, use_ray: bool, warmup: int, rollout_workers: int = 0) -> dict[str, float]:
    from skyrl_fn.distributed.ray_runner import train_on_ray
    from skyrl_fn.trainer.loop import train

    stamps, rows = [], []

    def on_step(m):
        stamps.append(time.perf_counter())
        rows.append(m)

    t0 = time.perf_counter()
    if use_ray:
        train_on_ray(run, on_step=on_step, num_rollout_workers=rollout_workers)
    else:
        train(run, on_step=on_step)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][max(0, warmup - 1):]
    steady = rows[warmup:]
    tokens = statistics.median(r["response_tokens"] for r in steady)
    rollout = statistics.median(r["rollout_seconds"] for r in steady)
    step = statistics.median(intervals)
    return {
        "s_per_step": step,
        "rollout_tok_s": statistics.median(r["response_tokens"] / r["rollout_seconds"] for r in steady),
        "train_tok_s": tokens / max(step - rollout, 1e-9),
        "startup_s": stamps[0] - t0 - rows[0]["step_seconds"],
        "reward_last": rows[-1]["reward"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    a, extra = p.parse_known_args()  # anything else goes to the launcher, e.g. --model.hidden-size 128
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="skyrl_fn_bench_")
    argv = ["--trainer.steps", str(a.steps), "--trainer.ckpt-interval", "0", "--logging.run-dir", tmp, *extra]
    run = resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="skyrl_fn_ray_"), log_to_driver=False)
    modes = {"in-process": None, "ray (hybrid, default)": 0, "ray + 1 rollout worker": 1}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    try:
        for r in range(a.rounds):
            for name, workers in modes.items():
                res = measure(run, use_ray=workers is not None, warmup=a.warmup, rollout_workers=workers or 0)
                results[name].append(res)
                print(f"round {r + 1} {name:>22}: {res['s_per_step']:.3f} s/step, rollout {res['rollout_tok_s']:.0f} tok/s, "
                      f"train {res['train_tok_s']:.0f} tok/s, start-up {res['startup_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    best = {k: min(v, key=lambda x: x["s_per_step"]) for k, v in results.items()}
    base = best["in-process"]["s_per_step"]
    print()
    print("| mode | s/step (median, best round) | x in-process | rollout tok/s | train tok/s |")
    print("|---|---|---|---|---|")
    for k, b in best.items():
        print(f"| {k} | {b['s_per_step']:.3f} | {b['s_per_step'] / base:.2f} | {b['rollout_tok_s']:.0f} | {b['train_tok_s']:.0f} |")
    ratio = best["ray (hybrid, default)"]["s_per_step"] / base
    print(f"\nRay overhead ratio (default layout / in-process s/step): {ratio:.2f}x  (goal <= 1.10)  "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
