"""Seconds per training step of the embedded default: Ray actors vs the same loop in-process.

Both runs use the default ``TrainConfig`` (tiny Llama, digits task, GRPO, 8 prompts x 8 samples)
with checkpoints only at the end, in the same process and the same Ray session. A step's time is
the wall time between consecutive ``on_step`` callbacks (so Ray's scheduling, object transfers
and the weight sync to the rollout worker are included); the first ``--warmup`` steps are dropped
and the median is reported. Rounds alternate in-process / Ray so load drift hits both alike.

    .venv/bin/python bench/train_step.py [--steps 14] [--warmup 4] [--rounds 2]

Prints the overhead ratio ``ray / in-process`` (goal <= 1.10) and tokens/s of rollout and of
training (response tokens / (step time - rollout time)).
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


def measure(run, *, use_ray: bool, warmup: int) -> dict[str, float]:
    from skyrl_fn.launcher.ray_runner import train_on_ray
    from skyrl_fn.train.loop import train

    stamps, rows = [], []

    def on_step(m):
        stamps.append(time.perf_counter())
        rows.append(m)

    t0 = time.perf_counter()
    (train_on_ray if use_ray else train)(run, on_step=on_step)
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
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[], help="more launcher flags, e.g. --extra --model.hidden-size 128")
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="skyrl_fn_bench_")
    argv = ["--trainer.steps", str(a.steps), "--trainer.ckpt-interval", "0", "--logging.run-dir", tmp, *a.extra]
    run = resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="skyrl_fn_ray_"), log_to_driver=False)
    results: dict[str, list[dict[str, float]]] = {"in-process": [], "ray": []}
    try:
        for r in range(a.rounds):
            for name in ("in-process", "ray"):
                res = measure(run, use_ray=name == "ray", warmup=a.warmup)
                results[name].append(res)
                print(f"round {r + 1} {name:>10}: {res['s_per_step']:.3f} s/step, rollout {res['rollout_tok_s']:.0f} tok/s, "
                      f"train {res['train_tok_s']:.0f} tok/s, start-up {res['startup_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    best = {k: min(v, key=lambda x: x["s_per_step"]) for k, v in results.items()}
    ratio = best["ray"]["s_per_step"] / best["in-process"]["s_per_step"]
    print()
    print("| mode | s/step (median, best round) | rollout tok/s | train tok/s |")
    print("|---|---|---|---|")
    for k in ("in-process", "ray"):
        b = best[k]
        print(f"| {k} | {b['s_per_step']:.3f} | {b['rollout_tok_s']:.0f} | {b['train_tok_s']:.0f} |")
    print(f"\nRay overhead ratio (ray / in-process s/step): {ratio:.2f}x  (goal <= 1.10)  cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
