"""GPU smoke test of the vLLM path: one command, a few minutes, pass/fail per check with timings.

    pip install -e '.[vllm,dev]'
    python bench/gpu_smoke.py                 # engine checks + colocated layout (+ separate with >= 2 GPUs)
    python bench/gpu_smoke.py --parts engine  # only the in-process engine checks
    python bench/gpu_smoke.py --json out.json # also write the results as JSON
    python bench/gpu_smoke.py --strict        # a missing vLLM/CUDA is a failure, not a skip

Parts (each in its own subprocess, so one part's GPU memory never leaks into the next):

* ``engine`` — no Ray: a vLLM engine on ``skyrl_fn.distributed.smoke.SMOKE_MODEL`` (bf16, head dim 128)
  starts and sleeps; its rollout log-probs equal the learner's (``batched_log_probs`` on the GPU)
  at top_p 1.0 and 0.9; sleeping frees the GPU; after ``sync_weights`` of perturbed weights the
  engine samples with the new weights (its log-probs agree with the new model, not the old).
* ``colocated`` / ``separate`` — ``RayWorkers`` on one GPU (engines sleep, weights as bytes over
  ``collective_rpc``) / on two GPUs (trainer and engine apart, NCCL broadcast): start-up, a few
  GRPO steps, every step's sync checked, and the engine's log-probs of fixed prompts after
  training agree with the trained policy's weights and not the initial ones.

Exit status 0 when no check failed, 1 otherwise. Without vLLM or CUDA every check is skipped
(status 0, so ``make bench`` passes on a CPU machine) unless ``--strict``. Timings are wall
seconds of each check on this machine; the checks are correctness checks, not benchmarks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from skyrl_fn.distributed.smoke import SMOKE_MODEL, attention_backends, compare_log_probs, followed_the_policy, head_dim, smoke_config  # noqa: E402
from skyrl_fn.rollout.vllm_backend import vllm_unavailable_reason  # noqa: E402

PARTS = ("engine", "colocated", "separate")
#: bf16 engine vs bf16 learner on different kernels: mean |d log p| well below this.
ATOL = 0.05


class Checks:
    """Collects ``{check, status, seconds, detail}`` rows; a failing check records its error."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, fn):
        """Run ``fn() -> (ok, detail[, value])``; record the row; return ``value`` (None on failure)."""
        t0 = time.perf_counter()
        value = None
        try:
            ok, detail, *rest = fn()
            value = rest[0] if rest and ok else None
            status = "PASS" if ok else "FAIL"
        except Exception as err:  # noqa: BLE001 - a smoke test reports every failure and goes on
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            status, detail = "FAIL", f"{type(err).__name__}: {msg}"
        self.rows.append({"check": name, "status": status, "seconds": round(time.perf_counter() - t0, 2), "detail": detail})
        return value

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"check": name, "status": "SKIP", "seconds": 0.0, "detail": why})


def _fmt(d) -> str:
    if isinstance(d, dict):
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
    return str(d)


# -- part: engine (no Ray) ---------------------------------------------------------------------


