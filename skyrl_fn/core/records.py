"""Frozen, validated records at the algorithm boundary.

Notation: ``B`` sequences in the batch, ``T`` response tokens (padded), ``P`` distinct groups
(prompts), ``G`` samples per group. Masks are stored as ``torch.bool``; numeric 0/1 masks are
accepted and converted once, at construction.

Records compare by identity (``eq=False``); derive a changed record with ``attrs.evolve``, which
runs every validator again.

Validation once per batch. The checked constructor runs every check where the data enters, with
one host sync for all of a record's value checks (finiteness, 0/1 masks; see
``skyrl_fn.core._checks.check_all``); shapes and dtypes are host-side metadata and cost no sync.
Inside a training step, records built from an already-checked batch (micro-batch slices, the
same tensors re-wrapped) use ``unchecked(...)`` / :meth:`PolicyLossInput.rows`, which validate
nothing and never read the device.
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

import attrs
import torch

from skyrl_fn.core._frozen import FrozenDict
from skyrl_fn.core._rowsums import remembered_outcome_scores
from skyrl_fn.core._checks import (
    as_group_ids,
    check_all,
    check_floating,
    check_finite_and_zero_off_mask,
    check_shape,
    check_tensor,
    mask_or_flag,
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


_R = TypeVar("_R")


def _unchecked(cls: type[_R], fields: Mapping[str, Any]) -> _R:
    """An instance of the attrs record ``cls`` holding ``fields`` (every field, by name) as given:
    no validator and no ``__attrs_post_init__`` run; converters do (``FrozenDict`` wrapping of a
    mapping: host-side, no device read)."""
    self = object.__new__(cls)
    for a in attrs.fields(cls):
        value = fields[a.name]
        object.__setattr__(self, a.name, a.converter(value) if a.converter is not None else value)
    return self


def _take_mask(record: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the record's mask field by its bool form (no sync); return (mask, original, flag)."""
    original = getattr(record, name)
    mask, flag = mask_or_flag(name, original)
    object.__setattr__(record, name, mask)
    return mask, original, flag


