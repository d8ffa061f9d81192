"""What crosses into vLLM's engine process survives msgpack, and the worker code runs on what arrives.

vLLM (default ``VLLM_ENABLE_V1_MULTIPROCESSING=1``) sends ``collective_rpc`` arguments and the
utility results to and from its engine process msgpack-encoded, and decodes them without type
information: only msgpack-native values (None, bool, int, float, str, bytes, lists, maps)
arrive as themselves, tuples arrive as lists, and a tensor would arrive as
``[dtype, shape, buffer index]``. The fake engine here encodes every argument and result with
the ``msgpack`` library in strict mode (no ``default`` hook: anything else is a ``TypeError``,
as with vLLM's encoder without insecure serialization) and runs our real
``WeightSyncExtension`` methods on the decoded values, against a fake vLLM worker whose model
is a real tiny Llama.
"""

from __future__ import annotations

import sys
import types

import msgpack
import pytest
import torch

import skyrl_fn.rollout.vllm_backend as vb
from skyrl_fn.rollout.buckets import pack_bucket, plan_buckets, specs_of, to_hf_names
from skyrl_fn.rollout.weight_sync import WeightSyncExtension
from skyrl_fn.models.model import DIGITS_ALPHABET, ModelConfig, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import RolloutConfig


def over_the_wire(obj):
    """``obj`` after a strict msgpack round trip (raises TypeError on non-native values)."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


class _LoadingModel:
    """A vLLM model stand-in: ``load_weights`` copies HF-named tensors into a real module."""

    def __init__(self, module):
        self.module = module

    def load_weights(self, weights):
        params = self.module.state_dict()
        for name, t in weights:
            assert isinstance(t, torch.Tensor), f"{name}: the worker got {type(t).__name__}, not a tensor"
            params[name].copy_(t)


class MsgpackEngineLLM:
    """``vllm.LLM`` whose engine sits behind a msgpack boundary, as in vLLM's default set-up."""

    instances: list["MsgpackEngineLLM"] = []
    comm = None  # a fake NCCL communicator for the broadcast path

    def __init__(self, **kwargs):
        self.kwargs = over_the_wire(kwargs)  # engine arguments reach the engine process as data
        tok = build_tokenizer(DIGITS_ALPHABET)
        self.engine_model = build_tiny_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=99)
        self.worker = types.SimpleNamespace(
            model_runner=types.SimpleNamespace(model=_LoadingModel(self.engine_model)), device="cpu", rank=0,
        )
        self.rpcs: list[tuple[str, list]] = []
        MsgpackEngineLLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        method, args = over_the_wire([method, list(args)])
        self.rpcs.append((method, args))
        if method == "skyrl_init_broadcast":  # would build an NCCL group: record only
            return over_the_wire([args[2] + self.worker.rank])
        if method == "skyrl_receive_buckets":
            self.worker._skyrl_comm = MsgpackEngineLLM.comm
        result = getattr(WeightSyncExtension, method)(self.worker, *args)
        return over_the_wire([result])

    def generate(self, prompts, params, use_tqdm=False):
        over_the_wire([prompts, params.kw])
        n = params.kw["n"]
        comp = types.SimpleNamespace(index=0, token_ids=[3, 2], text="", logprobs=[{3: -0.5}, {2: -0.25}])
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(**{**vars(comp), "index": g}) for g in range(n)]) for _ in prompts]

    def sleep(self, level=1):
        pass

    def wake_up(self, tags=None):
        over_the_wire(list(tags))

    def reset_prefix_cache(self):
        pass


class _SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def engine(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = MsgpackEngineLLM, _SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vb, "vllm_unavailable_reason", lambda: None)
    MsgpackEngineLLM.instances.clear()
    tok = build_tokenizer(DIGITS_ALPHABET)
    policy = build_tiny_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok, seed=0)
    return policy, tok


def _trained(policy, scale):
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(scale).add_(0.01)
    return policy


def test_colocated_sync_survives_msgpack_and_loads_every_weight(engine, monkeypatch):
    policy, tok = engine
    monkeypatch.setattr(vb, "DEFAULT_BUCKET_BYTES", 4096)  # several buckets
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=2), policy, tok, seed=0, colocated=True)
    llm = MsgpackEngineLLM.instances[-1]
    _trained(policy, -1.5)
    named = to_hf_names(policy.state_dict(), tied_embeddings=True)
    assert any(not torch.equal(llm.engine_model.state_dict()[k], v) for k, v in named.items())
    backend.sync_weights(policy.state_dict())
    assert len(llm.rpcs) > 1 and all(m == "skyrl_load_weights" for m, _ in llm.rpcs)
    engine_sd = llm.engine_model.state_dict()
    for k, v in named.items():
        assert torch.equal(engine_sd[k], v), k


def test_bf16_weights_survive_msgpack_bit_for_bit(engine):
    policy, tok = engine
    policy = policy.to(torch.bfloat16)
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=1), policy, tok, colocated=True)
    llm = MsgpackEngineLLM.instances[-1]
    assert llm.kwargs["dtype"] == "bfloat16"
    llm.engine_model.to(torch.bfloat16)
    _trained(policy, 3.0)
    backend.sync_weights(policy.state_dict())
    for k, v in to_hf_names(policy.state_dict(), tied_embeddings=True).items():
        assert torch.equal(llm.engine_model.state_dict()[k], v), k


def test_engine_and_sampling_arguments_are_msgpack_native(engine):
    policy, tok = engine
    cfg = RolloutConfig(samples_per_prompt=3, temperature=0.7, top_p=0.9, tensor_parallel_size=2)
    kw = vb.engine_kwargs(cfg, "/models/m", dtype="bfloat16", seed=3, colocated=True, max_model_len=64)
    assert over_the_wire(kw) == kw
    sp = vb.sampling_params_kwargs(cfg, seed=2**70, eos_token_id=2)
    assert over_the_wire(sp) == sp
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=2), policy, tok, colocated=False)
    batch = backend.generate(["n:1>", "c:12>"], seed=5)  # prompts and params cross in MsgpackEngineLLM.generate
    assert batch.batch_size == 4


def test_broadcast_path_arguments_survive_msgpack_and_the_worker_loads_the_plan(engine):
    policy, tok = engine
    backend = vb.make_vllm_backend(RolloutConfig(samples_per_prompt=1), policy, tok, colocated=False)
    llm = MsgpackEngineLLM.instances[-1]
    assert backend.init_broadcast("10.0.0.1", 29500, 1, 2) == [1]
    _trained(policy, 0.5)
    sd = to_hf_names(policy.state_dict(), tied_embeddings=True)
    plan = plan_buckets(specs_of(sd), bucket_bytes=2048)
    sent = iter([pack_bucket(b, sd) for b in plan])  # what trainer rank 0 broadcasts, in order

    class FakeComm:
        def broadcast(self, tensor, src, stream=None):
            tensor.copy_(next(sent))

    MsgpackEngineLLM.comm = FakeComm()
    backend.receive_broadcast(plan)
    assert [m for m, _ in llm.rpcs] == ["skyrl_init_broadcast", "skyrl_receive_buckets"]
    for k, v in sd.items():
        assert torch.equal(llm.engine_model.state_dict()[k], v), k


def test_a_tensor_argument_would_not_cross():
    """The premise: what the colocated sync used to send is rejected by a strict encoder."""
    with pytest.raises(TypeError):
        over_the_wire([[("w", torch.zeros(2))]])
