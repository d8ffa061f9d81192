"""Frozen, validated records at the algorithm boundary.

Notation: ``B`` sequences in the batch, ``T`` response tokens (padded), ``P`` distinct groups
(prompts), ``G`` samples per group. Masks are stored as ``torch.bool``; numeric 0/1 masks are
accepted and converted once, at construction.

Records compare by identity (``eq=False``); derive a changed record with ``attrs.evolve``, which
runs every validator again.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch

from skyrl_fn._frozen import FrozenDict
from skyrl_fn._checks import (
    as_group_ids,
    as_mask,
    check_finite,
    check_floating,
    check_finite_and_zero_off_mask,
    check_shape,
    check_tensor,
)

__all__ = [
    "AdvantageInput",
    "AdvantageOutput",
    "PolicyLossInput",
    "PolicyLossOutput",
    "ReducedLoss",
]


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return FrozenDict(value)


def _mask_field(name: str):
    """A mask field: converted to bool once; the shape is checked against the rewards later."""
    return attrs.field(converter=lambda x, _n=name: as_mask(_n, x))


@attrs.frozen(kw_only=True, eq=False)
class AdvantageInput:
    """What every advantage estimator reads.

    Attributes:
        token_level_rewards: ``[B, T]`` floating; finite wherever ``response_mask`` is 1.
        response_mask: ``[B, T]`` bool (0/1 numeric accepted); 1 on response tokens.
        group_ids: ``[B]`` int64 dense ids ``0..P-1``. Accepts ints, strings (prompt uids), numpy
            arrays or tensors; converted once, numbered in sorted order of the labels.
        values: optional ``[B, T]`` critic values (GAE), same dtype as the rewards.
        reward_baselines: optional ``[B]`` per-sample baseline rewards (ReMax's greedy rollout).
        extras: optional mapping of further per-sample tensors, each ``[B]`` or ``[B, T]``
            (e.g. several reward heads for a multi-objective reward). Read-only.
    """

    token_level_rewards: torch.Tensor = attrs.field()
    response_mask: torch.Tensor = _mask_field("response_mask")
    group_ids: torch.Tensor = attrs.field()
    values: torch.Tensor | None = attrs.field(default=None)
    reward_baselines: torch.Tensor | None = attrs.field(default=None)
    extras: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        rewards = check_floating("token_level_rewards", self.token_level_rewards)
        if rewards.dim() != 2:
            raise ValueError(f"token_level_rewards: expected shape [B, T], got {tuple(rewards.shape)}")
        b, t = rewards.shape
        if b == 0 or t == 0:
            raise ValueError(f"token_level_rewards: expected a non-empty batch [B, T] with B, T >= 1, got {(b, t)}")
        check_shape("response_mask", self.response_mask, (b, t), "[B, T]")
        if self.response_mask.device != rewards.device:
            raise ValueError(f"response_mask: expected device {rewards.device}, got {self.response_mask.device}")
        check_finite("token_level_rewards", rewards, self.response_mask)
        # Group ids arrive as labels; store dense ids (the record is frozen, so set it once here).
        object.__setattr__(self, "group_ids", as_group_ids("group_ids", self.group_ids, b).to(rewards.device))
        if self.values is not None:
            check_floating("values", self.values)
            check_shape("values", self.values, (b, t), "[B, T]")
            if self.values.dtype != rewards.dtype:
                raise TypeError(f"values: expected dtype {rewards.dtype} (as token_level_rewards), got {self.values.dtype}")
            check_finite("values", self.values, self.response_mask)
        if self.reward_baselines is not None:
            check_floating("reward_baselines", self.reward_baselines)
            check_shape("reward_baselines", self.reward_baselines, (b,), "[B]")
            check_finite("reward_baselines", self.reward_baselines)
        for key, value in self.extras.items():
            check_tensor(f"extras[{key!r}]", value)
            if value.dim() not in (1, 2) or value.shape[0] != b or (value.dim() == 2 and value.shape[1] != t):
                raise ValueError(f"extras[{key!r}]: expected shape [B] = ({b},) or [B, T] = ({b}, {t}), got {tuple(value.shape)}")

    # Derived quantities used by many estimators; cheap, so computed on demand, never stored.
    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.token_level_rewards.shape[0]

    @property
    def num_groups(self) -> int:
        """``P``, the number of distinct group ids."""
        return int(self.group_ids.max()) + 1

    def float_mask(self) -> torch.Tensor:
        """``[B, T]`` the mask in the rewards' dtype."""
        return self.response_mask.to(self.token_level_rewards.dtype)


@attrs.frozen(kw_only=True, eq=False)
class AdvantageOutput:
    """What every advantage estimator returns.

    Attributes:
        advantages: ``[B, T]`` floating, zero wherever the response mask is 0.
        returns: ``[B, T]`` floating, same shape and dtype, zero wherever the response mask is 0.
    """

    advantages: torch.Tensor = attrs.field()
    returns: torch.Tensor = attrs.field()

    def __attrs_post_init__(self) -> None:
        check_floating("advantages", self.advantages)
        if self.advantages.dim() != 2:
            raise ValueError(f"advantages: expected shape [B, T], got {tuple(self.advantages.shape)}")
        check_floating("returns", self.returns)
        check_shape("returns", self.returns, tuple(self.advantages.shape), "[B, T] (as advantages)")

    def check_against(self, batch: AdvantageInput, *, name: str = "estimator") -> "AdvantageOutput":
        """Check this output against the input it came from: shape, dtype, finite, zero off-mask.

        The table runs this after every estimator call so a custom estimator that leaks into
        padding or returns NaN fails loudly, naming itself.
        """
        b, t = batch.token_level_rewards.shape
        for field in ("advantages", "returns"):
            x = getattr(self, field)
            if field == "returns" and x is self.advantages:
                break  # the same tensor (critic-free estimators): checked once, just above
            if tuple(x.shape) != (b, t):
                raise ValueError(f"{name}: {field} expected shape [B, T] = ({b}, {t}), got {tuple(x.shape)}")
            if x.dtype != batch.token_level_rewards.dtype:
                raise TypeError(f"{name}: {field} expected dtype {batch.token_level_rewards.dtype}, got {x.dtype}")
            check_finite_and_zero_off_mask(f"{name}: {field}", x, batch.response_mask)
        return self


@attrs.frozen(kw_only=True, eq=False)
class PolicyLossInput:
    """What every policy loss reads.

    Attributes:
        log_probs: ``[B, T]`` log-probs of the sampled tokens under the policy being trained
            (carries the gradient).
        old_log_probs: ``[B, T]`` log-probs under the policy that the advantages refer to.
        advantages: ``[B, T]``.
        loss_mask: ``[B, T]`` bool (0/1 numeric accepted); 1 where the token is trained on.
        ref_log_probs: optional ``[B, T]`` log-probs under a reference model (KL terms).
        rollout_log_probs: optional ``[B, T]`` log-probs reported by the rollout engine
            (off-policy corrections).
    """

    log_probs: torch.Tensor = attrs.field()
    old_log_probs: torch.Tensor = attrs.field()
    advantages: torch.Tensor = attrs.field()
    loss_mask: torch.Tensor = _mask_field("loss_mask")
    ref_log_probs: torch.Tensor | None = attrs.field(default=None)
    rollout_log_probs: torch.Tensor | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        lp = check_floating("log_probs", self.log_probs)
        if lp.dim() != 2 or lp.shape[0] == 0 or lp.shape[1] == 0:
            raise ValueError(f"log_probs: expected a non-empty shape [B, T], got {tuple(lp.shape)}")
        shape = tuple(lp.shape)
        check_shape("loss_mask", self.loss_mask, shape, "[B, T]")
        for field in ("old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs"):
            x = getattr(self, field)
            if x is None:
                continue
            check_floating(field, x)
            check_shape(field, x, shape, "[B, T]")
        for field in ("log_probs", "old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs"):
            x = getattr(self, field)
            if x is not None:
                check_finite(field, x.detach(), self.loss_mask)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.log_probs.shape[0]


@attrs.frozen(kw_only=True, eq=False)
class PolicyLossOutput:
    """What every policy loss returns: the per-token loss, before aggregation.

    Aggregation (token-mean, seq-mean-token-sum, ...) is a separate piece, so one loss works with
    every reduction and with micro-batching.

    Attributes:
        token_loss: ``[B, T]`` differentiable per-token loss, zero wherever ``loss_mask`` is 0.
        metrics: read-only mapping name -> detached scalar tensor (no device sync inside a loss).
    """

    token_loss: torch.Tensor = attrs.field()
    metrics: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        check_floating("token_loss", self.token_loss)
        if self.token_loss.dim() != 2:
            raise ValueError(f"token_loss: expected shape [B, T], got {tuple(self.token_loss.shape)}")
        for key, value in self.metrics.items():
            check_tensor(f"metrics[{key!r}]", value)
            if value.dim() != 0:
                raise ValueError(f"metrics[{key!r}]: expected a scalar tensor, got shape {tuple(value.shape)}")
            if value.requires_grad:
                raise ValueError(f"metrics[{key!r}]: expected a detached tensor, got one that requires grad")


@attrs.frozen(kw_only=True, eq=False)
class ReducedLoss:
    """A scalar loss ready for ``backward()`` and its metrics.

    Attributes:
        loss: ``[]`` scalar tensor.
        metrics: read-only mapping name -> detached scalar tensor.
    """

    loss: torch.Tensor = attrs.field()
    metrics: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        check_floating("loss", self.loss)
        if self.loss.dim() != 0:
            raise ValueError(f"loss: expected a scalar tensor, got shape {tuple(self.loss.shape)}")
