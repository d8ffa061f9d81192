"""Reward transforms: pieces applied before the estimator, ``AdvantageInput -> AdvantageInput``.

Each builder checks its hyperparameters now and returns a :class:`RewardTransform` around a
``functools.partial`` of a module-level function, so the piece pickles with plain ``pickle`` too.
Every transform derives a new record with ``attrs.evolve`` (which re-validates it); off-mask
positions of the new rewards are 0.

Notation: ``B`` sequences, ``T`` response tokens, ``r`` token rewards ``[B, T]``, ``m`` the
response mask ``[B, T]``, ``L_i = sum_t m_{i,t}`` the response length.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import attrs
import torch

from skyrl_fn.core._checks import check_number
from skyrl_fn.core.compose import RewardTransform, piece_name
from skyrl_fn.estimators._groups import accum_dtype
from skyrl_fn.core.records import AdvantageInput
from skyrl_fn.core.table import unknown_name_message

__all__ = ["scale_rewards", "shape_rewards", "weighted_sum", "length_penalty", "last_token"]

#: The key of :func:`weighted_sum` that names the batch's own token rewards.
TOKEN_REWARDS = "token_level_rewards"


def last_token(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, True only on each row's last valid token (all False for an empty row)."""
    t = response_mask.shape[-1]
    last = t - 1 - response_mask.flip(-1).to(torch.uint8).argmax(dim=-1)
    steps = torch.arange(t, device=response_mask.device)
    return (steps == last[:, None]) & response_mask.any(dim=-1, keepdim=True)


def _with_rewards(batch: AdvantageInput, rewards: torch.Tensor) -> AdvantageInput:
    new = torch.where(batch.response_mask, rewards.to(batch.token_level_rewards.dtype), 0)
    return attrs.evolve(batch, token_level_rewards=new)


def _scale(batch: AdvantageInput, *, c: float) -> AdvantageInput:
    return _with_rewards(batch, batch.token_level_rewards * c)


def scale_rewards(c: float) -> RewardTransform:
    """Multiply every token reward by ``c``: ``r'_{i,t} = c * r_{i,t} * m_{i,t}``.

    Args:
        c: finite scale (negative flips the objective, 0 zeroes it).

    Returns:
        A :class:`RewardTransform` on ``token_level_rewards [B, T]``.

    Raises:
        TypeError / ValueError: ``c`` is not a finite real number.
    """
    c = check_number("c", c)
    return RewardTransform(functools.partial(_scale, c=c), name=f"scale_rewards({c!r})")


def _shape(batch: AdvantageInput, *, fn: Callable) -> AdvantageInput:
    new = fn(batch.token_level_rewards, batch.response_mask)
    where = f"shape_rewards({piece_name(fn)})"
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"{where}: expected the function to return a torch.Tensor [B, T], got {type(new).__name__}")
    if not new.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a floating tensor, got {new.dtype}")
    shape = tuple(batch.token_level_rewards.shape)
    if tuple(new.shape) != shape:
        raise ValueError(f"{where}: expected the function to return shape [B, T] = {shape}, got {tuple(new.shape)}")
    return _with_rewards(batch, new)