def part_engine(checks: Checks, steps: int) -> None:
    import dataclasses

    from skyrl_fn.rollout.vllm_backend import make_vllm_backend
    from skyrl_fn.distributed.devices import to_device
    from skyrl_fn.trainer.forward import batched_log_probs
    from skyrl_fn.models.model import load_model, load_tokenizer
    from skyrl_fn.tasks.choice import make_task
    from skyrl_fn.tasks.base import DataState, next_prompts

    cfg = smoke_config(colocate=True, num_gpus=1, steps=steps)
    task = make_task(cfg.data, seed=0)
    tok = load_tokenizer(cfg.model, alphabet=task.alphabet)
    model = load_model(cfg.model, tok, seed=0).cuda().eval()
    initial = copy.deepcopy(model)
    prompts = [e.prompt for e in next_prompts(task, DataState(seed=123), 8)[0]]
    ro = dataclasses.replace(cfg.rollout, temperature=0.8)

    def learner_lp(m, batch, top_p):
        return batched_log_probs(m, to_device(batch, "cuda"), micro_batch_size=64, temperature=ro.temperature, top_p=top_p).cpu()

    free0, total = torch.cuda.mem_get_info()
    backend = checks.run(
        "engine starts (bf16, head dim 128) and sleeps",
        lambda: (True, {"free_before_engine_GiB": free0 / 2**30}, make_vllm_backend(ro, model, tok, seed=0, colocated=True)),
    )
    if backend is None:
        return

    for top_p in (1.0, 0.9):
        def agree(top_p=top_p):
            backend.cfg = dataclasses.replace(ro, top_p=top_p)
            batch = backend.generate(prompts, seed=1)
            d = compare_log_probs(batch.rollout_log_probs, learner_lp(model, batch, top_p), batch.response_mask)
            return d["mean_abs"] <= ATOL, d

        checks.run(f"rollout log-probs = learner log-probs (top_p={top_p})", agree)
    backend.cfg = ro

    def sleep_frees():
        backend.generate(prompts, seed=2)  # awake for the rollout, asleep after it
        free_asleep = torch.cuda.mem_get_info()[0]
        backend.wake_up()
        free_awake = torch.cuda.mem_get_info()[0]
        backend.sleep()
        freed = (free_asleep - free_awake) / total
        d = {"freed_share": freed, "utilization": ro.gpu_memory_utilization}
        return freed >= 0.5 * ro.gpu_memory_utilization, d

    checks.run("sleep frees the engine's GPU memory", sleep_frees)

    def sync_moves_engine():
        with torch.no_grad():
            gen = torch.Generator(device="cuda").manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float32).to(p.dtype) * 0.05)
        t0 = time.perf_counter()
        backend.sync_weights(model.state_dict())
        sync_s = time.perf_counter() - t0
        batch = backend.generate(prompts, seed=3)
        ok, d = followed_the_policy(batch.rollout_log_probs, learner_lp(model, batch, 1.0), learner_lp(initial, batch, 1.0),
                                    batch.response_mask, atol=ATOL)
        return ok, {**d, "sync_seconds": sync_s}

    checks.run("sync_weights (colocated, bytes over collective_rpc) moves the engine to the new weights", sync_moves_engine)


# -- parts: colocated / separate (Ray) ---------------------------------------------------------


def part_ray(checks: Checks, steps: int, *, colocate: bool, backend: str = "vllm") -> None:
    import ray

    from skyrl_fn import DEFAULT_TABLE
    from skyrl_fn.distributed.ray_runner import init_ray
    from skyrl_fn.distributed.ray_workers import RayWorkers
    from skyrl_fn.trainer.experience import kl_controller_of
    from skyrl_fn.trainer.loop import run_step
    from skyrl_fn.trainer.config import resolve
    from skyrl_fn.trainer.forward import batched_log_probs
    from skyrl_fn.models.model import load_model, load_tokenizer
    from skyrl_fn.tasks.choice import make_task
    from skyrl_fn.tasks.base import DataState, next_prompts

    n_gpus = 1 if colocate else 2
    cfg = smoke_config(colocate=colocate, num_gpus=n_gpus, steps=steps, run_dir=tempfile.mkdtemp(prefix="gpu_smoke_"), backend=backend)
    run = resolve(cfg, DEFAULT_TABLE)
    init_ray(run)
    layout = "colocated, 1 GPU, engines first" if colocate else "separate, 2 GPUs, NCCL group formed"
    trainer = checks.run(f"RayWorkers start ({layout})", lambda: (True, "ok", RayWorkers(run)))
    kl_ctrl = kl_controller_of(run)
    if trainer is None:
        ray.shutdown()
        return
    try:
        task = make_task(cfg.data, seed=0)
        fixed = next_prompts(task, DataState(seed=123), 4)[0]
        tok = load_tokenizer(cfg.model, alphabet=task.alphabet)
        initial = load_model(cfg.model, tok, seed=cfg.trainer.seed).float().eval()

        def lp(model, batch):
            return batched_log_probs(model, batch, micro_batch_size=64, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)

        def before():
            batch = ray.get(trainer.rollout[0].generate.remote(fixed, 777)).rollout
            d = compare_log_probs(batch.rollout_log_probs, lp(initial, batch), batch.response_mask)
            return d["mean_abs"] <= ATOL, d

        checks.run("engine rollout before training = initial weights' log-probs", before)
        state = DataState(seed=0)
        for step in range(steps):
            examples, state = next_prompts(task, state, cfg.trainer.prompts_per_step)

            def one(step=step, examples=examples):
                m = run_step(run, trainer, step, examples, kl_ctrl)[0]
                bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
                return not bad, {"reward": m.get("reward", float("nan")), "non_finite": ",".join(bad) or "none"}

            checks.run(f"step {step + 1}: generate, update, weight sync", one)

        def synced():
            trainer.syncs.check()
            done = list(trainer.syncs.checked_steps)
            if colocate or backend == "hf":
                return done == list(range(steps)), {"checked_steps": done}
            return True, {"broadcasts": steps, "waited": "every step (timeout --gpu.sync-timeout-s)"}

        checks.run("every step's weight sync confirmed", synced)

        def followed():
            after = ray.get(trainer.rollout[0].generate.remote(fixed, 777)).rollout
            weights = ray.get(trainer.policy.get_state.remote())[0].weights
            current = load_model(cfg.model, tok, seed=cfg.trainer.seed).float().eval()
            current.load_state_dict({k: v.float() for k, v in weights.items()})
            return followed_the_policy(after.rollout_log_probs, lp(current, after), lp(initial, after), after.response_mask, atol=ATOL)

        checks.run("engine samples with the trained weights (not the initial ones)", followed)
    finally:
        trainer.close()
        ray.shutdown()


