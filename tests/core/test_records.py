"""Record validation: bad input fails at construction with an error naming the field, with one
host sync per record; the unchecked constructors check nothing and never read the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from skyrl_fn import AdvantageInput, AdvantageOutput, PolicyLossInput


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


# -- PolicyLossInput: the same checks at the boundary ------------------------------------------------


def make_loss(**overrides):
    fields = dict(
        log_probs=torch.zeros(3, 4), old_log_probs=torch.zeros(3, 4), advantages=torch.zeros(3, 4),
        loss_mask=torch.ones(3, 4), ref_log_probs=torch.zeros(3, 4), rollout_log_probs=torch.zeros(3, 4),
    )
    fields.update(overrides)
    return PolicyLossInput(**fields)


def _nan_at(row, col, shape=(3, 4)):
    x = torch.zeros(shape)
    x[row, col] = float("nan")
    return x


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"log_probs": torch.zeros(3)}, ValueError, "log_probs"),
        ({"log_probs": torch.zeros(3, 4, dtype=torch.int32)}, TypeError, "log_probs"),
        ({"old_log_probs": torch.zeros(3, 5)}, ValueError, "old_log_probs"),
        ({"advantages": torch.zeros(3, 4, dtype=torch.int64)}, TypeError, "advantages"),
        ({"loss_mask": torch.ones(4, 3)}, ValueError, "loss_mask"),
        ({"loss_mask": torch.full((3, 4), 2.0)}, ValueError, "loss_mask: expected only 0 and 1"),
        ({"loss_mask": torch.full((3, 4), 1 + 0j)}, TypeError, "loss_mask"),
        ({"loss_mask": [[1] * 4] * 3}, TypeError, "loss_mask"),
        ({"log_probs": _nan_at(1, 2)}, ValueError, "log_probs: expected finite values, got NaN/inf in row 1"),
        ({"advantages": _nan_at(2, 0)}, ValueError, "advantages: expected finite values, got NaN/inf in row 2"),
        ({"ref_log_probs": _nan_at(0, 3)}, ValueError, "ref_log_probs"),
        ({"rollout_log_probs": torch.full((3, 4), float("inf"))}, ValueError, "rollout_log_probs"),
        # with two bad fields, the first in field order is named
        ({"old_log_probs": _nan_at(0, 0), "advantages": _nan_at(1, 1)}, ValueError, "old_log_probs"),
        # a bad mask is reported before non-finite values
        ({"loss_mask": torch.full((3, 4), 3), "advantages": _nan_at(1, 1)}, ValueError, "loss_mask"),
    ],
)
def test_policy_loss_input_bad_input_names_the_field(overrides, error, match):
    with pytest.raises(error, match=match):
        make_loss(**overrides)


def test_policy_loss_input_allows_non_finite_values_off_the_mask_and_converts_the_mask():
    mask = torch.ones(3, 4)
    mask[1, 2] = 0
    batch = make_loss(log_probs=_nan_at(1, 2), loss_mask=mask)
    assert batch.loss_mask.dtype == torch.bool and not bool(batch.loss_mask[1, 2])


# -- one host sync per checked record, none for the unchecked path ------------------------------------


class SyncCounter(TorchDispatchMode):
    """Counts device-to-host reads: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)`` all run
    ``aten._local_scalar_dense`` (on CUDA each is a sync)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_counts_host_reads():
    with SyncCounter() as c:
        bool(torch.ones(2).sum() > 0)
        torch.ones(2).sum().item()
    assert c.syncs == 2


@pytest.mark.parametrize("mask", [torch.ones(3, 4, dtype=torch.bool), torch.ones(3, 4)], ids=["bool_mask", "float_mask"])
def test_a_checked_record_reads_the_device_once(mask):
    fields = dict(log_probs=torch.zeros(3, 4), old_log_probs=torch.zeros(3, 4), advantages=torch.ones(3, 4), loss_mask=mask,
                  ref_log_probs=torch.zeros(3, 4), rollout_log_probs=torch.zeros(3, 4))
    with SyncCounter() as c:
        PolicyLossInput(**fields)
    assert c.syncs == 1  # five finiteness checks and the 0/1 mask check, fused
    values = torch.zeros(3, 4)
    with SyncCounter() as c:
        AdvantageInput(token_level_rewards=torch.zeros(3, 4), response_mask=mask, group_ids=torch.tensor([0, 0, 1]),
                       values=values, reward_baselines=torch.zeros(3))
    assert c.syncs == 1


def test_unchecked_records_never_read_the_device_and_run_no_check():
    checked = make_loss()
    with SyncCounter() as c:
        parts = [checked.rows(s, s + 2) for s in range(0, 3, 2)]
        fresh = checked.rows(0, 2, log_probs=torch.full((2, 4), 5.0))
        bad = PolicyLossInput.unchecked(log_probs=_nan_at(0, 0), old_log_probs=torch.zeros(2), advantages=torch.zeros(3, 4), loss_mask=torch.ones(3, 4))
        adv = AdvantageInput.unchecked(token_level_rewards=_nan_at(0, 0), response_mask=torch.ones(1, 1, dtype=torch.bool), group_ids=torch.zeros(3))
    assert c.syncs == 0
    assert [p.batch_size for p in parts] == [2, 1] and parts[1].advantages.data_ptr() == checked.advantages[2:].data_ptr()
    assert fresh.log_probs[0, 0] == 5.0 and fresh.ref_log_probs.shape == (2, 4)
    assert bad.old_log_probs.shape == (2,)  # nothing was checked: shape, dtype and NaN pass through
    assert adv.values is None and adv.extras == {} and adv.group_ids.dtype == torch.float32
    with pytest.raises(AttributeError):
        bad.advantages = torch.zeros(3, 4)  # still frozen


def test_unchecked_still_requires_every_field():
    with pytest.raises(TypeError, match="advantages"):
        PolicyLossInput.unchecked(log_probs=torch.zeros(1, 1), old_log_probs=torch.zeros(1, 1), loss_mask=torch.ones(1, 1))
