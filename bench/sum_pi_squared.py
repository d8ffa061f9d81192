"""``sum_v pi(v)^2`` for the optimal token baseline: the trainer's chunked op vs a full softmax.

``[B, T, V] = [4, 256, 32000]`` float32 logits at temperature 0.7, 1 torch thread; each way timed
5 times, the medians printed with the ratio chunked / full from the same run (the machine is
shared: compare ratios, and repeat). The chunked op holds one ``[C, V]`` chunk (about 16M
elements) besides its input; the full softmax holds two more ``[B, T, V]`` tensors::

    .venv/bin/python bench/sum_pi_squared.py
"""

from __future__ import annotations

import statistics
import timeit

import torch

from skyrl_fn.ops.sum_pi_squared import sum_pi_squared

B, T, V, TAU = 4, 256, 32_000, 0.7


def main() -> None:
    torch.set_num_threads(1)
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(0))
    full = torch.softmax(logits / TAU, dim=-1).square().sum(-1)
    err = float((sum_pi_squared(logits, temperature=TAU) - full).abs().max())
    chunked = statistics.median(timeit.repeat(lambda: sum_pi_squared(logits, temperature=TAU), number=1, repeat=5))
    naive = statistics.median(timeit.repeat(lambda: torch.softmax(logits / TAU, dim=-1).square().sum(-1), number=1, repeat=5))
    print(f"[{B}, {T}, {V}]: chunked {chunked * 1e3:.0f} ms, full softmax {naive * 1e3:.0f} ms, "
          f"chunked / full {chunked / naive:.2f}x, max |difference| {err:.1e}")


if __name__ == "__main__":
    main()
