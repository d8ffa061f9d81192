"""Record validation: bad input fails at construction with an error naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyrl_fn import AdvantageInput, AdvantageOutput


def make(**overrides):
    fields = dict(
        token_level_rewards=torch.zeros(3, 4),
        response_mask=torch.ones(3, 4),
        group_ids=[0, 0, 1],
    )
    fields.update(overrides)
    return AdvantageInput(**fields)


def test_valid_record_converts_mask_and_ids_once():
    batch = make(group_ids=["b", "a", "b"], response_mask=torch.tensor([[1, 1, 0, 0]] * 3))
    assert batch.response_mask.dtype == torch.bool
    assert batch.group_ids.tolist() == [1, 0, 1] and batch.group_ids.dtype == torch.int64
    assert batch.num_groups == 2 and batch.batch_size == 3


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"token_level_rewards": torch.tensor([[0.0, float("nan"), 0, 0]] * 3)}, ValueError, "token_level_rewards"),
        ({"token_level_rewards": torch.tensor([[0.0, float("inf"), 0, 0]] * 3)}, ValueError, "token_level_rewards"),
        ({"token_level_rewards": torch.zeros(3, 5)}, ValueError, "response_mask"),
        ({"token_level_rewards": torch.zeros(3)}, ValueError, "token_level_rewards"),
        ({"token_level_rewards": torch.zeros(0, 4), "response_mask": torch.ones(0, 4), "group_ids": []}, ValueError, "token_level_rewards"),
        ({"token_level_rewards": torch.zeros(3, 0), "response_mask": torch.ones(3, 0)}, ValueError, "token_level_rewards"),
        ({"token_level_rewards": torch.zeros(3, 4, dtype=torch.int64)}, TypeError, "token_level_rewards"),
        ({"token_level_rewards": [[0.0] * 4] * 3}, TypeError, "token_level_rewards"),
        ({"response_mask": torch.full((3, 4), 2)}, ValueError, "response_mask"),
        ({"response_mask": torch.full((3, 4), 0.5)}, ValueError, "response_mask"),
        ({"response_mask": torch.ones(4, 3)}, ValueError, "response_mask"),
        ({"group_ids": [0.0, 0.0, 1.0]}, TypeError, "group_ids"),
        ({"group_ids": torch.tensor([0.0, 0.0, 1.0])}, TypeError, "group_ids"),
        ({"group_ids": np.array([0.5, 0.5, 1.0])}, TypeError, "group_ids"),
        ({"group_ids": [0, 1]}, ValueError, "group_ids"),
        ({"group_ids": [[0], [0], [1]]}, ValueError, "group_ids"),
        ({"values": torch.zeros(3, 5)}, ValueError, "values"),
        ({"values": torch.zeros(3, 4, dtype=torch.float64)}, TypeError, "values"),
        ({"values": torch.full((3, 4), float("nan"))}, ValueError, "values"),
        ({"reward_baselines": torch.zeros(4)}, ValueError, "reward_baselines"),
        ({"reward_baselines": torch.tensor([0.0, float("nan"), 0.0])}, ValueError, "reward_baselines"),
        ({"extras": {"score2": torch.zeros(5)}}, ValueError, "extras"),
    ],
)
def test_bad_input_names_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        make(**overrides)


def test_nan_error_names_the_row():
    rewards = torch.zeros(3, 4)
    rewards[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        make(token_level_rewards=rewards)


def test_non_finite_rewards_off_the_mask_are_allowed():
    rewards = torch.zeros(2, 3)
    rewards[1, 2] = float("nan")
    batch = make(token_level_rewards=rewards, response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), group_ids=[0, 0])
    assert batch.batch_size == 2


def test_records_are_frozen():
    batch = make()
    with pytest.raises(AttributeError):
        batch.token_level_rewards = torch.ones(3, 4)


def test_output_record_checks_shapes_and_leaks():
    batch = make(response_mask=torch.tensor([[1, 1, 0, 0]] * 3))
    with pytest.raises(ValueError, match="returns"):
        AdvantageOutput(advantages=torch.zeros(3, 4), returns=torch.zeros(3, 5))
    with pytest.raises(TypeError, match="advantages"):
        AdvantageOutput(advantages=torch.zeros(3, 4, dtype=torch.int64), returns=torch.zeros(3, 4))
    leaky = AdvantageOutput(advantages=torch.ones(3, 4), returns=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="advantages expected 0 wherever response_mask is 0"):
        leaky.check_against(batch, name="mine")
    nan = AdvantageOutput(advantages=torch.full((3, 4), float("nan")), returns=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mine: advantages"):
        nan.check_against(batch, name="mine")
