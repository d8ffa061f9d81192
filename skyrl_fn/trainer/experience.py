"""From a rollout to the learner's input: token rewards (with a KL penalty), advantages from the
run's bound estimator (``run.algorithm``), and the ``Experience`` record.

Notation: ``B`` sequences, ``T`` response tokens, ``L`` prompt + response tokens.
"""

from __future__ import annotations

import attrs
import torch

from skyrl_fn.estimators.distill import distill_term
from skyrl_fn.losses.kl import KLController, kl_controller
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.trainer.fields import step_fields
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.rollout.base import RolloutBatch

__all__ = ["KLController", "kl_controller_of", "Experience", "token_rewards", "compute_advantages", "make_experience"]


def kl_controller_of(run: ResolvedRun) -> KLController:
    """The initial KL-in-reward controller of ``run.config.algorithm`` (``kl_ctrl``, ``kl_coef``,
    ``kl_target``, ``kl_horizon``)."""
    a = run.config.algorithm
    return kl_controller(a.kl_ctrl, kl_loss_coef=a.kl_coef, kl_target=a.kl_target, horizon=a.kl_horizon)


def token_rewards(
    scores: torch.Tensor, response_mask: torch.Tensor, *, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """``[B, T]`` token rewards: the outcome score on the last response token, minus a KL penalty::

        r_{b,t} = s_b [t = last_b] - kl_coef * kl_{b,t},   zero where the mask is 0.

    Args:
        scores: ``[B]`` outcome rewards.
        response_mask: ``[B, T]`` bool.
        kl: optional ``[B, T]`` per-token KL to the reference.
        kl_coef: penalty coefficient.
    """
    mask = response_mask.bool()
    b, t = mask.shape
    if scores.shape != (b,):
        raise ValueError(f"scores: expected shape [B] = ({b},), got {tuple(scores.shape)}")
    last = (mask.long().sum(-1) - 1).clamp(min=0)
    r = torch.zeros(b, t, dtype=torch.float32, device=mask.device)
    r[torch.arange(b, device=mask.device), last] = scores.float()
    if kl is not None and kl_coef:
        r = r - kl_coef * kl.float()
    return torch.where(mask, r, 0.0)


def compute_advantages(
    run: ResolvedRun,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> AdvantageOutput:
    """Run the run's bound estimator (``run.algorithm.estimator``; its output is checked).

    Args:
        run: the resolved run.
        rewards: ``[B, T]`` token rewards.
        response_mask: ``[B, T]`` bool.
        group_ids: ``[B]`` prompt index of each sequence.
        values: ``[B, T]`` critic values (GAE).
        extras: the per-sample fields (``AdvantageInput.extras``; ``skyrl_fn.trainer.fields``).
    """
    batch = AdvantageInput(
        token_level_rewards=rewards, response_mask=response_mask, group_ids=group_ids, values=values, extras=extras or {},
    )
    return run.algorithm.estimator(batch)


@attrs.frozen(kw_only=True, eq=False)
class Experience:
    """Everything the updates read, for ``B`` sequences.

    Attributes:
        input_ids: ``[B, L]`` prompt + response ids.
        attention_mask: ``[B, L]`` bool.
        response_mask: ``[B, T]`` bool, the tokens the losses count: the rollout's loss mask
            (``RolloutBatch.effective_loss_mask``; its response mask unless a batch transform
            such as ``overlong_filter`` removed tokens).
        old_log_probs: ``[B, T]`` log-probs under the policy that sampled (trainer's forward),
            or None: ``policy_update`` then takes them from its first forward pass, before any
            optimiser step (the same values, one forward pass fewer).
        rollout_log_probs: ``[B, T]`` log-probs reported by the rollout engine.
        advantages: ``[B, T]``.
        returns: ``[B, T]``.
        ref_log_probs: ``[B, T]`` or None (no KL).
        values: ``[B, T]`` old critic values or None (no critic).
        group_ids: ``[B]`` prompt index of each sequence (an aggregation over prompts reads it).
        extras: the step's per-sample fields besides the old and rollout log-probs, by name: the
            task's (``RolloutBatch.extras``) and the trainer's computed on request
            (``skyrl_fn.trainer.fields``); ``[B]`` or ``[B, T]``, sliced with the rows.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_log_probs: torch.Tensor | None
    rollout_log_probs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_log_probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = attrs.field(factory=dict, converter=dict)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        """``T``."""
        return self.response_mask.shape[1]

    def slice(self, start: int, stop: int) -> "Experience":
        """Rows ``start:stop`` (a micro-batch)."""
        return self._take(slice(start, stop))

    def rows(self, index: torch.Tensor) -> "Experience":
        """The rows ``index`` (``[B']`` int64), in that order (a data-parallel rank's share)."""
        return self._take(index)

    def _take(self, rows) -> "Experience":
        fields = attrs.asdict(self, recurse=False)
        extras = {k: v[rows] for k, v in fields.pop("extras").items()}
        return Experience(**{k: (None if v is None else v[rows]) for k, v in fields.items()}, extras=extras)


def make_experience(
    run: ResolvedRun,
    rollout: RolloutBatch,
    scores: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    fields: dict[str, torch.Tensor] | None = None,
) -> tuple[Experience, dict[str, float]]:
    """Token rewards (with the KL penalty when ``use_kl_in_reward``), advantages, the record.

    Args:
        run: the resolved run.
        rollout: the sampled batch.
        scores: ``[B]`` outcome rewards.
        old_log_probs: ``[B, T]`` from :func:`batched_log_probs` with the sampling policy, or
            None to let ``policy_update`` take them from its first forward pass (the KL to the
            reference is then measured with the rollout's log-probs). In bypass mode
            (``algorithm.bypass_mode``, verl's ``rollout_correction.bypass_mode``) they are the
            rollout engine's log-probs and must not be given: no trainer pass scores the rollout.
        ref_log_probs: ``[B, T]`` reference log-probs (needed when a KL is used).
        values: ``[B, T]`` critic values (needed by GAE).
        kl_coef: the KL-in-reward coefficient (from a ``KLController``).
        fields: the trainer's per-sample fields computed on request (``run.computed_fields``,
            from ``skyrl_fn.trainer.forward.old_policy_pass``), ``[B, T]``.

    Returns:
        the ``Experience`` and metrics (python floats): reward mean/std, response length, KL.
    """
    alg = run.algorithm
    mask = rollout.response_mask
    if run.config.algorithm.bypass_mode:
        if old_log_probs is not None:
            raise ValueError("old_log_probs: expected None in bypass mode (the rollout's log-probs are the old ones), got a tensor")
        old_log_probs = rollout.rollout_log_probs
    if alg.needs_reference and ref_log_probs is None:
        raise ValueError("ref_log_probs: expected [B, T] reference log-probs when a KL is used, got None")
    if alg.needs_critic and values is None:
        raise ValueError(f"values: expected [B, T] critic values for estimator {alg.names['advantage_estimator']!r}, got None")
    metrics: dict[str, float] = {}
    kl = None
    if ref_log_probs is not None:
        behaviour = old_log_probs if old_log_probs is not None else rollout.rollout_log_probs
        kl = torch.where(mask, alg.kl_estimator(behaviour, ref_log_probs), 0.0)
        metrics["kl"] = float(kl.sum() / mask.sum().clamp(min=1))
    in_reward = alg.kl_in_reward
    rewards = token_rewards(scores, mask, kl=kl if in_reward else None, kl_coef=kl_coef if in_reward else 0.0)
    # The step's per-sample fields under their own names (skyrl_fn.trainer.fields): the pieces
    # that declare them (requires("extras.<key>")) read them; the trainer special-cases none.
    behaviour = old_log_probs if old_log_probs is not None else rollout.rollout_log_probs
    computed = dict(fields or {})
    missing = sorted(run.computed_fields - set(computed))
    if missing:
        raise ValueError(f"fields: expected the trainer's {missing} (a chosen piece reads them; old_policy_pass computes them), got {sorted(computed)}")
    extras = step_fields(behaviour, rollout.rollout_log_probs, computed, rollout.extras)
    adv = compute_advantages(run, rewards, mask, rollout.group_ids, values=values, extras=extras)
    advantages = adv.advantages
    if rollout.teacher_log_probs is not None:  # on-policy distillation (skyrl_fn.trainer.teacher)
        term = distill_term(behaviour, rollout.teacher_log_probs, mask, coef=run.config.teacher.coef)
        advantages = advantages + term.to(advantages.dtype)
        metrics["teacher_kl"] = float(-term.sum() / run.config.teacher.coef / mask.sum().clamp(min=1))
    ids, am = rollout.sequences()
    exp = Experience(  # the loss counts the loss mask's tokens (a batch transform may have removed some)
        input_ids=ids, attention_mask=am, response_mask=rollout.effective_loss_mask(), old_log_probs=old_log_probs,
        rollout_log_probs=rollout.rollout_log_probs, advantages=advantages, returns=adv.returns,
        ref_log_probs=ref_log_probs, values=values, group_ids=rollout.group_ids, extras={**computed, **rollout.extras},
    )
    lengths = mask.sum(-1).float()
    metrics.update(
        reward=float(scores.float().mean()), reward_std=float(scores.float().std()) if scores.numel() > 1 else 0.0,
        response_length=float(lengths.mean()), advantage_abs=float((advantages.abs().sum() / mask.sum().clamp(min=1))),
    )
    return exp, metrics
