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

Measured per step (the first ``--warmup`` steps dropped, medians; ``skyrl_fn.trainer.timing``):
``update_seconds`` (experience + forward/backward + optimiser step of the rank; the training part
the ranks share), split into ``update_cpu_seconds`` (the process's CPU time), ``update_queue_seconds``
(runnable but waiting for a core another process held) and the rest (blocked: at W=2 waiting in a
collective for the slower rank); fsdp2 reports those of the rank that computed or queued longest. Training tokens/s =
response tokens of the batch / ``update_seconds`` (the same batch in every layout: sampling is
W-invariant); per CPU-second, the same over ``update_cpu_seconds`` — what the wall ratio would be
on an idle machine with no rank waiting for the other. The queue time says how idle the machine
was: ~0 when nothing else ran. The hypervisor's steal (``/proc/stat``) during each run is printed
too: a rank loses stolen time while running, so it shows only as ``blocked`` time, and at W=2 the
other rank waits for it; with more than a few percent the wall ratio says little. Ratios are
printed as the median over rounds and the best round.
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

from bench_machine import cpu_ticks, steal_percent  # noqa: E402
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

    before = cpu_ticks()
    rows = train(run, workers=Recording).history[warmup:]
    after = cpu_ticks()
    tokens = statistics.median(r["response_tokens"] for r in rows)
    update = statistics.median(r["update_seconds"] for r in rows)
    med = {k: statistics.median(r.get(k, float("nan")) for r in rows) for k in ("update_cpu_seconds", "update_queue_seconds")}
    blocked = statistics.median(r["update_seconds"] - r["update_cpu_seconds"] - r.get("update_queue_seconds", float("nan")) for r in rows)
    return {
        "update_s": update,
        "cpu_s": med["update_cpu_seconds"],
        "queue_s": med["update_queue_seconds"],
        "blocked_s": blocked,
        "step_s": statistics.median(r["step_seconds"] for r in rows),
        "train_tok_s": tokens / update,
        "cpu_tok_s": tokens / med["update_cpu_seconds"],
        "rank_bytes": max((m["params"] + m["optim"] for m in memory), default=float("nan")),
        "steal_pct": steal_percent(before, after),
    }


def _ratio(got: dict[str, list[dict[str, float]]], key: str, num: str, den: str) -> str:
    """``num / den`` of ``key``: the median over rounds, and the best round's (of each layout)."""
    med = statistics.median(r[key] for r in got[num]) / statistics.median(r[key] for r in got[den])
    best = max(r[key] for r in got[num]) / max(r[key] for r in got[den]) if key.endswith("tok_s") else min(r[key] for r in got[num]) / min(r[key] for r in got[den])
    return f"{med:.2f}x median of rounds, {best:.2f}x best round"


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
    print(f"\nmodel hidden 256 x 4 layers; batch 8 x 8, <= {args.new_tokens} new tokens; medians over {args.rounds} rounds")
    print("(medians; per step: update wall s = cpu s (the process's CPU) + queue s (runnable, waiting for a core held by another process) + the rest (blocked: at W=2 waiting for the other rank); fsdp2: the rank that computed or queued longest)")
    for m, rows in got.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"{m:6s} update {med['update_s']:.3f} s: cpu {med['cpu_s']:.3f}, queue {med['queue_s']:.3f}, blocked {med['blocked_s']:.3f}; "
            f"step {med['step_s']:.3f} s; training {med['train_tok_s']:.0f} tok/s; rank params+optim {med['rank_bytes'] / 2**20:.2f} MiB"
        )
    print(f"throughput fsdp2 / plain (training tok/s, wall): {_ratio(got, 'train_tok_s', 'fsdp2', 'plain')} (goal >= 1.6)")
    print(f"throughput fsdp2 / plain (training tok per CPU-second of the slower rank): {_ratio(got, 'cpu_tok_s', 'fsdp2', 'plain')} (the wall ratio with no queue and no blocking)")
    print(f"step time plain / fsdp2: {_ratio(got, 'step_s', 'plain', 'fsdp2')}")
    print(f"memory per rank fsdp2 / fsdp1: {_ratio(got, 'rank_bytes', 'fsdp2', 'fsdp1')} (goal <= 0.6)")
    print(f"overhead fsdp1 / plain (update wall time): {_ratio(got, 'update_s', 'fsdp1', 'plain')} (goal <= 1.10)")
    print(f"overhead fsdp1 / plain (update CPU time): {_ratio(got, 'cpu_s', 'fsdp1', 'plain')}")
    steal = [r["steal_pct"] for rows in got.values() for r in rows]
    print(f"hypervisor steal during the runs: {statistics.median(steal):.1f}% median, {max(steal):.1f}% max of the machine's CPU time (/proc/stat; ~0 on a quiet host)")
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
