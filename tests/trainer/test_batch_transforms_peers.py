"""``dynamic_sampling(type="filter")`` with its refills (``collect`` and the loop's stopping rule)
against SkyRL 0.3.0's own ``handle_dynamic_sampling`` (``handle_filter_sampling``), skipped without
``$SKYRL_FN_PEERS`` (``tests/peers.py``): over a stream of sampled batches both must stop after the
same batch and train on the same rows in the same order."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyrl_fn.rollout.base import RolloutBatch
from skyrl_fn.trainer.batch_transforms import collect
from skyrl_fn.trainer.roles import Generated
from skyrl_fn.transforms import BatchPipeline, dynamic_sampling
from tests.peers import skyrl_batch_utils

SCORES = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def skyrl():
    with skyrl_batch_utils() as (trainer_utils, _):
        yield trainer_utils


def sampled(k: int, scores: list[float], g: int, t: int = 3) -> Generated:
    """The ``k``-th sampled batch: prompts ``b{k}p{j}``, responses ``b{k}r{i}`` (row labels)."""
    b = len(scores)
    lengths = torch.tensor([1 + (k + i) % t for i in range(b)])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    p = b // g
    return Generated(
        rollout=RolloutBatch(
            prompt_ids=torch.ones(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.bool),
            response_ids=torch.where(mask, 5, 0), response_mask=mask, rollout_log_probs=torch.where(mask, -1.0, 0.0),
            group_ids=torch.arange(p).repeat_interleave(g), prompts=[f"b{k}p{j}" for j in range(p)],
            responses=[f"b{k}r{i}" for i in range(b)], truncated=torch.zeros(b, dtype=torch.bool),
        ),
        scores=torch.tensor(scores, dtype=torch.float64), seconds=0.0,
    )


def generator_output(k: int, gen: Generated) -> tuple[dict, list[str]]:
    r = gen.rollout
    out = {
        "prompt_token_ids": [[1, 1]] * r.batch_size, "response_ids": [[k, i] for i in range(r.batch_size)],
        "rewards": gen.scores.tolist(), "loss_masks": [[1, 1]] * r.batch_size, "stop_reasons": None,
        "rollout_metrics": None, "rollout_logprobs": None,
    }
    return out, [f"b{k}p{int(j)}" for j in r.group_ids.tolist()]


def ours(parts: list[Generated], *, p: int, g: int, budget: int) -> tuple[int, Generated | None, dict]:
    """The loop's refill (``transform_step``): sample until ``P`` groups are kept or the budget is
    spent; returns (batches used, batch trained on, metrics)."""
    pipeline = BatchPipeline(["dynamic_sampling"], [functools.partial(dynamic_sampling, max_sample_batches=budget)])
    for used in range(1, len(parts) + 1):
        out, metrics = collect(parts[:used], pipeline=pipeline, target_groups=p, group_size=g, max_new_tokens=3, seeds=range(used), pad_id=0)
        if metrics["batch_kept_groups"] >= p or used >= metrics["batch_budget"]:
            return used, out, metrics
    raise AssertionError("the budget is the number of parts")


class SkyRLFailed(Exception):
    """SkyRL's handle_dynamic_sampling raised on sampled batch ``k`` (0-based)."""

    def __init__(self, k: int) -> None:
        self.k = k


def theirs(skyrl, parts: list[Generated], *, p: int, g: int) -> tuple[int, dict | None, list[str] | None, dict]:
    """SkyRL's trainer loop around handle_dynamic_sampling: (batches used, output, uids, state) or
    (len(parts), None, None, state) when it would raise at its max_sample_batches."""
    config = {"type": "filter", "max_sample_batches": len(parts), "min_replace_ratio": 0.3, "train_batch_size": p, "n_samples_per_prompt": g}
    state = {"sample_batch_count": 0}
    for k, gen in enumerate(parts):
        state["sample_batch_count"] += 1
        out, uids = generator_output(k, gen)
        try:
            out, uids, keep_sampling, new_state = skyrl.handle_dynamic_sampling(out, uids, config, state)
        except ValueError as err:  # numpy's "zero-size array to reduction operation"
            raise SkyRLFailed(k) from err
        if not keep_sampling:
            return k + 1, out, uids, state
        state = new_state
    return len(parts), None, None, state


