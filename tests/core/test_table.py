"""The frozen AlgorithmTable: immutability, registration checks, lookups and checked calls."""

from __future__ import annotations

import functools
import pickle

import cloudpickle
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, KINDS, AdvantageInput, AdvantageOutput, AlgorithmTable, UnknownNameError
from skyrl_fn.estimators import grpo


def _batch() -> AdvantageInput:
    return AdvantageInput(
        token_level_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.5, 0.0]]),
        response_mask=torch.tensor([[1, 1], [1, 1], [1, 0]]),
        group_ids=[7, 7, 9],
    )


@torch.no_grad()
def zero_estimator(batch: AdvantageInput, *, scale: float = 1.0) -> AdvantageOutput:
    """All-zero advantages. [B, T] -> [B, T]."""
    z = torch.zeros_like(batch.token_level_rewards)
    return AdvantageOutput(advantages=z, returns=z)


def test_register_returns_new_table_and_leaves_old_unchanged():
    before = DEFAULT_TABLE.names("advantage_estimator")
    table = DEFAULT_TABLE.register("zero", zero_estimator)
    assert "zero" in table.names("advantage_estimator")
    assert DEFAULT_TABLE.names("advantage_estimator") == before
    assert ("advantage_estimator", "zero") not in DEFAULT_TABLE
    assert table is not DEFAULT_TABLE


def test_table_is_frozen():
    with pytest.raises(AttributeError):
        DEFAULT_TABLE._entries = {}  # type: ignore[misc]


def test_kind_is_inferred_from_annotation():
    table = AlgorithmTable().register("zero", zero_estimator)
    assert table.entry("advantage_estimator", "zero").kind == "advantage_estimator"


def test_kind_cannot_be_inferred_without_annotation():
    def bare(batch, *, scale=1.0):
        return None

    with pytest.raises(ValueError, match="kind for 'bare'"):
        AlgorithmTable().register("bare", bare)
    table = AlgorithmTable().register("bare", bare, kind="advantage_estimator")
    assert table.names("advantage_estimator") == ("bare",)


def test_unknown_kind_suggests():
    with pytest.raises(ValueError, match="did you mean 'policy_loss'"):
        AlgorithmTable().register("x", zero_estimator, kind="policy_los")


def test_duplicate_name_needs_replace():
    table = AlgorithmTable().register("zero", zero_estimator)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        table.register("zero", zero_estimator)
    replaced = table.register("zero", grpo, replace=True)
    assert replaced.estimator("zero") is grpo
    assert table.estimator("zero") is zero_estimator


@pytest.mark.parametrize("name", ["", "has space", None])
def test_bad_names(name):
    with pytest.raises(ValueError, match="name: expected a non-empty string"):
        AlgorithmTable().register(name, zero_estimator)


def test_signature_without_input_is_rejected_at_register_time():
    def no_input(*, scale: float = 1.0) -> AdvantageOutput:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="expected a function taking 1 positional input"):
        AlgorithmTable().register("no_input", no_input, kind="advantage_estimator")


def test_hyperparameter_without_default_is_rejected():
    def needs_gamma(batch: AdvantageInput, *, gamma: float) -> AdvantageOutput:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="keyword-only parameter 'gamma' has no default"):
        AlgorithmTable().register("needs_gamma", needs_gamma)

    def needs_positional(batch: AdvantageInput, gamma) -> AdvantageOutput:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="parameter 'gamma' has no default"):
        AlgorithmTable().register("needs_positional", needs_positional)


def test_non_callable_rejected():
    with pytest.raises(TypeError, match="expected a callable"):
        AlgorithmTable().register("x", 3, kind="advantage_estimator")


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(UnknownNameError) as info:
        DEFAULT_TABLE.estimator("gpro")
    msg = str(info.value)
    assert "did you mean 'grpo'" in msg
    assert "Available:" in msg and "'grpo'" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_unknown_name_without_close_match_still_lists():
    with pytest.raises(UnknownNameError, match="Available"):
        DEFAULT_TABLE.estimator("zzzzzzzzzz")


def test_unregister_returns_new_table():
    table = DEFAULT_TABLE.register("zero", zero_estimator)
    smaller = table.unregister("advantage_estimator", "zero")
    assert "zero" not in smaller.names("advantage_estimator")
    assert "zero" in table.names("advantage_estimator")
    with pytest.raises(UnknownNameError):
        smaller.unregister("advantage_estimator", "zero")


