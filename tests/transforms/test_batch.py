"""Batch transforms: the maths of each (DAPO's overlong penalty and filters, SkyRL's replace) as
properties over generated batches, and their input checks."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, strategies as st

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.testing._batch import sample_batches
from skyrl_fn.transforms import (
    BatchPipeline,
    SampleBatch,
    dynamic_sampling,
    group_spread,
    overlong_filter,
    overlong_penalty,
    zero_variance_filter,
)


def _groups(batch: SampleBatch) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for g, s in zip(batch.group_ids.tolist(), batch.scores.tolist()):
        out.setdefault(g, []).append(s)
    return out


def test_every_builtin_transform_is_registered_as_a_batch_transform():
    assert set(DEFAULT_TABLE.names("batch_transform")) == {"overlong_filter", "overlong_penalty", "zero_variance_filter", "dynamic_sampling"}


@given(sample_batches())
def test_overlong_filter_masks_exactly_the_truncated_rows(batch):
    out = overlong_filter(batch)
    assert torch.equal(out.loss_mask, batch.loss_mask & ~batch.truncated[:, None])
    assert torch.equal(out.scores, batch.scores) and torch.equal(out.source, batch.source)
    assert not out.loss_mask[batch.truncated].any()


@given(sample_batches(), st.integers(1, 6), st.floats(0.0, 3.0))
def test_overlong_penalty_is_dapo_eq_13(batch, buf, factor):
    out = overlong_penalty(batch, overlong_buffer_len=buf, penalty_factor=factor)
    l_max = batch.max_response_length
    for i, length in enumerate(batch.lengths().tolist()):
        # the paper's piecewise form, one response at a time (verl's reward-manager loop)
        expected_len = l_max - buf
        penalty = 0.0 if length <= expected_len else (expected_len - length) / buf * factor
        assert float(out.scores[i]) == pytest.approx(float(batch.scores[i]) + penalty, abs=1e-6)
    full = batch.lengths() == l_max
    if buf <= l_max and full.any():  # the full budget costs exactly the factor
        assert torch.allclose(out.scores[full], batch.scores[full] - factor, atol=1e-6)
    assert torch.equal(out.loss_mask, batch.loss_mask) and torch.equal(out.source, batch.source)


@given(sample_batches())
def test_zero_variance_filter_keeps_whole_informative_groups(batch):
    out = zero_variance_filter(batch)
    before, after = _groups(batch), _groups(out)
    for g, scores in before.items():
        informative = len(set(scores)) > 1 or len(scores) == 1
        assert (g in after) == informative
        if informative:
            assert after[g] == scores  # whole group, in order
    assert torch.equal(out.group_ids, batch.group_ids[out.source])
    assert torch.equal(zero_variance_filter(out).source, out.source)  # idempotent
    assert out.sample_batches == 1  # no refill


@given(sample_batches(), st.integers(1, 40))
def test_dynamic_sampling_filter_is_the_filter_plus_a_budget(batch, budget):
    out = dynamic_sampling(batch, max_sample_batches=budget)
    assert torch.equal(out.source, zero_variance_filter(batch).source)
    assert out.sample_batches == budget


@given(sample_batches(max_group_size=4), st.sampled_from([0.0, 0.3, 0.6]))
def test_dynamic_sampling_replace_fills_bad_groups_with_good_ones(batch, ratio):
    out = dynamic_sampling(batch, type="replace", min_replace_ratio=ratio, max_sample_batches=5)
    groups = _groups(batch)
    good = {g for g, s in groups.items() if len(set(s)) > 1 or len(s) == 1}
    assert out.sample_batches == 5
    if not len(good) > len(groups) * ratio:
        assert out.batch_size == 0  # the batch is dropped: the loop samples another
        return
    assert out.batch_size == batch.batch_size
    assert bool(group_spread(out).all()) or batch.group_ids.bincount().max() == 1
    # a kept row stays where it was; a replaced row holds a row of a good group
    for i, (src, g) in enumerate(zip(out.source.tolist(), batch.group_ids.tolist())):
        if g in good:
            assert src == i
        else:
            assert int(batch.group_ids[src]) in good
    again = dynamic_sampling(batch, type="replace", min_replace_ratio=ratio, max_sample_batches=5)
    assert torch.equal(again.source, out.source)  # seeded by batch.seed


def test_replace_picks_distinct_good_groups_when_there_are_enough():
    scores = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    b = scores.numel()
    batch = SampleBatch(
        scores=scores, response_mask=torch.ones(b, 2, dtype=torch.bool), loss_mask=torch.ones(b, 2, dtype=torch.bool),
        group_ids=torch.arange(5).repeat_interleave(2), truncated=torch.zeros(b, dtype=torch.bool), source=torch.arange(b),
        max_response_length=2, seed=3,
    )
    out = dynamic_sampling(batch, type="replace")
    replaced = tuple(out.source[4:6].tolist()), tuple(out.source[6:8].tolist())  # groups 2 and 3 were all-equal
    assert replaced[0] != replaced[1]  # without repetition: 3 good groups for 2 places
    assert set(replaced) <= {(0, 1), (2, 3), (8, 9)}
    assert out.source[:4].tolist() == [0, 1, 2, 3] and out.source[8:].tolist() == [8, 9]
    assert bool(group_spread(out).all())


def test_pipeline_applies_in_order_and_names_a_bad_return():
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    batch = SampleBatch(
        scores=torch.tensor([1.0, 1.0]), response_mask=mask, loss_mask=mask,
        group_ids=torch.tensor([0, 0]), truncated=torch.tensor([True, False]), source=torch.arange(2), max_response_length=4,
    )
    # penalty first: the scores differ, so the filter keeps the group; the other order drops it
    kept = BatchPipeline(["p", "f"], [lambda b: overlong_penalty(b, overlong_buffer_len=1), zero_variance_filter])(batch)
    dropped = BatchPipeline(["f", "p"], [zero_variance_filter, lambda b: overlong_penalty(b, overlong_buffer_len=1)])(batch)
    assert kept.batch_size == 2 and dropped.batch_size == 0
    with pytest.raises(TypeError, match="batch transform 'bad': expected it to return a SampleBatch, got dict"):
        BatchPipeline(["bad"], [lambda b: {}])(batch)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: overlong_penalty(b, overlong_buffer_len=0), "overlong_buffer_len: expected an int >= 1, got 0"),
        (lambda b: overlong_penalty(b, penalty_factor=-1.0), "penalty_factor"),
        (lambda b: dynamic_sampling(b, type="drop"), "type: expected 'filter' or 'replace', got 'drop'"),
        (lambda b: dynamic_sampling(b, max_sample_batches=0), "max_sample_batches: expected an int >= 1, got 0"),
        (lambda b: dynamic_sampling(b, min_replace_ratio=1.0), r"min_replace_ratio: expected in \[0, 1\), got 1.0"),
    ],
)
def test_bad_hyperparameters_are_named(call, message):
    batch = SampleBatch(
        scores=torch.zeros(2), response_mask=torch.ones(2, 3, dtype=torch.bool), loss_mask=torch.ones(2, 3, dtype=torch.bool),
        group_ids=torch.tensor([0, 0]), truncated=torch.zeros(2, dtype=torch.bool), source=torch.arange(2), max_response_length=3,
    )
    with pytest.raises(ValueError, match=message):
        call(batch)


def test_the_record_refuses_a_loss_mask_outside_the_response():
    mask = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="loss_mask: expected 1 only where response_mask is 1"):
        SampleBatch(
            scores=torch.zeros(1), response_mask=mask, loss_mask=torch.ones(1, 2, dtype=torch.bool), group_ids=torch.tensor([0]),
            truncated=torch.tensor([False]), source=torch.tensor([0]), max_response_length=2,
        )
    with pytest.raises(ValueError, match="scores"):
        attrs.evolve(
            SampleBatch(scores=torch.zeros(1), response_mask=mask, loss_mask=mask, group_ids=torch.tensor([0]), truncated=torch.tensor([False]), source=torch.tensor([0]), max_response_length=2),
            scores=torch.tensor([float("nan")]),
        )