# -- driver ------------------------------------------------------------------------------------


def run_part(part: str, steps: int, timeout: float) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--steps", str(steps), "--result-file", out]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return [{"check": f"{part}: finished", "status": "FAIL", "seconds": round(time.perf_counter() - t0, 1), "detail": f"timed out after {timeout:g} s"}]
    try:
        with open(out) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        rows = []
    if proc.returncode != 0 and not any(r["status"] == "FAIL" for r in rows):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        rows.append({"check": f"{part}: finished", "status": "FAIL", "seconds": round(time.perf_counter() - t0, 1), "detail": tail[0]})
    return [{**r, "part": part} for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    ap.add_argument("--steps", type=int, default=3, help="training steps per Ray layout")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per part")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--strict", action="store_true", help="fail (exit 1) when vLLM or CUDA is missing instead of skipping")
    ap.add_argument("--cpu-plumbing", action="store_true",
                    help="run the Ray part's checks with the hf backend on CPU: tests this script, proves nothing about vLLM")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.part is not None:  # a subprocess running one part
        checks = Checks()
        {"engine": lambda: part_engine(checks, args.steps),
         "colocated": lambda: part_ray(checks, args.steps, colocate=True),
         "separate": lambda: part_ray(checks, args.steps, colocate=False)}[args.part]()
        with open(args.result_file, "w") as f:
            json.dump(checks.rows, f)
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.cpu_plumbing:
        checks = Checks()
        part_ray(checks, args.steps, colocate=True, backend="hf")
        for r in checks.rows:
            print(f"{r['status']:<5} cpu-plumbing {r['check']}  {r['seconds']:.2f}s  {_fmt(r['detail'])}")
        return 1 if any(r["status"] == "FAIL" for r in checks.rows) else 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: expected names from {PARTS}, got {unknown}")
    rows: list[dict] = []
    reason = vllm_unavailable_reason()
    dim = head_dim(SMOKE_MODEL)
    env = {"torch": torch.__version__, "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "model": f"hidden {SMOKE_MODEL.hidden_size}, heads {SMOKE_MODEL.num_heads} (head dim {dim}), {SMOKE_MODEL.dtype}",
           "attention backends accepting it": "/".join(attention_backends(dim, SMOKE_MODEL.dtype))}
    # Without vLLM/CUDA nothing can run: SKIP (so `make bench` passes on CPU) unless --strict.
    status = "PASS" if reason is None else ("FAIL" if args.strict else "SKIP")
    rows.append({"part": "env", "check": "vLLM and CUDA available", "status": status, "seconds": 0.0, "detail": reason or _fmt(env)})
    if reason is None:
        for part in parts:
            if part == "separate" and env["gpus"] < 2:
                rows.append({"part": part, "check": "separate layout", "status": "SKIP", "seconds": 0.0, "detail": f"needs 2 GPUs, {env['gpus']} visible"})
                continue
            rows += run_part(part, args.steps, args.timeout)
    width = max(len(r["check"]) for r in rows)
    for r in rows:
        print(f"{r['status']:<5} {r['part']:<10} {r['check']:<{width}}  {r['seconds']:>7.2f}s  {_fmt(r['detail'])}")
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed or skipped; {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
