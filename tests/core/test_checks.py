"""The central input checks' fast paths decide exactly what the plain torch checks decide.

``as_mask``, ``check_zero_off_mask`` and the output check take blocked numpy passes
(``skyrl_fn.core._blocked``), ``as_group_ids`` runs of one object and integer sort keys for string
uids, for speed; each is
compared here with a reference written the plain way, over many blocks (the block size is shrunk so
small tensors span several), in one thread and split over threads, and on the cases that must
fail: every row, NaN, inf, -0.0, other dtypes and layouts that take the torch path.
"""

from __future__ import annotations

import enum

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn.core import _blocked
from skyrl_fn.core._blocked import zero_off_mask as _zero_off_mask
from skyrl_fn.core._blocked import zero_one_to_bool as _zero_one_to_bool
from skyrl_fn.core._checks import (
    as_group_ids,
    as_mask,
    check_finite,
    check_finite_and_zero_off_mask,
    check_zero_off_mask,
)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16 bytes, so a [B, T] tensor of a few rows spans many."""
    monkeypatch.setattr(_blocked, "_NUMPY_BLOCK_BYTES", 16)


def reference_mask(x: torch.Tensor) -> torch.Tensor | None:
    """``x != 0`` if every element is 0 or 1, else None (the plain check)."""
    return None if bool(((x != 0) & (x != 1)).any()) else x != 0


SPECIAL = [0.0, 1.0, -0.0, 0.5, 2.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45]


@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.lists(st.sampled_from(SPECIAL), min_size=0, max_size=3),
    st.randoms(use_true_random=False),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bfloat16]),
)
def test_as_mask_accepts_and_rejects_exactly_what_the_plain_check_does(b, t, specials, rnd, dtype):
    x = torch.tensor([[float(rnd.random() < 0.5) for _ in range(t)] for _ in range(b)])
    for value in specials:
        x[rnd.randrange(b), rnd.randrange(t)] = value
    if not dtype.is_floating_point:
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
            return
        x = x.to(dtype)
    else:
        x = x.to(dtype)
    want = reference_mask(x)
    if dtype != torch.bfloat16:  # the fast path decides on its own, both ways (bfloat16 has no numpy view)
        fast = _zero_one_to_bool(x)
        assert (fast is None) == (want is None) and (fast is None or torch.equal(fast, want))
    if want is None:
        with pytest.raises(ValueError, match="response_mask: expected only 0 and 1"):
            as_mask("response_mask", x)
    else:
        got = as_mask("response_mask", x)
        assert got.dtype == torch.bool and torch.equal(got, want)


@pytest.mark.parametrize("row", [0, 3, 7])
@pytest.mark.parametrize("bad", [0.5, float("nan"), 2.0, -1.0])
def test_as_mask_names_the_first_bad_row_in_any_block(row, bad):
    x = torch.ones(8, 5)
    x[row, 4] = bad
    x[7, 0] = bad  # a later one too
    with pytest.raises(ValueError, match=f"row {row}:"):
        as_mask("response_mask", x)


def test_as_mask_takes_the_torch_path_for_views_and_keeps_shapes():
    x = torch.ones(4, 6)[:, ::2]  # not contiguous
    assert torch.equal(as_mask("m", x), torch.ones(4, 3, dtype=torch.bool))
    x = torch.ones(4, 6)
    x[1, 1] = 0.25
    transposed_layout = x.t().contiguous().t()  # the same values, not contiguous
    with pytest.raises(ValueError, match="row 1"):
        as_mask("m", transposed_layout)
    assert as_mask("m", torch.zeros(2, 0, 3)).shape == (2, 0, 3)
    assert as_mask("m", torch.tensor(1.0)).dtype == torch.bool
    assert as_mask("m", torch.tensor([[-0.0, 1.0]])).tolist() == [[False, True]]


def reference_leak_row(x: torch.Tensor, mask: torch.Tensor) -> int | None:
    bad = (x != 0) & ~mask
    return int(torch.nonzero(bad.any(dim=1))[0, 0]) if bool(bad.any()) else None


@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.lists(st.tuples(st.sampled_from(SPECIAL), st.booleans()), min_size=0, max_size=3),
    st.randoms(use_true_random=False),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_check_zero_off_mask_fails_exactly_where_the_plain_check_does(b, t, plants, rnd, dtype):
    mask = torch.tensor([[rnd.random() < 0.6 for _ in range(t)] for _ in range(b)])
    x = torch.where(mask, torch.randn(b, t, dtype=torch.float64), 0.0)
    for value, off_mask in plants:
        rows, cols = torch.nonzero(~mask if off_mask else mask, as_tuple=True)
        if len(rows):
            k = rnd.randrange(len(rows))
            x[rows[k], cols[k]] = value
    x = x.to(dtype)
    row = reference_leak_row(x, mask)
    if dtype != torch.bfloat16:  # the fast path decides on its own, both ways
        assert _zero_off_mask(x, mask) == (row is None)
    if row is None:
        assert check_zero_off_mask("est: advantages", x, mask) is x
    else:
        with pytest.raises(ValueError, match=f"est: advantages expected 0 wherever response_mask is 0, got non-zero values in row {row}$"):
            check_zero_off_mask("est: advantages", x, mask)


def plain_output_check(x, mask):
    """The output check written the plain way: its error message, or None."""
    try:
        check_finite("est: advantages", x)
        bad = (x != 0) & ~mask
        if bool(bad.any()):
            raise ValueError(f"est: advantages expected 0 wherever response_mask is 0, got non-zero values in row {int(torch.nonzero(bad.any(dim=1))[0, 0])}")
    except ValueError as e:
        return str(e)
    return None


@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.lists(st.tuples(st.sampled_from(SPECIAL + [3e38, -3e38]), st.booleans()), min_size=0, max_size=4),
    st.randoms(use_true_random=False),
    st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_fused_output_check_raises_what_the_two_checks_raise_in_order(b, t, plants, rnd, dtype):
    mask = torch.tensor([[rnd.random() < 0.6 for _ in range(t)] for _ in range(b)])
    x = torch.where(mask, torch.randn(b, t, dtype=torch.float64), 0.0)
    for value, off_mask in plants:  # NaN/inf on or off the mask; huge values whose sum overflows
        rows, cols = torch.nonzero(~mask if off_mask else mask, as_tuple=True)
        if len(rows):
            k = rnd.randrange(len(rows))
            x[rows[k], cols[k]] = value
    x = x.to(dtype)
    want = plain_output_check(x, mask)
    fast = _zero_off_mask(x, mask, finite=True)
    assert not fast or want is None  # a pass of the fast path is always right
    if not bool((x.abs() > 1e4).any()):  # and without values whose sums can overflow, it decides alone
        assert fast == (want is None)
    if want is None:
        assert check_finite_and_zero_off_mask("est: advantages", x, mask) is x
    else:
        with pytest.raises(ValueError) as err:
            check_finite_and_zero_off_mask("est: advantages", x, mask)
        assert str(err.value) == want


@pytest.mark.parametrize("value", [1e-45, -3.0, float("nan"), float("inf")])
def test_check_zero_off_mask_catches_one_value_in_the_last_block(value):
    mask = torch.ones(9, 7, dtype=torch.bool)
    mask[8, 6] = False
    x = torch.zeros(9, 7)
    check_zero_off_mask("x", x, mask)
    x[8, 6] = -0.0
    check_zero_off_mask("x", x, mask)  # -0.0 is 0
    x[8, 6] = value
    with pytest.raises(ValueError, match="row 8"):
        check_zero_off_mask("x", x, mask)


def reference_ids(ids) -> list[int]:
    """The plain numbering: np.unique over the labels (type-prefixed when types are mixed)."""
    arr = np.asarray(ids, dtype=object)
    if len({type(v) for v in arr.tolist()}) > 1:
        arr = np.array([f"{type(v).__name__}:{v}" for v in arr.tolist()], dtype=object)
    return np.unique(arr, return_inverse=True)[1].reshape(-1).tolist()


class Uid(enum.StrEnum):
    A = "a"


LABELS = st.one_of(
    st.lists(st.text(max_size=3), min_size=1, max_size=40),
    st.lists(st.integers(-5, 5), min_size=1, max_size=40),
    st.lists(st.sampled_from(["a", "b", 1, 2, Uid.A]), min_size=1, max_size=40),
)


@given(LABELS, st.integers(1, 4), st.booleans())
def test_as_group_ids_numbers_labels_as_np_unique_does(labels, repeat, shuffle):
    ids = [v for v in labels for _ in range(repeat)]  # runs of one label, as SkyRL's uids come
    if shuffle:
        ids = ids[::2] + ids[1::2]
    for form in (ids, np.array(ids, dtype=object)):
        got = as_group_ids("index", form, len(ids))
        assert got.dtype == torch.int64 and got.tolist() == reference_ids(ids)


# ASCII labels sharing 8-character prefixes, of several lengths, holding NULs: the integer sort
# keys of the string fast path tie, and Python orders the ties; lists with a non-ASCII label take
# Python's sort throughout.
TIED_STRINGS = st.one_of(
    st.lists(st.text(alphabet="ab\x00", max_size=11), min_size=1, max_size=40),
    st.lists(st.text(alphabet="a\x00é", max_size=9), min_size=1, max_size=40),
)


@given(TIED_STRINGS, st.integers(1, 4), st.booleans(), st.booleans())
def test_as_group_ids_numbers_strings_as_np_unique_does(labels, repeat, shuffle, copies):
    """Runs of one and the same object (SkyRL's uids) stand for their rows, and equal copies do not
    share a run but still share an id; either way the ids are np.unique's."""
    ids = ["".join(list(v)) if copies else v for v in labels for _ in range(repeat)]
    if shuffle:
        ids = ids[::2] + ids[1::2]
    for form in (ids, np.array(ids, dtype=object), np.array(ids + ids, dtype=object)[::2]):
        got = as_group_ids("index", form, len(ids))
        assert got.tolist() == reference_ids(list(form))


def test_as_group_ids_checks_every_rows_type():
    # 1 == 1.0 == True: a float or bool equal to its neighbour is still refused, named as such.
    for odd in (1.0, True):
        with pytest.raises(TypeError, match="index: expected integer or string group ids"):
            as_group_ids("index", np.array([1, 1, odd, 1], dtype=object), 4)
    one = "uid"
    assert as_group_ids("index", [one, one, one, "uid", 2, 2], 6).tolist() == [1, 1, 1, 1, 0, 0]


def test_as_group_ids_keeps_its_errors():
    with pytest.raises(TypeError, match="index: expected integer or string group ids"):
        as_group_ids("index", np.array(["a", 1.5], dtype=object), 2)
    with pytest.raises(TypeError, match="index"):
        as_group_ids("index", np.array([True, False], dtype=object), 2)
    with pytest.raises(ValueError, match=r"index: expected shape \[B\] = \(3,\), got \(2,\)"):
        as_group_ids("index", np.array(["a", "b"], dtype=object), 3)
    # Labels that are not hashable fall back to np.unique's numbering.
    labels = np.empty(3, dtype=object)
    labels[:] = [(1, [2]), (0, [1]), (1, [2])]
    assert as_group_ids("index", labels, 3).tolist() == [1, 0, 1]
