"""Start-up time of a GGUF model: cold (parse + dequantise the GGUF, write the safetensors cache)
vs warm (load the cached HF directory), tokenizer and model, measured in this run.

    .venv/bin/python bench/model_load.py [--model smollm2-135m-instruct] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skyrl_fn.models.model import ModelConfig
from skyrl_fn.models.model import load_model, load_tokenizer  # noqa: E402


def _start(cfg: ModelConfig) -> float:
    t0 = time.perf_counter()
    load_model(cfg, load_tokenizer(cfg))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    cold, warm = [], []
    for r in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="skyrl_fn_cache_") as cache:
            cfg = ModelConfig(name_or_path=a.model, cache_dir=cache)
            cold.append(_start(cfg))
            warm.append(_start(cfg))
        print(f"round {r + 1}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\nmedian start: cold {c:.1f} s, warm {w:.1f} s; warm/cold {w / c:.2f}x  cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
