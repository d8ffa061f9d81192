"""The kit for batch transforms ``fn(batch: SampleBatch, **hyper) -> SampleBatch``.

Every batch transform must, on any sampled batch (``P`` groups of ``G`` rows, ties in the scores,
truncated and empty-tail responses):

* ``record``: return a ``SampleBatch`` (valid by construction: loss mask within the response
  mask, finite scores) with the same ``T``, ``max_response_length`` and seed;
* ``rows_from_input``: every output row is an input row (``source`` names it) with that row's
  response mask, group id and truncation flag, and a loss mask within that row's loss mask;
* ``no_mutation``: leave the input's tensors unchanged;
* ``deterministic``: return the same batch on the same input.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from hypothesis import strategies as st
from hypothesis import settings as Settings

from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import AlgorithmTable
from skyrl_fn.testing._report import PropertyViolation
from skyrl_fn.testing._run import kit_settings, run_property
from skyrl_fn.transforms import SampleBatch

__all__ = ["BATCH_TRANSFORM_PROPERTIES", "sample_batches", "check_batch_transform"]

#: What every batch transform is checked for (see the module docstring).
BATCH_TRANSFORM_PROPERTIES = ("record", "rows_from_input", "no_mutation", "deterministic")


@st.composite
def sample_batches(draw, *, max_groups: int = 4, max_group_size: int = 4, max_len: int = 6) -> SampleBatch:
    """``SampleBatch`` es of ``P`` groups of ``G`` rows (prompt-major), scores from a few values so
    groups tie, responses of length 1..``L_max`` (``truncated`` only at ``L_max``)."""
    p = draw(st.integers(1, max_groups))
    g = draw(st.integers(1, max_group_size))
    l_max = draw(st.integers(1, max_len))
    b = p * g
    lengths = torch.tensor(draw(st.lists(st.integers(1, l_max), min_size=b, max_size=b)))
    t = int(lengths.max())
    mask = torch.arange(t)[None, :] < lengths[:, None]
    scores = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0]), min_size=b, max_size=b)), dtype=torch.float32)
    truncated = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b))) & (lengths == l_max)
    return SampleBatch(
        scores=scores, response_mask=mask, loss_mask=mask.clone(), group_ids=torch.arange(p).repeat_interleave(g),
        truncated=truncated, source=torch.arange(b), max_response_length=l_max, seed=draw(st.integers(0, 2**31)),
    )


def _fail(prop: str, label: str, detail: str, batch: SampleBatch) -> None:
    shown = [
        f"scores: {batch.scores.tolist()}", f"group_ids: {batch.group_ids.tolist()}",
        f"lengths: {batch.lengths().tolist()} (max_response_length {batch.max_response_length})",
        f"truncated: {batch.truncated.tolist()}",
    ]
    raise PropertyViolation(prop, detail, function=label, extra=shown)


def _check(prop: str, fn: Callable[[SampleBatch], SampleBatch], label: str, batch: SampleBatch) -> None:
    __tracebackhide__ = True
    before = {k: getattr(batch, k).clone() for k in ("scores", "response_mask", "loss_mask", "group_ids", "truncated", "source")}
    out = fn(batch)
    if prop == "record":
        if not isinstance(out, SampleBatch):
            _fail(prop, label, f"expected a SampleBatch, got {type(out).__name__}", batch)
        if out.response_mask.shape[1] != batch.response_mask.shape[1]:
            _fail(prop, label, f"expected T = {batch.response_mask.shape[1]}, got {out.response_mask.shape[1]}", batch)
        if (out.max_response_length, out.seed) != (batch.max_response_length, batch.seed):
            _fail(prop, label, "expected max_response_length and seed unchanged", batch)
    elif prop == "rows_from_input":
        src = out.source
        if src.numel() and (int(src.min()) < 0 or int(src.max()) >= batch.batch_size):
            _fail(prop, label, f"source: expected rows in [0, {batch.batch_size}), got {src.tolist()}", batch)
        for name in ("response_mask", "group_ids", "truncated"):
            if not torch.equal(getattr(out, name), getattr(batch, name)[src]):
                _fail(prop, label, f"{name}: expected each output row to equal its source row's", batch)
        if bool((out.loss_mask & ~batch.loss_mask[src]).any()):
            _fail(prop, label, "loss_mask: expected within the source row's loss mask (a transform only removes tokens)", batch)
    elif prop == "no_mutation":
        for k, v in before.items():
            if not torch.equal(getattr(batch, k), v):
                _fail(prop, label, f"{k}: the input was changed in place", batch)
    elif prop == "deterministic":
        again = fn(batch)
        for k in before:
            if not torch.equal(getattr(out, k), getattr(again, k)):
                _fail(prop, label, f"{k}: two calls on the same batch differ", batch)


def check_batch_transform(
    transform: Any,
    *,
    table: AlgorithmTable | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> None:
    """Check a batch transform (a function or a registered ``batch_transform`` name) against
    :data:`BATCH_TRANSFORM_PROPERTIES` on generated batches; raise on the first failure.

    Args:
        transform: ``fn(batch: SampleBatch, **hyper) -> SampleBatch`` or a registered name.
        table: where names are looked up; ``DEFAULT_TABLE`` when None.
        hyperparameters: keyword hyperparameters passed on every call.
        settings: hypothesis settings per property.

    Raises:
        PropertyViolation: an ``AssertionError`` whose message starts with the property name.
    """
    __tracebackhide__ = True
    table = DEFAULT_TABLE if table is None else table
    fn = table.get("batch_transform", transform) if isinstance(transform, str) else transform
    label = transform if isinstance(transform, str) else getattr(fn, "__qualname__", repr(fn))
    hyper = dict(hyperparameters or {})
    config = kit_settings(settings)
    for prop in BATCH_TRANSFORM_PROPERTIES:
        run_property(prop, sample_batches(), lambda b, prop=prop: _check(prop, lambda x: fn(x, **hyper), label, b), config)
