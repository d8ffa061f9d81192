"""Sampling tokens/s: skyrl_fn's hf rollout backend vs plain ``model.generate`` on the same batch.

The same model, tokenizer, chat-formatted left-padded prompts (the arithmetic task's first ``P``,
each repeated ``G`` times), ``max_new_tokens``, EOS ids and sampling rule (temperature 1, full
distribution: ``top_k=0, top_p=1``), measured alternately in this process. Tokens counted are the
generated ones up to and including each row's EOS. Both stop when every row has ended. The
backend also returns per-token log-probs and the response masks; ``generate`` returns ids only.

    .venv/bin/python bench/rollout_vs_generate.py [--model smollm2-135m-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from skyrl_fn.tasks.arithmetic import ArithmeticTask  # noqa: E402
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.rollout.base import RolloutConfig
from skyrl_fn.models.model import encode_prompts, eos_token_ids, load_model, load_tokenizer  # noqa: E402
from skyrl_fn.rollout.base import HFBackend  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(name_or_path=a.model)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).eval()
    task = ArithmeticTask(kinds=("add",), min_value=1, max_value=9)
    prompts = [task.example(i).prompt for i in range(a.prompts)]
    backend = HFBackend(model, tok, RolloutConfig(samples_per_prompt=a.samples, max_new_tokens=a.max_new_tokens))
    ids, mask = encode_prompts(tok, prompts)
    ids, mask = ids.repeat_interleave(a.samples, 0), mask.repeat_interleave(a.samples, 0)
    eos = eos_token_ids(tok, model)

    def ours(seed: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = backend.generate(prompts, seed=seed)
        return int(r.response_mask.sum()), time.perf_counter() - t0

    def plain(seed: int) -> tuple[int, float]:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=a.max_new_tokens, eos_token_id=list(eos), pad_token_id=tok.pad_token_id,
            )[:, ids.shape[1]:]
        seconds = time.perf_counter() - t0
        is_eos = torch.isin(out, torch.tensor(eos))
        n = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, out.shape[1])
        return int(n.sum()), seconds

    ours(0), plain(0)  # warm-up
    rates: dict[str, list[float]] = {"skyrl_fn": [], "generate": []}
    for r in range(a.rounds):
        for name, fn in (("skyrl_fn", ours), ("generate", plain)):
            n, s = fn(r + 1)
            rates[name].append(n / s)
            print(f"round {r + 1} {name:>8}: {n} tokens in {s:.2f} s = {n / s:.1f} tok/s", flush=True)
    mine, theirs = statistics.median(rates["skyrl_fn"]), statistics.median(rates["generate"])
    print(
        f"\nmedian tok/s: skyrl_fn hf backend {mine:.1f}, model.generate {theirs:.1f}; ratio {mine / theirs:.2f}x "
        f"(goal >= 0.9)  B={a.prompts * a.samples} T<={a.max_new_tokens} threads={a.threads} "
        f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
