"""A data-parallel update reduce-scatters its gradients once per FSDP module and optimiser step,
however many micro-batches it runs (``Collectives.accumulate``). Counted in one process (a gloo
group of one rank: FSDP2 runs the same gradient reduction as at W ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from skyrl_fn.models.model import build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.rollout.weight_sync import free_port
from skyrl_fn.trainer.learner import make_experience, make_train_state, policy_update
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.sharding import Collectives, gathered, init_process_group, shard_model


@pytest.fixture
def group():
    init_process_group(rank=0, world_size=1, host="127.0.0.1", port=free_port(), device="cpu", timeout_s=60)
    try:
        yield Collectives("cpu")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def counted(monkeypatch):
    """Calls of FSDP2's gradient reduction (one reduce-scatter per FSDP module each)."""
    # Imported here, not at the top: torch.distributed.fsdp takes ~1 s to import, which every
    # pytest-xdist process would pay at collection (skyrl_fn imports it only when it shards).
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    calls = {"reduce": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(param_group, "foreach_reduce", counting("reduce", param_group.foreach_reduce))
    return calls


@pytest.mark.parametrize("epochs", [1, 2])
def test_one_reduce_scatter_per_module_and_optimiser_step(make_config, table, group, counted, epochs):
    cfg = make_config(algorithm={"update_epochs": epochs}, rollout={"samples_per_prompt": 4}, trainer={"micro_batch_size": 3})
    run = resolve(cfg, table)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    rollout = HFBackend(model.eval(), tok, cfg.rollout).generate(["n:74>", "n:35>"], seed=0)  # 8 rows: 3 or more micro-batches
    exp, _ = make_experience(run, rollout, torch.linspace(0, 1, rollout.batch_size))
    model = shard_model(model, device="cpu")
    modules = sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in model.modules())  # each block, and the root
    state = make_train_state(model, lr=1e-3)
    with gathered(model.eval(), keep=True):  # as after sampling
        out = policy_update(run, state, exp, dp=group)
    assert out["skipped"] == 0.0
    assert counted["reduce"] == modules * epochs  # not modules * micro-batches * epochs
