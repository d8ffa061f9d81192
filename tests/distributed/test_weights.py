"""The packed weight push: one byte buffer, any dtype (bf16 included), same tensors back."""

from __future__ import annotations

import pickle

import torch

from skyrl_fn.distributed.weights import PackedWeights, pack, unpack


def test_round_trip_keeps_names_shapes_dtypes_and_values():
    state = {
        "a.weight": torch.randn(3, 5),
        "b.bias": torch.randn(7, dtype=torch.bfloat16),  # numpy has no bf16: packed as bytes
        "c.odd": torch.arange(3, dtype=torch.int16),  # 6 bytes: the next tensor is realigned
        "d.weight": torch.randn(2, 2, dtype=torch.float64).t(),  # non-contiguous
        "e.scalar": torch.tensor(1.5),
    }
    packed = pickle.loads(pickle.dumps(pack(state)))
    assert isinstance(packed, PackedWeights) and packed.data.dtype.name == "uint8"
    back = unpack(packed)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name


def test_loads_into_a_model():
    src, dst = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    dst.load_state_dict(unpack(pack(src.state_dict())))
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