def _check_extras(extras: Mapping[str, Any], b: int, t: int) -> None:
    """Every per-sample field is a tensor of shape ``[B]`` or ``[B, T]`` (host-side, no sync)."""
    for key, value in extras.items():
        if not isinstance(key, str):
            raise TypeError(f"extras: expected string keys, got {key!r}")
        check_tensor(f"extras[{key!r}]", value)
        if value.dim() not in (1, 2) or value.shape[0] != b or (value.dim() == 2 and value.shape[1] != t):
            raise ValueError(f"extras[{key!r}]: expected shape [B] = ({b},) or [B, T] = ({b}, {t}), got {tuple(value.shape)}")


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
    response_mask: torch.Tensor = attrs.field()  # converted to bool in __attrs_post_init__
    group_ids: torch.Tensor = attrs.field()
    values: torch.Tensor | None = attrs.field(default=None)
    reward_baselines: torch.Tensor | None = attrs.field(default=None)
    extras: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        mask, original_mask, mask_flag = _take_mask(self, "response_mask")
        rewards = check_floating("token_level_rewards", self.token_level_rewards)
        if rewards.dim() != 2:
            raise ValueError(f"token_level_rewards: expected shape [B, T], got {tuple(rewards.shape)}")
        b, t = rewards.shape
        if b == 0 or t == 0:
            raise ValueError(f"token_level_rewards: expected a non-empty batch [B, T] with B, T >= 1, got {(b, t)}")
        check_shape("response_mask", self.response_mask, (b, t), "[B, T]")
        if self.response_mask.device != rewards.device:
            raise ValueError(f"response_mask: expected device {rewards.device}, got {self.response_mask.device}")
        # Group ids arrive as labels; store dense ids (the record is frozen, so set it once here).
        object.__setattr__(self, "group_ids", as_group_ids("group_ids", self.group_ids, b).to(rewards.device))
        if self.values is not None:
            check_floating("values", self.values)
            check_shape("values", self.values, (b, t), "[B, T]")
            if self.values.dtype != rewards.dtype:
                raise TypeError(f"values: expected dtype {rewards.dtype} (as token_level_rewards), got {self.values.dtype}")
        if self.reward_baselines is not None:
            check_floating("reward_baselines", self.reward_baselines)
            check_shape("reward_baselines", self.reward_baselines, (b,), "[B]")
        _check_extras(self.extras, b, t)
        # The rewards' sums over the mask prove them finite there, and are the estimators' outcome
        # scores: computed once here, remembered for these tensors (skyrl_fn.core._rowsums).
        scores = remembered_outcome_scores(rewards, mask)
        check_all(
            [
                ("token_level_rewards", rewards, mask, torch.isfinite(scores).all()),
                ("values", self.values, mask),
                ("reward_baselines", self.reward_baselines, None),
            ],
            [("response_mask", original_mask, mask_flag)],
        )

    @classmethod
    def unchecked(
        cls,
        *,
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        group_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        reward_baselines: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> "AdvantageInput":
        """Build without any check or conversion: no host sync, no device read.

        For records made from tensors a checked ``AdvantageInput`` already holds (the fields must
        be in its canonical form: ``response_mask`` bool ``[B, T]``, ``group_ids`` dense int64
        ``[B]`` on the rewards' device). Nothing is verified; bad input gives wrong results, not
        an error. Use the ordinary constructor wherever data enters.
        """
        return _unchecked(
            cls,
            dict(
                token_level_rewards=token_level_rewards, response_mask=response_mask, group_ids=group_ids,
                values=values, reward_baselines=reward_baselines, extras=extras,
            ),
        )

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
        extras: optional mapping of further per-sample tensors, each ``[B]`` or ``[B, T]``: the
            step's per-sample fields (a loss declares the ones it reads with
            ``requires("extras.<key>")``). Read-only; sliced with the rows by :meth:`rows`.
    """

    log_probs: torch.Tensor = attrs.field()
    old_log_probs: torch.Tensor = attrs.field()
    advantages: torch.Tensor = attrs.field()
    loss_mask: torch.Tensor = attrs.field()  # converted to bool in __attrs_post_init__
    ref_log_probs: torch.Tensor | None = attrs.field(default=None)
    rollout_log_probs: torch.Tensor | None = attrs.field(default=None)
    extras: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        mask, original_mask, mask_flag = _take_mask(self, "loss_mask")
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
        _check_extras(self.extras, *shape)
        check_all(
            [(f, getattr(self, f), mask) for f in ("log_probs", "old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs")],
            [("loss_mask", original_mask, mask_flag)],
        )

    @classmethod
    def unchecked(
        cls,
        *,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        ref_log_probs: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> "PolicyLossInput":
        """Build without any check or conversion: no host sync, no device read.

        For the inner loop of a training step, where the batch was checked once at the boundary
        (the ordinary constructor) and each micro-batch re-wraps slices of it (see :meth:`rows`)
        together with fresh ``log_probs``. ``loss_mask`` must already be bool ``[B, T]``. Nothing
        is verified; bad input gives wrong results, not an error.
        """
        return _unchecked(
            cls,
            dict(
                log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask,
                ref_log_probs=ref_log_probs, rollout_log_probs=rollout_log_probs, extras=extras,
            ),
        )

    def rows(self, start: int, stop: int, *, log_probs: torch.Tensor | None = None) -> "PolicyLossInput":
        """Rows ``[start, stop)`` of this (checked) record as an unchecked ``PolicyLossInput``.

        Micro-batching: every ``[B, T]`` field and every per-sample field is sliced (views, no
        copy, no sync). ``log_probs``
        replaces the sliced log-probs, e.g. the micro-batch's fresh forward pass ``[stop - start, T]``.
        """
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[start:stop]

        return PolicyLossInput.unchecked(
            log_probs=cut(self.log_probs) if log_probs is None else log_probs,
            old_log_probs=cut(self.old_log_probs),
            advantages=cut(self.advantages),
            loss_mask=cut(self.loss_mask),
            ref_log_probs=cut(self.ref_log_probs),
            rollout_log_probs=cut(self.rollout_log_probs),
            extras={k: v[start:stop] for k, v in self.extras.items()},
        )

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