def test_merge():
    extra = AlgorithmTable().register("zero", zero_estimator)
    merged = DEFAULT_TABLE.merge(extra)
    assert merged.estimator("zero") is zero_estimator
    with pytest.raises(ValueError, match="already registered"):
        merged.merge(extra)


def test_promises_are_validated():
    with pytest.raises(ValueError, match="unknown properties"):
        AlgorithmTable().register("zero", zero_estimator, promises={"group_locall"})
    with pytest.raises(TypeError, match="got the string"):
        AlgorithmTable().register("zero", zero_estimator, promises="group_local")
    table = AlgorithmTable().register("zero", zero_estimator, promises={"group_local"})
    assert table.entry("advantage_estimator", "zero").promises == frozenset({"group_local"})


def test_compute_advantages_checks_hyperparameters():
    table = DEFAULT_TABLE.register("zero", zero_estimator)
    out = table.compute_advantages("zero", _batch(), scale=2.0)
    assert torch.equal(out.advantages, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="unknown hyperparameter 'scal'; did you mean 'scale'"):
        table.compute_advantages("zero", _batch(), scal=2.0)


def test_compute_advantages_rejects_output_leaking_off_mask():
    @torch.no_grad()
    def leaky(batch: AdvantageInput) -> AdvantageOutput:
        ones = torch.ones_like(batch.token_level_rewards)
        return AdvantageOutput(advantages=ones, returns=ones)

    table = AlgorithmTable().register("leaky", leaky)
    with pytest.raises(ValueError, match="'leaky': advantages expected 0 wherever response_mask is 0, got non-zero values in row 2"):
        table.compute_advantages("leaky", _batch())


def test_compute_advantages_rejects_nan_and_wrong_type():
    @torch.no_grad()
    def nan(batch: AdvantageInput) -> AdvantageOutput:
        x = torch.where(batch.response_mask, torch.nan, 0.0)
        return AdvantageOutput(advantages=x, returns=x)

    def tuple_out(batch: AdvantageInput):
        return batch.token_level_rewards, batch.token_level_rewards

    table = AlgorithmTable().register("nan", nan).register("tuple_out", tuple_out)
    with pytest.raises(ValueError, match="'nan': advantages: expected finite values"):
        table.compute_advantages("nan", _batch())
    with pytest.raises(TypeError, match="expected it to return an AdvantageOutput, got tuple"):
        table.compute_advantages("tuple_out", _batch())
    with pytest.raises(TypeError, match="batch: expected an AdvantageInput"):
        table.compute_advantages("nan", {"token_level_rewards": 1})


def test_partial_registration_keeps_hyperparameters():
    table = AlgorithmTable().register("g", functools.partial(grpo, epsilon=1e-3))  # kind inferred
    # A keyword fixed by the partial is the entry's identity, not a hyperparameter.
    assert set(table.entry("advantage_estimator", "g").hyperparameters()) == {"norm_by_std"}
    with pytest.raises(ValueError, match="unknown hyperparameter 'epsilon'"):
        table.compute_advantages("g", _batch(), epsilon=0.5)


def test_dr_grpo_cannot_be_turned_back_into_grpo():
    assert "norm_by_std" not in DEFAULT_TABLE.entry("advantage_estimator", "dr_grpo").hyperparameters()


def test_kinds_are_the_documented_four():
    assert set(KINDS) == {"advantage_estimator", "policy_loss", "kl_estimator", "aggregation"}


def test_table_round_trips_through_cloudpickle_and_pickle():
    scale = 3.0

    @torch.no_grad()
    def closure(batch: AdvantageInput) -> AdvantageOutput:
        a = torch.where(batch.response_mask, scale * batch.token_level_rewards, 0)
        return AdvantageOutput(advantages=a, returns=a)

    table = DEFAULT_TABLE.register("closure", closure)
    restored = cloudpickle.loads(cloudpickle.dumps(table))
    assert restored.names("advantage_estimator") == table.names("advantage_estimator")
    out = restored.compute_advantages("closure", _batch())
    assert torch.allclose(out.advantages, torch.tensor([[0.0, 3.0], [0.0, 0.0], [1.5, 0.0]]))
    # The built-in-only table pickles with the standard library too (functions by reference).
    plain = pickle.loads(pickle.dumps(DEFAULT_TABLE))
    assert plain.names("advantage_estimator") == DEFAULT_TABLE.names("advantage_estimator")


def test_every_default_entry_has_a_docstring():
    for entry in DEFAULT_TABLE.entries():
        fn = entry.fn.func if isinstance(entry.fn, functools.partial) else entry.fn
        assert (fn.__doc__ or "").strip(), f"{entry.kind} {entry.name!r} has no docstring"
