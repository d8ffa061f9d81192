"""Data-parallel scaling of the policy update (``--trainer.workers W``), as ratios from one run.

Three layouts of the same run (GRPO, Llama hidden 256 x 4 layers, 8 prompts x 8 samples, up to
``--new-tokens`` (64) new tokens, ``--trainer.torch-threads 1`` per process), in one Ray session,
rounds alternated so load drift hits all alike. The batch is large enough for the update to be
compute-bound (~1.5 s of forward/backward at W=1): with 16 new tokens (0.45 s) the fixed per-step
costs (Ray calls, the all-gather of the sampled batch, gloo latency) are a third of the update
and the run-to-run spread hides the scaling.

- ``plain``: the single policy actor (``RayWorkers``, ``trainer.workers = 1``);
- ``fsdp1``: the data-parallel path with one rank (``DPWorkers``: process group, FSDP2, the
  gathered sampling copy) — its overhead over ``plain``;
- ``fsdp2``: two ranks.

Measured per step (the first ``--warmup`` steps dropped, medians): ``update_seconds`` (experience
+ forward/backward + optimiser step of the rank; the training part the ranks share) and the
step's wall time. Training tokens/s = response tokens of the batch / ``update_seconds`` (the same batch in every
layout: sampling is W-invariant).
Memory: each rank's resident parameter + AdamW state bytes (its FSDP2 shards), after training.

    .venv/bin/python bench/scale.py [--steps 6] [--warmup 2] [--rounds 2] [--new-tokens 64] [launcher flags...]

Goals (issue 13): training tokens/s fsdp2/plain >= 1.6; per-rank params+optimiser fsdp2/fsdp1
<= 0.6; update time fsdp1/plain <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skyrl_fn import DEFAULT_TABLE  # noqa: E402
from skyrl_fn.cli import parse_config, resolve_names  # noqa: E402

MODEL = [
    "--model.hidden-size", "256", "--model.num-layers", "4", "--model.num-heads", "4", "--model.intermediate-size", "512",
    "--trainer.prompts-per-step", "8", "--rollout.samples-per-prompt", "8",
    "--trainer.micro-batch-size", "16", "--trainer.torch-threads", "1", "--logging.no-progress",
    "--trainer.ckpt-interval", "0",
]


def measure(run, workers, warmup: int) -> dict[str, float]:
    from skyrl_fn.trainer.loop import train

    memory: list = []

    class Recording(workers):
        def close(self):
            if hasattr(self, "resident_bytes"):
                memory.extend(self.resident_bytes())
            super().close()

    rows = train(run, workers=Recording).history[warmup:]
    tokens = statistics.median(r["response_tokens"] for r in rows)
    update = statistics.median(r["update_seconds"] for r in rows)
    return {
        "update_s": update,
        "step_s": statistics.median(r["step_seconds"] for r in rows),
        "train_tok_s": tokens / update,
        "rank_bytes": max((m["params"] + m["optim"] for m in memory), default=float("nan")),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64, help="--rollout.max-new-tokens of the measured run")
    args, rest = p.parse_known_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from skyrl_fn.distributed.dp import DPWorkers
    from skyrl_fn.distributed.ray_workers import RayWorkers

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="skyrl_fn_ray_"))
    tmp = tempfile.mkdtemp(prefix="bench_scale_")

    def run(w: int):
        argv = [*MODEL, "--trainer.steps", str(args.steps), "--trainer.workers", str(w), "--rollout.max-new-tokens", str(args.new_tokens), "--logging.run-dir", f"{tmp}/w{w}", *rest]
        return resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)

    modes = {"plain": (run(1), RayWorkers), "fsdp1": (run(1), DPWorkers), "fsdp2": (run(2), DPWorkers)}
    got: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for name, (resolved, workers) in modes.items():
            got[name].append(measure(resolved, workers, args.warmup))
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in got[name][-1].items()), flush=True)
    best = {m: min(rows, key=lambda x: x["update_s"]) for m, rows in got.items()}
    print(f"\nmodel hidden 256 x 4 layers; batch 8 x 8, <= {args.new_tokens} new tokens; best of {args.rounds} rounds")
    for m, b in best.items():
        print(f"{m:6s} update {b['update_s']:.3f} s  step {b['step_s']:.3f} s  training {b['train_tok_s']:.0f} tok/s  rank params+optim {b['rank_bytes'] / 2**20:.2f} MiB")
    print(f"throughput fsdp2 / plain (training tok/s): {best['fsdp2']['train_tok_s'] / best['plain']['train_tok_s']:.2f}x (goal >= 1.6)")
    print(f"step time plain / fsdp2: {best['plain']['step_s'] / best['fsdp2']['step_s']:.2f}x")
    print(f"memory per rank fsdp2 / fsdp1: {best['fsdp2']['rank_bytes'] / best['fsdp1']['rank_bytes']:.2f}x (goal <= 0.6)")
    print(f"overhead fsdp1 / plain (update time): {best['fsdp1']['update_s'] / best['plain']['update_s']:.2f}x (goal <= 1.10)")
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
