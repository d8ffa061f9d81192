"""Byte buckets of a state dict on CPU tensors: Hugging Face name mapping, bucket plans,
pack/unpack round trips and the plain-data wire form (``skyrl_fn.rollout.buckets``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.rollout.buckets import (
    bucket_from_wire,
    bucket_to_wire,
    pack_bucket,
    plan_buckets,
    plan_from_wire,
    plan_to_wire,
    specs_of,
    to_hf_names,
    unpack_bucket,
)
from skyrl_fn.models.model import DIGITS_ALPHABET, ModelConfig, build_tiny_model, build_tokenizer

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


def tiny_state():
    tok = build_tokenizer(DIGITS_ALPHABET)
    model = build_tiny_model(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32), tok)
    return model, model.state_dict()


def test_to_hf_names_strips_wrappers_and_drops_aliases():
    t = torch.zeros(2)
    sd = {
        "_orig_mod.model.embed_tokens.weight": t,
        "module.model.layers.0.self_attn.q_proj.weight": t,
        "model.layers.0.self_attn.rotary_emb.inv_freq": t,
        "lm_head.weight": t,
    }
    out = to_hf_names(sd, tied_embeddings=True)
    assert list(out) == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert out["model.embed_tokens.weight"] is t  # no copy
    assert "lm_head.weight" in to_hf_names(sd, tied_embeddings=False)


def test_to_hf_names_rejects_collisions_and_non_tensors():
    with pytest.raises(ValueError, match="distinct"):
        to_hf_names({"module.a": torch.zeros(1), "a": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"state_dict\['a'\]"):
        to_hf_names({"a": [1.0]})


def test_hf_model_names_pass_through_unchanged():
    model, sd = tiny_state()
    out = to_hf_names(sd)
    assert list(out) == list(sd)  # HF names are what vLLM's load_weights expects


specs_strategy = st.lists(
    st.tuples(st.lists(st.integers(0, 7), min_size=0, max_size=3), st.sampled_from(DTYPES)), min_size=1, max_size=12
)


@given(specs=specs_strategy, bucket_bytes=st.integers(1, 600))
def test_plan_covers_every_tensor_once_aligned_and_within_the_cap(specs, bucket_bytes):
    named = [(f"t{i}", tuple(shape), dtype) for i, (shape, dtype) in enumerate(specs)]
    plan = plan_buckets(named, bucket_bytes=bucket_bytes)
    names = [n for b in plan for n in b.names]
    assert names == [n for n, _, _ in named]  # order kept, each once
    for b in plan:
        ends = [s.offset + s.nbytes for s in b.slots]
        assert b.size == ends[-1]
        assert all(s.offset % 64 == 0 for s in b.slots)
        assert all(e <= s2.offset for e, s2 in zip(ends, b.slots[1:]))  # no overlap
        # Only a bucket holding a single tensor may exceed the cap.
        assert b.size <= bucket_bytes or len(b.slots) == 1


@given(specs=specs_strategy, bucket_bytes=st.integers(1, 600), seed=st.integers(0, 2**16))
def test_pack_then_unpack_is_the_identity(specs, bucket_bytes, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (shape, dtype) in enumerate(specs):
        x = torch.randn(tuple(shape), generator=g) * 100
        tensors[f"t{i}"] = x.to(dtype)
    plan = plan_buckets(specs_of(tensors), bucket_bytes=bucket_bytes)
    for bucket in plan:
        buf = pack_bucket(bucket, tensors)
        assert buf.dtype == torch.uint8 and buf.shape == (bucket.size,)
        for name, view in unpack_bucket(bucket, buf):
            assert view.dtype == tensors[name].dtype and view.shape == tensors[name].shape
            assert torch.equal(view, tensors[name])


def test_pack_handles_non_contiguous_tensors_and_checks_the_plan():
    x = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    plan = plan_buckets(specs_of({"x": x}))
    (name, y), = unpack_bucket(plan[0], pack_bucket(plan[0], {"x": x}))
    assert torch.equal(y, x)
    with pytest.raises(KeyError, match="'x'"):
        pack_bucket(plan[0], {"z": x})
    with pytest.raises(ValueError, match="expected shape"):
        pack_bucket(plan[0], {"x": x.reshape(12)})
    with pytest.raises(TypeError, match="expected dtype"):
        pack_bucket(plan[0], {"x": x.double()})
    with pytest.raises(ValueError, match="uint8"):
        unpack_bucket(plan[0], torch.zeros(3))
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(specs_of({"x": x}), bucket_bytes=0)
    with pytest.raises(ValueError, match="distinct"):
        plan_buckets([("a", (1,), torch.float32), ("a", (1,), torch.float32)])


def test_small_buckets_split_a_real_model_and_round_trip():
    _, sd = tiny_state()
    plan = plan_buckets(specs_of(sd), bucket_bytes=4096)
    assert len(plan) > 1
    got = {}
    for b in plan:
        got.update(dict(unpack_bucket(b, pack_bucket(b, sd))))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


@given(specs=st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(DTYPES)), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_bucket_wire_round_trips_every_dtype_and_shape(specs, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(shape, generator=gen) * 100).to(dtype) for i, (shape, dtype) in enumerate(specs)
    }
    (bucket,) = plan_buckets(specs_of(tensors), bucket_bytes=1 << 20)
    wire = bucket_to_wire(bucket, tensors)
    assert isinstance(wire[2], bytes) and len(wire[2]) == bucket.size
    back, buf = bucket_from_wire(wire)
    assert back == bucket and buf.dtype == torch.uint8
    for name, t in unpack_bucket(back, buf):
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name


def test_bucket_from_wire_rejects_malformed_data():
    _, sd = tiny_state()
    (bucket, *_) = plan_buckets(specs_of(sd), bucket_bytes=1 << 20)
    size, slots, payload = bucket_to_wire(bucket, sd)
    with pytest.raises(ValueError, match=rf"expected {size} bytes"):
        bucket_from_wire([size, slots, payload[:-1]])
    with pytest.raises(ValueError, match="expected bytes"):
        bucket_from_wire([size, slots, list(payload[:4])])
    with pytest.raises(ValueError, match=r"\[size, slots, payload\]"):
        bucket_from_wire([size, slots])


def test_plan_wire_format_is_plain_data_and_round_trips():
    _, sd = tiny_state()
    sd = {**sd, "half": torch.zeros(3, dtype=torch.bfloat16), "ids": torch.zeros(2, dtype=torch.int64)}
    plan = plan_buckets(specs_of(sd), bucket_bytes=4096)
    wire = plan_to_wire(plan)

    def plain(x):
        return isinstance(x, (int, str)) or (isinstance(x, list) and all(plain(y) for y in x))

    assert plain(wire)
    assert plan_from_wire(wire) == plan and plan_from_wire(plan) == plan
    with pytest.raises(ValueError, match="dtype name"):
        plan_from_wire([[8, [["x", [2], "nonsense", 0, 8]]]])