def _labels(out: Generated) -> list[tuple[int, int]]:
    return [(int(r[1:].split("r")[0]), int(r.split("r")[1])) for r in out.rollout.responses]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    p=st.integers(1, 4), g=st.integers(1, 4), n_batches=st.integers(1, 4),
    data=st.data(),
)
def test_filter_refills_and_truncates_as_skyrl(skyrl, p, g, n_batches, data):
    parts = [
        sampled(k, data.draw(st.lists(st.sampled_from(SCORES), min_size=p * g, max_size=p * g)), g)
        for k in range(n_batches)
    ]
    used, out, metrics = ours(parts, p=p, g=g, budget=n_batches)
    try:
        their_used, their_out, their_uids, state = theirs(skyrl, parts, p=p, g=g)
    except SkyRLFailed as failed:
        # SkyRL 0.3.0 fails when a refill joins two empty collections (its rollout metrics take
        # the min of no lengths): every group of the batches so far was all equal. We sample on.
        assert failed.k >= 1
        kept_so_far, _ = ours(parts[: failed.k + 1], p=p, g=g, budget=failed.k + 1)[1:]
        assert kept_so_far is None
        return
    assert used == their_used
    if their_out is not None:
        # SkyRL got its P groups: the same rows, in the same order (rows of kept groups in sampling
        # order, batch after batch, cut to the first P * G)
        assert metrics["batch_kept_groups"] == p
        assert out is not None and _labels(out) == [tuple(x) for x in their_out["response_ids"]]
        assert out.scores.tolist() == their_out["rewards"]
        assert [out.rollout.prompts[j] for j in out.rollout.group_ids.tolist()] == their_uids
    else:
        # Deviation: SkyRL raises once max_sample_batches are spent; we train on what was kept
        # (batch_exhausted in the metrics), which is everything SkyRL had collected by then.
        assert metrics["batch_kept_groups"] < p
        collected = state.get("collected_generator_output")
        want = [tuple(x) for x in collected["response_ids"]] if collected else []
        assert (_labels(out) if out is not None else []) == want


def test_filter_deviation_exact_equality_not_numpy_std(skyrl):
    # SkyRL's handle_filter_sampling tests np.std(scores) > 0 on Python floats, which is true for
    # three equal scores of 0.1 (rounding in the mean); here such a group is all equal and dropped
    # (its group-relative advantages are 0 up to that rounding), as verl's filter_groups on float32
    # rewards does. Integer and dyadic scores (0/1 accuracy, 0.5) agree, as the test above shows.
    assert np.std([0.1, 0.1, 0.1]) > 0
    parts = [sampled(0, [0.1, 0.1, 0.1, 0.0, 1.0, 1.0], 3)]
    used, out, _ = ours(parts, p=1, g=3, budget=1)
    assert _labels(out) == [(0, 3), (0, 4), (0, 5)]
    _, their_out, _, _ = theirs(skyrl, parts, p=1, g=3)
    assert [tuple(x) for x in their_out["response_ids"]] == [(0, 0), (0, 1), (0, 2)]


def test_filter_deviation_two_empty_batches_in_a_row(skyrl):
    # SkyRL 0.3.0 raises when the first two sampled batches of a step keep no group (joining two
    # empty outputs computes rollout metrics over no responses); here the loop samples a third.
    tied, good = [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]
    parts = [sampled(0, tied, 2), sampled(1, tied, 2), sampled(2, good, 2)]
    with pytest.raises(SkyRLFailed):
        theirs(skyrl, parts, p=1, g=2)
    used, out, _ = ours(parts, p=1, g=2, budget=3)
    assert used == 3 and _labels(out) == [(2, 0), (2, 1)]
