"""The table's output check trusts a certificate only while it is true.

``broadcast_to_tokens`` (every outcome estimator's ``[B, T]`` writer) certifies its output
(``skyrl_fn.core._checks.certify_masked_rows``): the table's check then reads a ``[B]`` finiteness flag
instead of the ``[B, T]`` output. These tests show that the certified check decides exactly what
the plain check decides, and that every way of making the certificate untrue (an in-place write,
another mask, a copy) sends the output back to the plain check, which still names the estimator.
"""

from __future__ import annotations

import copy
import functools
import gc
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, AlgorithmTable
from skyrl_fn.core import _checks
from skyrl_fn.core import _facts
from skyrl_fn import estimators as est
from skyrl_fn.core._checks import check_finite_and_zero_off_mask
from skyrl_fn.estimators._groups import broadcast_to_tokens


def _batch(b: int = 6, t: int = 5, seed: int = 0) -> AdvantageInput:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=gen) < 0.7
    rewards = torch.where(mask, torch.randn(b, t, generator=gen), 0.0)
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=torch.arange(b) // 2)


@pytest.fixture
def plain_reads(monkeypatch):
    """Counts the plain (``[B, T]``-reading) output checks."""
    calls = []
    real = _checks.zero_off_mask

    def counting(x, mask, **kw):
        calls.append(tuple(x.shape))
        return real(x, mask, **kw)

    monkeypatch.setattr(_checks, "zero_off_mask", counting)
    return calls


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "maxrl", "gpg", "opo", "grpo_passk"])
def test_builtin_outcome_outputs_skip_the_plain_read(name, plain_reads):
    out = DEFAULT_TABLE.compute_advantages(name, _batch())
    assert plain_reads == []
    assert bool(torch.isfinite(out.advantages).all())


def _returning(make):
    """A table whose estimator ``bad`` returns ``make(batch)``."""

    def bad(batch: AdvantageInput) -> AdvantageOutput:
        adv = make(batch)
        return AdvantageOutput(advantages=adv, returns=adv)

    return AlgorithmTable().register("bad", bad)


def _grpo_then(edit):
    def make(batch):
        adv = est.grpo(batch).advantages
        edit(adv, batch)
        return adv

    return make


def _first_off(batch):
    rows, cols = torch.nonzero(~batch.response_mask, as_tuple=True)
    return int(rows[0]), int(cols[0])


def _first_on(batch):
    rows, cols = torch.nonzero(batch.response_mask, as_tuple=True)
    return int(rows[0]), int(cols[0])


def _set(where, value):
    def edit(adv, batch):
        adv[where(batch)] = value

    return edit


def _set_through_view(adv, batch):
    adv.view(-1)[batch.response_mask.view(-1).logical_not().nonzero()[0, 0]] = 1.0


BAD = {
    "NaN written on the mask after the fact": (_grpo_then(_set(_first_on, float("nan"))), "expected finite values"),
    "inf written on the mask": (_grpo_then(_set(_first_on, float("inf"))), "expected finite values"),
    "non-zero written off the mask": (_grpo_then(_set(_first_off, 2.0)), "expected 0 wherever response_mask is 0"),
    "written through a view": (_grpo_then(_set_through_view), "expected 0 wherever response_mask is 0"),
    "added in place": (_grpo_then(lambda adv, batch: adv.add_(1.0)), "expected 0 wherever response_mask is 0"),
    "NaN values broadcast": (
        lambda batch: broadcast_to_tokens(torch.full((batch.batch_size,), float("nan")), batch.response_mask, torch.float32),
        "expected finite values",
    ),
    "another batch's output (other mask)": (lambda batch: est.grpo(_batch(seed=1)).advantages, "expected 0 wherever"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_certificate_made_untrue_falls_back_to_the_plain_check(case):
    make, message = BAD[case]
    with pytest.raises(ValueError, match=f"advantage estimator 'bad': advantages.*{message}"):
        _returning(make).compute_advantages("bad", _batch())


def test_wrong_shape_and_dtype_still_rejected_before_any_certificate():
    table = _returning(lambda batch: est.grpo(batch).advantages[:, :-1])
    with pytest.raises(ValueError, match=r"'bad': advantages expected shape \[B, T\] = \(6, 5\), got \(6, 4\)"):
        table.compute_advantages("bad", _batch())
    table = _returning(lambda batch: est.grpo(batch).advantages.double())
    with pytest.raises(TypeError, match="'bad': advantages expected dtype torch.float32"):
        table.compute_advantages("bad", _batch())


def test_a_mask_edited_in_place_voids_the_certificate():
    batch = _batch()
    adv = est.grpo(batch).advantages
    assert _checks._certified(adv, batch.response_mask)
    batch.response_mask[_first_on(batch)] = False  # the output now leaks off the (new) mask
    assert not _checks._certified(adv, batch.response_mask)
    with pytest.raises(ValueError, match="expected 0 wherever"):
        check_finite_and_zero_off_mask("advantages", adv, batch.response_mask)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x)), torch.clone, lambda x: x[:]])
def test_copies_and_views_carry_no_certificate(clone, plain_reads):
    batch = _batch()
    adv = est.grpo(batch).advantages
    other = clone(adv)
    assert not _checks._certified(other, batch.response_mask)
    check_finite_and_zero_off_mask("advantages", other, batch.response_mask)  # fine, read the plain way
    assert plain_reads == [tuple(adv.shape)]


SPECIAL = [0.0, -0.0, 1.5, -2.0, 3e38, float("nan"), float("inf"), float("-inf")]


@given(
    st.integers(1, 6),
    st.integers(1, 7),
    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=6),
    st.lists(st.tuples(st.sampled_from(SPECIAL), st.integers(0, 41)), max_size=3),
    st.randoms(use_true_random=False),
    st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_the_certified_check_decides_as_the_plain_check(b, t, values, edits, rnd, dtype):
    """Random per-row values (NaN, inf, values that overflow the cast), random masks (rows fully
    masked included) and random in-place edits after certification: the certified check passes
    exactly when the plain check passes, and raises the plain check's error otherwise."""
    mask = torch.tensor([[rnd.random() < 0.6 for _ in range(t)] for _ in range(b)])
    per_row = torch.tensor([values[i % len(values)] for i in range(b)], dtype=torch.float64)
    out = broadcast_to_tokens(per_row, mask, dtype)
    for value, k in edits:
        out.view(-1)[k % out.numel()] = value
    plain = functools.partial(check_finite_and_zero_off_mask, "x", out.clone(), mask)
    try:
        plain()
        want = None
    except ValueError as e:
        want = str(e)
    if want is None:
        assert check_finite_and_zero_off_mask("x", out, mask) is out
    else:
        assert not _checks._certified(out, mask)
        with pytest.raises(ValueError) as err:
            check_finite_and_zero_off_mask("x", out, mask)
        assert str(err.value) == want


def test_certified_outputs_save_and_load_as_plain_tensors_and_are_forgotten_when_freed():
    """The certificate lives beside the tensor, not on it: ``torch.load(weights_only=True)`` of a
    saved output works, and the entry goes with the tensor."""
    batch = _batch()
    adv = est.grpo(batch).advantages
    buf = io.BytesIO()
    torch.save(adv, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True), adv)
    key = ("masked_rows", id(adv))
    assert key in _facts._facts
    del adv
    gc.collect()
    assert key not in _facts._facts
