"""Masked whitening: equals SkyRL-Train's, defined (as 0) below 2 valid tokens; the per-row form."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import skyrl_reference as ref
from skyrl_fn.estimators._whiten import masked_whiten, masked_whiten_rows


@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 9))
def test_matches_skyrl_masked_whiten(seed, b, t):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=gen, dtype=torch.float64) * 3 + 1
    m = torch.rand(b, t, generator=gen) < 0.6
    ours = masked_whiten(x, m)
    if m.sum() >= 2:
        torch.testing.assert_close(ours, ref.masked_whiten(x, m.double()) * m)
    else:
        assert torch.equal(ours, torch.zeros_like(ours))


def test_masked_entries_are_never_read():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    m = torch.tensor([[True, False], [True, False]])
    out = masked_whiten(x, m)
    assert torch.isfinite(out).all() and out[:, 1].eq(0).all()
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, 1.0]) / (2.0 + 1e-8) ** 0.5)


@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 9))
def test_rows_form_equals_token_form(seed, b, t):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, generator=gen, dtype=torch.float64)
    m = torch.rand(b, t, generator=gen) < 0.5
    per_row = masked_whiten_rows(a, m.sum(-1).double())
    torch.testing.assert_close(torch.where(m, per_row[:, None], 0.0), masked_whiten(a[:, None].expand(b, t), m))
