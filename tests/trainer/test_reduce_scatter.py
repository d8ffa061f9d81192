"""FSDP2's gradient reduction on gloo (``skyrl_fn.trainer.sharding.AllReduceScatter``: one
all-reduce, each rank keeping its slice) gives the gradients of gloo's own reduce-scatter, bit for
bit at two ranks. Two processes of a gloo group (torch.multiprocessing): slow, in make test-all."""

from __future__ import annotations

import os

import pytest
import torch

from skyrl_fn.rollout.weight_sync import free_port


def _grads(rank: int, port: int, custom: bool, out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from skyrl_fn.trainer import sharding

    torch.set_num_threads(1)
    calls = []
    reduce = sharding.AllReduceScatter.__call__
    sharding.AllReduceScatter.__call__ = lambda self, *a, **k: calls.append(1) or reduce(self, *a, **k)
    sharding.init_process_group(rank=rank, world_size=2, host="127.0.0.1", port=port, device="cpu", timeout_s=60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleList([nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 3)]))
    model = sharding.shard_model(model, device="cpu")
    if not custom:  # FSDP2's default reduce-scatter
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        for m in sharding._fsdp_modules(model):
            m.set_custom_reduce_scatter(DefaultReduceScatter())
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))  # each rank its own rows
    h = x
    for layer in model[0]:
        h = torch.tanh(layer(h))
    h.pow(2).sum().backward()
    grads = [p.grad.to_local().clone() for p in model.parameters()]
    torch.save((grads, calls), os.path.join(out, f"{int(custom)}_{rank}.pt"))
    dist.destroy_process_group()


def _run(custom: bool, out: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_grads, args=(free_port(), custom, out), nprocs=2, join=True)


@pytest.mark.slow
def test_the_all_reduce_gives_gloos_reduce_scatter_gradients(tmp_path):
    for custom in (True, False):
        _run(custom, str(tmp_path))
    for rank in (0, 1):
        (got, used), (want, unused) = (torch.load(tmp_path / f"{c}_{rank}.pt") for c in (1, 0))
        assert len(used) == 3 and not unused  # one reduction per block; the default's in the reference
        assert len(got) == len(want) == 6
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    # the two ranks hold different slices of the summed gradient
    assert not all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / "1_0.pt")[0], torch.load(tmp_path / "1_1.pt")[0]))
