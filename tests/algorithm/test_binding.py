"""Names bound once: ``bind`` / ``bind_algorithm`` return callables with their hyperparameters,
checked against the signature, and the objective of a run is a partial of ``policy_objective``."""

from __future__ import annotations

import functools

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, UnknownNameError, bind, bind_algorithm
from skyrl_fn.algorithm import CheckedEstimator
from skyrl_fn.algorithm.binding import ShareWeighted
from skyrl_fn.losses import policy_objective

NAMES = {"advantage_estimator": "grpo", "policy_loss": "regular", "aggregation": "token_mean", "kl_estimator": "k3"}


def _batch():
    m = torch.tensor([[True, True, False], [True, False, False]])
    r = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    return AdvantageInput(token_level_rewards=r, response_mask=m, group_ids=torch.tensor([0, 0]))


def test_bind_passes_only_what_is_given():
    loss = bind(DEFAULT_TABLE, "policy_loss", "dual_clip", {"clip_ratio_c": 4.0})
    assert isinstance(loss, functools.partial) and loss.keywords == {"clip_ratio_c": 4.0}
    assert bind(DEFAULT_TABLE, "policy_loss", "regular") is DEFAULT_TABLE.policy_loss("regular")
    with pytest.raises(ValueError, match=r"policy loss 'regular': unknown hyperparameter 'clip_ratio_c'.*\(it takes: eps_clip_high, eps_clip_low\)"):
        bind(DEFAULT_TABLE, "policy_loss", "regular", {"clip_ratio_c": 5})
    with pytest.raises(UnknownNameError, match="did you mean 'grpo'"):
        bind(DEFAULT_TABLE, "advantage_estimator", "gpro")


def test_a_bound_estimator_checks_its_output_and_names_itself():
    def leaky(batch: AdvantageInput) -> AdvantageOutput:
        adv = torch.ones_like(batch.token_level_rewards)  # non-zero in padding
        return AdvantageOutput(advantages=adv, returns=adv)

    est = bind(DEFAULT_TABLE.register("leaky", leaky), "advantage_estimator", "leaky")
    assert isinstance(est, CheckedEstimator)
    with pytest.raises(ValueError, match="advantage estimator 'leaky': advantages expected 0 wherever response_mask is 0"):
        est(_batch())


def test_an_aggregation_without_global_counts_is_weighted_by_its_share():
    def plain_mean(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Mean over valid tokens of this call only. [B, T] -> []."""
        return token_loss[loss_mask].mean()

    agg = bind(DEFAULT_TABLE.register("plain_mean", plain_mean, kind="aggregation"), "aggregation", "plain_mean")
    assert isinstance(agg, ShareWeighted)
    loss, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    assert float(agg(loss, mask, global_tokens=12.0, global_seqs=4.0, max_seq_len=3)) == pytest.approx(0.5)


def test_bind_algorithm_reads_needs_from_entries_and_builds_the_objective():
    alg = bind_algorithm(DEFAULT_TABLE, NAMES, use_kl_loss=True, kl_loss_coef=0.01, entropy_coef=0.1)
    assert alg.needs_reference and not alg.needs_critic and alg.kl_loss_coef == 0.01
    objective = alg.objective()
    assert objective.func is policy_objective
    assert objective.keywords["loss"] is alg.policy_loss and objective.keywords["entropy_coef"] == 0.1
    gae = bind_algorithm(DEFAULT_TABLE, dict(NAMES, advantage_estimator="gae"), {"advantage_estimator": {"lambd": 0.9}})
    assert gae.needs_critic and not gae.needs_reference and gae.kl_loss_coef == 0.0
    assert dict(gae.hyper["advantage_estimator"]) == {"lambd": 0.9}
    with pytest.raises(ValueError, match=r"names: expected a name for each of .* got none for \['kl_estimator'\]"):
        bind_algorithm(DEFAULT_TABLE, {k: v for k, v in NAMES.items() if k != "kl_estimator"})
    with pytest.raises(ValueError, match=r"hyper: expected kinds from .* got \['estimator'\]"):
        bind_algorithm(DEFAULT_TABLE, NAMES, {"estimator": {}})
