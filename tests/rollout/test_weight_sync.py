"""Weight sync on CPU tensors: the worker-extension methods driven by a fake vLLM worker and a
fake NCCL communicator, the broadcast ranks and the sender's device (the buckets themselves:
``test_buckets.py``)."""

from __future__ import annotations

import types

import pytest
import torch

from skyrl_fn.rollout.buckets import bucket_to_wire, pack_bucket, plan_buckets, plan_to_wire, specs_of, to_hf_names
from skyrl_fn.rollout.weight_sync import EXTENSION_CLS, BroadcastSender, WeightSyncExtension, broadcast_ranks, free_port, indexed_device
from tests.rollout.test_buckets import tiny_state


def test_broadcast_ranks():
    assert broadcast_ranks(1, 1) == (2, (1,))
    assert broadcast_ranks(2, 4) == (9, (1, 5))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        broadcast_ranks(1, 0)
    assert 0 < free_port() < 65536


# -- the worker extension, driven by fakes ------------------------------------------------------


class _LoadingModel:
    """Stands in for a vLLM model: ``load_weights`` copies HF-named tensors into an HF module."""

    def __init__(self, module):
        self.module = module
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        params = dict(self.module.state_dict())
        for name, t in weights:
            params[name].copy_(t)


def _fake_worker(module, comm=None):
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=_LoadingModel(module)), device="cpu", rank=0)
    if comm is not None:
        worker._skyrl_comm = comm
    return worker


def test_extension_class_path_resolves():
    mod, cls = EXTENSION_CLS.rsplit(".", 1)
    import importlib

    assert getattr(importlib.import_module(mod), cls) is WeightSyncExtension


def test_colocated_load_through_the_extension_rebuilds_tensors_from_bytes():
    target, _ = tiny_state()
    source, sd = tiny_state()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    named = to_hf_names(source.state_dict())
    worker = _fake_worker(target)
    plan = plan_buckets(specs_of(named), bucket_bytes=4096)
    assert len(plan) > 1
    n = sum(WeightSyncExtension.skyrl_load_weights(worker, bucket_to_wire(b, named)) for b in plan)
    assert n == len(source.state_dict()) and worker.model_runner.model.calls == len(plan)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_nccl_sender_device_is_always_indexed():
    assert indexed_device("cuda", current_index=3) == torch.device("cuda", 3)
    assert indexed_device(torch.device("cuda"), current_index=0) == torch.device("cuda:0")
    assert indexed_device("cuda:2", current_index=0) == torch.device("cuda:2")  # an explicit index is kept
    # vLLM's PyNcclCommunicator asserts tensor.device == its device: a bare "cuda" never matches.
    assert torch.device("cuda:0") != torch.device("cuda")
    with pytest.raises(ValueError, match="expected a CUDA device"):
        indexed_device("cpu")


def test_broadcast_sender_binds_an_indexed_device(monkeypatch):
    """The sender's communicator is built with cuda:<index> (fake vLLM modules, no GPU)."""
    import sys

    seen = {}

    class FakeComm:
        def __init__(self, group, device):
            seen["device"] = device

    class FakeGroup:
        @staticmethod
        def create(host, port, rank, world_size):
            return (host, port, rank, world_size)

    pynccl = types.ModuleType("vllm.distributed.device_communicators.pynccl")
    pynccl.PyNcclCommunicator = FakeComm
    utils = types.ModuleType("vllm.distributed.utils")
    utils.StatelessProcessGroup = FakeGroup
    monkeypatch.setitem(sys.modules, "vllm.distributed.device_communicators.pynccl", pynccl)
    monkeypatch.setitem(sys.modules, "vllm.distributed.utils", utils)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    sender = BroadcastSender("127.0.0.1", 1, 2, device="cuda")
    assert sender.device == seen["device"] == torch.device("cuda", 1)


def test_broadcast_receive_unpacks_every_bucket_into_the_model():
    target, _ = tiny_state()
    source, _ = tiny_state()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(-2.0)
    sd = to_hf_names(source.state_dict(), tied_embeddings=True)
    plan = plan_buckets(specs_of(sd), bucket_bytes=2048)
    sent = iter([pack_bucket(b, sd) for b in plan])  # what rank 0 would broadcast, in order

    class FakeComm:
        def broadcast(self, tensor, src, stream=None):
            assert src == 0 and stream is None
            tensor.copy_(next(sent))

    worker = _fake_worker(target, FakeComm())
    # The engine receives the plan as plain data (vLLM's RPC encoder ships it without pickle).
    assert WeightSyncExtension.skyrl_receive_buckets(worker, plan_to_wire(plan)) == len(sd)
    assert worker.model_runner.model.calls == len(plan)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_receive_before_init_is_an_error():
    target, _ = tiny_state()
    with pytest.raises(RuntimeError, match="skyrl_init_broadcast"):
        WeightSyncExtension.skyrl_receive_buckets(_fake_worker(target), [])
