"""Blocked masked row sums and the blocked broadcast equal the one-shot torch expressions bit for
bit, with one torch thread or several."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.core import _rowsums
from skyrl_fn.core._rowsums import masked_row_sums
from skyrl_fn.estimators._groups import broadcast_to_tokens

BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True, params=[1, 3])
def threads(request, monkeypatch):
    """Tiny blocks so a few rows span many; the torch thread count must not change a bit."""
    monkeypatch.setattr(_rowsums, "BLOCK_BYTES", 16)
    monkeypatch.setattr(_rowsums.row_blocks, "__defaults__", (16,))
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


@given(
    st.integers(1, 40),
    st.integers(1, 9),
    st.randoms(use_true_random=False),
    st.sampled_from(list(BITS)),
)
def test_blocked_passes_equal_the_one_shot_expressions(b, t, rnd, dtype):
    mask = torch.tensor([[rnd.random() < 0.6 for _ in range(t)] for _ in range(b)])
    r = torch.tensor([[rnd.uniform(-5, 5) for _ in range(t)] for _ in range(b)]).to(dtype)
    dirty = torch.where(mask, r, torch.tensor(float("nan"), dtype=dtype))  # never reaches a sum
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sums, lengths = masked_row_sums(dirty, mask, with_lengths=True)
    want = torch.where(mask, r, 0).sum(-1, dtype=acc)
    assert torch.equal(sums.view(BITS[acc]), want.view(BITS[acc]))
    assert torch.equal(lengths, mask.sum(-1).to(acc))
    per_row = torch.tensor([rnd.uniform(-3, 3) for _ in range(b)], dtype=torch.float64)
    out = broadcast_to_tokens(per_row, mask, dtype)
    want = torch.where(mask, per_row.to(dtype)[:, None], torch.zeros((), dtype=dtype))
    assert torch.equal(out.view(BITS[dtype]), want.view(BITS[dtype]))
