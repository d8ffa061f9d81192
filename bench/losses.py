"""Compiled vs eager policy loss: forward + backward of ``regular`` + ``token_mean`` on CPU.

    .venv/bin/python bench/losses.py                 # B=64, T=1024, float32
    .venv/bin/python bench/losses.py --threads 1 --rounds 7

Prints, measured in the same process and interleaved (eager, compiled, eager, ...) so that load
from other processes hits both alike:

- median wall time per step of each path and the ratio eager / compiled (goal >= 3x);
- the cold compile time (first call);
- recompiles over five further sequence lengths (goal <= 1). ``compile_loss`` compiles with
  ``dynamic=True``; a shape change that is not covered triggers a recompile, and after
  ``torch._dynamo.config.recompile_limit`` of them dynamo silently runs eager, so the script also
  checks that the last length still ran through the compiled graph.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_batch(b: int, t: int, seed: int):
    from skyrl_fn import PolicyLossInput

    g = torch.Generator().manual_seed(seed)
    lp = (-2.0 * torch.rand(b, t, generator=g)).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask)


def step(loss_fn, batch) -> None:
    from skyrl_fn.losses import token_mean

    out = loss_fn(batch)
    loss = token_mean(out.token_loss, batch.loss_mask)
    loss.backward()
    batch.log_probs.grad = None


def time_steps(loss_fn, batch, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(loss_fn, batch)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved eager/compiled rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    from skyrl_fn.losses import regular
    from skyrl_fn.ops.compile import compile_loss, compile_unavailable_reason

    reason = compile_unavailable_reason()
    if reason:
        print(f"torch.compile unavailable: {reason}")
        return
    compiled = compile_loss(regular)
    batch = make_batch(args.batch, args.length, seed=0)
    print(f"regular + token_mean, fwd+bwd, B={args.batch} T={args.length} float32, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}")

    t0 = time.perf_counter()
    step(compiled, batch)
    cold = time.perf_counter() - t0
    graphs0 = counters["stats"]["unique_graphs"]

    # correctness: same loss and gradient on both paths
    out_e, out_c = regular(batch), compiled(batch)
    torch.testing.assert_close(out_c.token_loss, out_e.token_loss, rtol=1e-5, atol=1e-6)

    eager_t, comp_t = [], []
    for _ in range(2):  # warm-up
        step(regular, batch)
        step(compiled, batch)
    for _ in range(args.rounds):
        eager_t += time_steps(regular, batch, args.steps)
        comp_t += time_steps(compiled, batch, args.steps)
    e, c = statistics.median(eager_t), statistics.median(comp_t)
    print(f"cold compile (first call): {cold:.1f} s")
    print(f"eager    median {e * 1e3:8.2f} ms/step")
    print(f"compiled median {c * 1e3:8.2f} ms/step")
    print(f"speed-up eager/compiled: {e / c:.2f}x  (goal >= 3x)")

    lengths = [args.length // 2, args.length * 3 // 4, args.length * 7 // 8, args.length * 5 // 8, args.length + 64]
    for t in lengths:
        step(compiled, make_batch(args.batch, t, seed=t))
    recompiles = counters["stats"]["unique_graphs"] - graphs0
    # The last length must still run compiled (not dynamo's silent eager fallback): time it.
    last = make_batch(args.batch, lengths[-1], seed=1)
    le = statistics.median(time_steps(regular, last, args.steps))
    lc = statistics.median(time_steps(compiled, last, args.steps))
    print(f"recompiles over T={lengths}: {recompiles}  (goal <= 1; recompile_limit="
          f"{getattr(dynamo_config, 'recompile_limit', None)})")
    print(f"at T={lengths[-1]}: eager {le * 1e3:.2f} ms, compiled {lc * 1e3:.2f} ms ({le / lc:.2f}x)")


if __name__ == "__main__":
    main()
