"""Peak memory and time of fused chunked log-probs vs the naive ``log_softmax(h @ W.T).gather``.

Run: ``.venv/bin/python bench/logprobs.py [--tokens 8192] [--vocab 32000] [--hidden 256]``

One measured call is forward + backward of ``sum_i a_i log p_i`` (random upstream weights ``a``,
as a policy-gradient loss) with respect to ``hidden [N, H]`` and ``weight [V, H]``, float32 on CPU:

- naive: ``log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None])``
- fused: ``skyrl_fn.ops.logprobs.token_logprobs_from_hidden`` (default ``chunk_size`` and
  ``keep_bytes`` unless given)

Every path runs in its own fresh subprocess (``--worker``), so one path's freed memory can never
serve the other. In the worker: inputs are built, a tiny warm-up initialises the libraries, freed
heap is returned to the OS (``malloc_trim``), the kernel's peak-RSS counter is reset (``echo 5 >
/proc/self/clear_refs``), and the baseline ``VmRSS`` is read; the first full-size call is then
measured as ``VmHWM - baseline`` (peak resident memory above the baseline, inputs excluded,
gradients included). Time is the minimum over the measured call and ``--repeats`` further calls
(the machine may be shared; the minimum is the least disturbed run), as wall time and as the
process's CPU time (user + system, from ``getrusage``; steadier when other jobs share the cores).
Workers of both paths alternate over ``--rounds``; medians over all calls are printed as well.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("naive", "fused", "naive+entropy", "fused+entropy")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(args: argparse.Namespace) -> None:
    import torch

    from skyrl_fn.ops.logprobs import token_logprobs_from_hidden

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, v, h_dim = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(n, h_dim)
    weight = torch.randn(v, h_dim) * h_dim**-0.5
    targets = torch.randint(0, v, (n,))
    adv = torch.randn(n)
    entropy = args.worker.endswith("+entropy")
    fused = args.worker.startswith("fused")

    def step(hid, w, tgt, a):
        hid = hid.detach().requires_grad_()
        w = w.detach().requires_grad_()
        if fused:
            out = token_logprobs_from_hidden(hid, w, tgt, chunk_size=args.chunk_size, keep_bytes=args.keep_bytes,
                                             with_entropy=entropy)
            loss = (out.log_probs * a).sum() + 0.01 * out.entropy.sum() if entropy else (out * a).sum()
        else:
            logp = torch.log_softmax(hid @ w.T, dim=-1)
            lp = logp.gather(-1, tgt[:, None]).squeeze(-1)
            loss = (lp * a).sum()
            if entropy:
                loss = loss + 0.01 * (-(logp.exp() * logp).sum(-1)).sum()
        loss.backward()
        return hid.grad, w.grad

    step(hidden[:64], weight[:512], targets[:64] % 512, adv[:64])  # initialise kernels, autograd
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    resettable = _reset_peak()
    base = _status_kib("VmRSS")
    floor = _status_kib("VmHWM")
    t0, c0 = time.perf_counter(), _cpu_s()
    grads = step(hidden, weight, targets, adv)
    times, cpus = [time.perf_counter() - t0], [_cpu_s() - c0]
    peak = _status_kib("VmHWM")
    del grads
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), _cpu_s()
        step(hidden, weight, targets, adv)
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    print(json.dumps({
        "path": args.worker, "peak_mib": (peak - base) / 1024, "time_s": min(times), "cpu_s": min(cpus),
        "times": times, "cpus": cpus, "hwm_reset": resettable, "floor_mib": (floor - base) / 1024,
        "threads": torch.get_num_threads(),
    }))


def _run_worker(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--repeats", str(args.repeats)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.keep_bytes is not None:
        cmd += ["--keep-bytes", str(args.keep_bytes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="N rows")
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--hidden", type=int, default=256, help="H")
    p.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: library default)")
    p.add_argument("--keep-bytes", type=int, default=None,
                   help="fused forward chunks kept for backward, bytes (default: library default)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per worker after the measured one")
    p.add_argument("--rounds", type=int, default=2, help="alternating naive/fused worker pairs")
    p.add_argument("--entropy", action="store_true", help="also bench log-probs + entropy")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    p.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    from skyrl_fn.ops.logprobs import DEFAULT_CHUNK_ELEMENTS, DEFAULT_KEEP_BYTES

    chunk = args.chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // args.vocab)
    keep = DEFAULT_KEEP_BYTES if args.keep_bytes is None else args.keep_bytes
    print(f"N={args.tokens} V={args.vocab} H={args.hidden} float32 CPU, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, fused chunk_size={chunk}"
          f"{'' if args.chunk_size else ' (default)'}, keep_bytes={keep / 2**20:.0f} MiB"
          f"{'' if args.keep_bytes is not None else ' (default)'}; forward+backward wrt hidden and weight")
    pairs = [("naive", "fused")] + ([("naive+entropy", "fused+entropy")] if args.entropy else [])
    for base_name, fused_name in pairs:
        res: dict[str, list[dict]] = {base_name: [], fused_name: []}
        for _ in range(args.rounds):
            for name in (base_name, fused_name):
                res[name].append(_run_worker(name, args))
        if not all(r["hwm_reset"] for rs in res.values() for r in rs):
            print("warning: could not reset VmHWM; peaks include set-up")
        summary = {
            name: {k: min(r[k] for r in rs) for k in ("peak_mib", "time_s", "cpu_s")} for name, rs in res.items()
        }
        threads = res[base_name][0]["threads"]
        print(f"{'path':<16}{'peak MiB above baseline':>25}{'wall s (min)':>14}{'CPU s (min)':>13}")
        for name, m in summary.items():
            print(f"{name:<16}{m['peak_mib']:>25.0f}{m['time_s']:>14.2f}{m['cpu_s']:>13.2f}")
        b, f = summary[base_name], summary[fused_name]
        mem, wall, cpu = f["peak_mib"] / b["peak_mib"], f["time_s"] / b["time_s"], f["cpu_s"] / b["cpu_s"]
        # Conservative verdict: on a shared machine wall time alone can flatter either path.
        goal = "MET" if mem <= 0.20 and max(wall, cpu) <= 1.10 else "NOT MET"
        print(f"ratio {fused_name}/{base_name} ({threads} threads): memory {mem:.3f}x, wall time {wall:.3f}x, "
              f"CPU time {cpu:.3f}x (goal <=0.20x memory at <=1.10x wall and CPU time: {goal})")
        med = {name: {k: statistics.median(t for r in rs for t in r[k]) for k in ("times", "cpus")}
               for name, rs in res.items()}
        print(f"  medians over all calls: wall {med[fused_name]['times'] / med[base_name]['times']:.3f}x, "
              f"CPU {med[fused_name]['cpus'] / med[base_name]['cpus']:.3f}x "
              f"({base_name} {med[base_name]['cpus']:.2f} s, {fused_name} {med[fused_name]['cpus']:.2f} s CPU)")
        print("  all wall s:", {k: [round(t, 2) for r in rs for t in r["times"]] for k, rs in res.items()})
        print("  all CPU s: ", {k: [round(t, 2) for r in rs for t in r["cpus"]] for k, rs in res.items()})


if __name__ == "__main__":
    main()
