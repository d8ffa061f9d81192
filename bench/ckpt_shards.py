"""Checkpoint of a W=2 FSDP2 policy: every rank writing its own shards (``skyrl_fn.trainer.shards``,
what ``--trainer.workers 2`` does now) vs gathering the whole state on rank 0 and writing it there
(what it did before). Two processes over gloo (no Ray: the mechanisms alone); prints the median
seconds of each, their ratio, and each rank's file size against the whole state's.

    .venv/bin/python bench/ckpt_shards.py [--repeats 5] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skyrl_fn.models.model import ModelConfig, load_model, load_tokenizer
from skyrl_fn.rollout.weight_sync import free_port
from skyrl_fn.tasks.arithmetic import ArithmeticTask
from skyrl_fn.trainer import shards
from skyrl_fn.trainer.learner import make_train_state
from skyrl_fn.trainer.sharding import init_process_group, shard_model


def _gathered_write(model, optimizer, path: str, rank: int) -> int:
    """The previous way: the full state on rank 0 (a collective), written there; its bytes."""
    from safetensors.torch import save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    if rank != 0:
        return 0
    buf = io.BytesIO()
    torch.save(optim, buf)
    data = save({k: v.contiguous().clone() for k, v in weights.items()}) + buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data)


def _rank(rank: int, args, port: int, work: str) -> None:
    torch.set_num_threads(1)
    init_process_group(rank=rank, world_size=2, host="127.0.0.1", port=port, device="cpu", timeout_s=600)
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, intermediate_size=4 * args.hidden)
    model = shard_model(load_model(cfg, load_tokenizer(cfg, alphabet=ArithmeticTask().alphabet), seed=0), device="cpu")
    ts = make_train_state(model, lr=1e-3, weight_decay=0.0, warmup_steps=0)
    model(input_ids=torch.randint(0, 10, (2, 8))).logits.sum().backward()  # AdamW state exists
    ts.optimizer.step()
    times: dict[str, list[float]] = {"sharded": [], "gathered": []}
    for i in range(args.repeats):
        for how in ("sharded", "gathered"):
            dist.barrier()
            t0 = time.perf_counter()
            if how == "sharded":
                shards.write(model, ts.optimizer, os.path.join(work, f"s{i}"))
            else:
                whole = _gathered_write(model, ts.optimizer, os.path.join(work, f"g{i}"), rank)
            dist.barrier()
            times[how].append(time.perf_counter() - t0)
    if rank == 0:
        s, g = statistics.median(times["sharded"]), statistics.median(times["gathered"])
        mine = os.path.getsize(os.path.join(work, "s0", "__0_0.distcp"))
        print(json.dumps({
            "sharded_s": round(s, 3), "gathered_s": round(g, 3), "sharded_over_gathered": round(s / g, 2),
            "rank0_file_bytes": mine, "whole_state_bytes": whole, "rank0_file_over_whole": round(mine / whole, 3),
        }))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        mp.spawn(_rank, args=(args, free_port(), work), nprocs=2)


if __name__ == "__main__":
    main()
