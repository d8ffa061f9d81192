"""The invariant kit (skyrl_fn.testing) in one line, and what ``resolve`` accepts: native functions,
SkyRL-style keyword functions, registered names and façade callables alike. Broken functions: tests/testing/test_broken_*.py;
the sweep over every built-in: tests/testing/test_builtins.py; strategies: tests/testing/test_strategies.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import Phase, settings

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput
from skyrl_fn.testing import PropertyReportWarning, PropertyViolation, check_estimator, check_policy_loss, is_skyrl_style, resolve


#: Derandomised, so a test that passes once passes every time; small, so the file stays fast.
# No shrinking: these tests check which property fails, not the counterexample's size
# (tests/testing/test_broken_estimators.py checks shrinking).
KIT = settings(max_examples=10, derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


@torch.no_grad()
def centred(b: AdvantageInput) -> AdvantageOutput:
    """Score minus the group mean, native style. [B, T]."""
    s = torch.where(b.response_mask, b.token_level_rewards, 0).sum(-1)
    n = torch.bincount(b.group_ids, minlength=b.num_groups).to(s.dtype)
    mean = (torch.zeros(b.num_groups, dtype=s.dtype).index_add_(0, b.group_ids, s) / n)[b.group_ids]
    adv = torch.where(b.response_mask, (s - mean)[:, None], 0)
    return AdvantageOutput(advantages=adv, returns=adv)


def test_one_line_with_a_native_function_a_name_or_a_table():
    with pytest.warns(PropertyReportWarning, match="breaks scale_invariant"):
        check_estimator(centred, settings=KIT)
    check_estimator("grpo", settings=KIT)
    table = DEFAULT_TABLE.register("centred", centred, promises={"group_local", "shift_invariant"})
    assert resolve("centred", "advantage_estimator", table).promises == {"group_local", "shift_invariant"}
    check_estimator("centred", table=table, settings=KIT)


# -- SkyRL-style functions -------------------------------------------------------------------------
def simple_baseline(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray, **kwargs):
    """The seed's example: outcome score minus the batch mean."""
    with torch.no_grad():
        response_rewards = (token_level_rewards * response_mask).sum(dim=-1, keepdim=True)
        baseline = response_rewards.mean()
        advantages = (response_rewards - baseline) * response_mask
        return advantages, advantages.clone()


def simple_baseline_unmasked(token_level_rewards, response_mask, index, **kwargs):
    scores = (token_level_rewards * response_mask).sum(dim=-1, keepdim=True)
    adv = (scores - scores.mean()).expand_as(token_level_rewards).clone()  # forgot "* response_mask"
    return adv, adv


def test_skyrl_style_estimators_are_detected_and_checked():
    assert is_skyrl_style(simple_baseline, "advantage_estimator")
    assert not is_skyrl_style(centred, "advantage_estimator")
    with pytest.warns(PropertyReportWarning, match="breaks group_local"):  # the batch mean: not group-local
        check_estimator(simple_baseline, settings=KIT)
    with pytest.raises(PropertyViolation, match="^mask: ") as err:
        check_estimator(simple_baseline_unmasked, settings=KIT)
    assert "SkyRL style" in str(err.value)
    # Not group-local: the seed's baseline is the batch mean.
    with pytest.raises(PropertyViolation, match="^group_local: "):
        check_estimator(simple_baseline, properties=["group_local"], settings=KIT)


def test_facade_callables_are_unwrapped_to_their_entry():
    compat = pytest.importorskip("skyrl_fn.compat")
    target = resolve(compat.AdvantageEstimatorRegistry.get("grpo"), "advantage_estimator")
    assert target.style == "table" and target.promises == DEFAULT_TABLE.entry("advantage_estimator", "grpo").promises
    # SkyRL's own loss names give SkyRL's functions (issue 11); a loss only skyrl_fn ships is the table's
    loss = resolve(compat.PolicyLossRegistry.get("gpg"), "policy_loss")
    assert loss.style == "table" and loss.promises == DEFAULT_TABLE.entry("policy_loss", "gpg").promises
    assert resolve(compat.PolicyLossRegistry.get("regular"), "policy_loss").style == "skyrl"
    # ppo_policy_loss reads config.policy_loss_type (the kit's config says "custom"): check a loss that does not
    check_policy_loss(compat.PolicyLossRegistry.get("gspo"), properties=["finite", "masked_grad_zero"], settings=KIT)


def skyrl_reinforce(log_probs, old_log_probs, advantages, config, loss_mask=None):
    """The seed's custom policy loss: it ignores loss_mask."""
    return (-log_probs * advantages).mean(), 0.0


def skyrl_reinforce_masked(log_probs, old_log_probs, advantages, config, loss_mask=None):
    n = loss_mask.sum().clamp(min=1)
    return (-log_probs * advantages * loss_mask).sum() / n, 0.0


def test_skyrl_style_policy_losses_are_detected_and_checked():
    assert is_skyrl_style(skyrl_reinforce, "policy_loss")
    check_policy_loss(skyrl_reinforce_masked, settings=KIT)
    with pytest.raises(PropertyViolation, match="^masked_grad_zero: "):
        check_policy_loss(skyrl_reinforce, settings=KIT)