def shape_rewards(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> RewardTransform:
    """Replace the token rewards by ``fn(token_level_rewards, response_mask)``::

        r'_{i,t} = fn(r, m)_{i,t} * m_{i,t}

    ``fn`` receives ``r [B, T]`` (floating) and ``m [B, T]`` (bool) and must return a new floating
    ``[B, T]`` tensor without changing its inputs; the result is cast to the rewards' dtype and
    zeroed off the mask. Use a module-level function (or a ``functools.partial`` of one) if the
    piece must pickle without cloudpickle.

    Raises:
        TypeError: ``fn`` is not callable (now), or returns a non-floating tensor (at the call).
        ValueError: ``fn`` returns the wrong shape (at the call).
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable (rewards [B, T], mask [B, T]) -> [B, T], got {type(fn).__name__}")
    return RewardTransform(functools.partial(_shape, fn=fn), name=f"shape_rewards({piece_name(fn)})")


def _weighted(batch: AdvantageInput, *, weights: tuple[tuple[str, float], ...]) -> AdvantageInput:
    rewards, mask = batch.token_level_rewards, batch.response_mask
    acc = accum_dtype(rewards.dtype)
    last = None
    total = torch.zeros(rewards.shape, dtype=acc, device=rewards.device)
    for key, w in weights:
        if key == TOKEN_REWARDS:
            head = torch.where(mask, rewards.to(acc), 0)
        elif key not in batch.extras:
            heads = unknown_name_message("reward head", key, [*batch.extras, TOKEN_REWARDS])
            raise ValueError(f"weighted_sum: {heads} (the keys of batch.extras, and {TOKEN_REWARDS!r})")
        else:
            x = batch.extras[key]
            if x.dtype.is_complex:
                raise TypeError(f"weighted_sum: extras[{key!r}] expected a real dtype, got {x.dtype}")
            x = x.to(acc)
            if x.dim() == 1:  # an outcome head: the whole reward on the last valid token
                last = last_token(mask) if last is None else last
                head = torch.where(last, x[:, None], 0)
            else:
                head = torch.where(mask, x, 0)
        total = total + w * head
    return _with_rewards(batch, total)


def weighted_sum(weights: Mapping[str, float]) -> RewardTransform:
    """Combine several reward heads into the token rewards (multi-objective rewards)::

        r'_{i,t} = sum_k w_k * h^k_{i,t} * m_{i,t}

    Each head ``k`` is read from ``batch.extras[k]``: a ``[B]`` head (an outcome reward) is placed
    on each row's last valid token; a ``[B, T]`` head is used as token rewards. The key
    ``"token_level_rewards"`` names the batch's own token rewards, so
    ``weighted_sum({"token_level_rewards": 1.0, "format": 0.1})`` adds a bonus to them. Heads are
    accumulated in float32 (float64 for float64 rewards) and cast to the rewards' dtype. Heads not
    named keep their place in ``extras`` but do not enter the reward.

    Args:
        weights: head name -> finite weight; at least one head.

    Returns:
        A :class:`RewardTransform` replacing ``token_level_rewards [B, T]``.

    Raises:
        TypeError / ValueError: (now) ``weights`` is not a non-empty mapping of string -> finite
            number; (at the call) a named head is not in ``batch.extras``, listing the extras.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights: expected a mapping head name -> weight, got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights: expected at least one reward head, got an empty mapping")
    pairs = []
    for key, w in weights.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"weights: expected non-empty string head names, got {key!r}")
        pairs.append((key, check_number(f"weights[{key!r}]", w)))
    pairs = tuple(pairs)
    shown = ", ".join(f"{k!r}: {w!r}" for k, w in pairs)
    return RewardTransform(functools.partial(_weighted, weights=pairs), name=f"weighted_sum({{{shown}}})")


def _length_penalty(batch: AdvantageInput, *, coef: float) -> AdvantageInput:
    rewards, mask = batch.token_level_rewards, batch.response_mask
    acc = accum_dtype(rewards.dtype)
    lengths = mask.sum(dim=-1).to(acc)
    penalty = torch.where(last_token(mask), (coef * lengths)[:, None], 0)
    return _with_rewards(batch, rewards.to(acc) - penalty)


def length_penalty(coef: float) -> RewardTransform:
    """Penalise long responses: subtract ``coef * L_i`` on each row's last valid token, so the
    outcome score ``s_i = sum_t r_{i,t} m_{i,t}`` becomes ``s_i - coef * L_i``::

        r'_{i,t} = (r_{i,t} - coef * L_i * [t = last valid token of i]) * m_{i,t}

    Args:
        coef: finite, ``>= 0``, the penalty per response token.

    Raises:
        TypeError / ValueError: ``coef`` is not a finite number ``>= 0``.
    """
    coef = check_number("coef", coef, low=0.0)
    return RewardTransform(functools.partial(_length_penalty, coef=coef), name=f"length_penalty({coef!r})")

