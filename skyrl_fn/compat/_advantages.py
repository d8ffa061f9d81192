"""Advantage estimators across the two call styles.

SkyRL-Train calls an estimator with keywords and gets a pair back::

    advantages, returns = fn(token_level_rewards=..., response_mask=..., index=..., values=...,
                             gamma=..., lambd=..., grpo_norm_by_std=..., config=..., **more)

A native estimator is ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput``. ``SkyRLCallable``
turns a table entry into the first style; ``NativeFromSkyRL`` turns a SkyRL-style function into the
second. Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from skyrl_fn.compat._calls import call_accepting, caller_names, describe
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.table import AlgorithmTable

__all__ = [
    "HYPER_ALIASES",
    "AdvantageEstimator",
    "SkyRLCallable",
    "NativeFromSkyRL",
    "advantage_input",
    "native_hyperparameters",
]

#: SkyRL-Train keyword -> native hyperparameter. Both spellings of the GRPO std switch exist in
#: SkyRL-Train (``grpo_norm_by_std`` in its trainer, ``norm_adv_by_std_in_grpo`` in verl-style configs).
HYPER_ALIASES: Mapping[str, str] = {
    "grpo_norm_by_std": "norm_by_std",
    "norm_adv_by_std_in_grpo": "norm_by_std",
}
#: Keywords that fill the AdvantageInput record, never hyperparameters.
RECORD_KEYWORDS = frozenset({"token_level_rewards", "response_mask", "index", "values", "reward_baselines", "extras"})
#: Hyperparameters passed to a native estimator that takes ``**hyper`` (so accepts anything).
KNOWN_HYPERPARAMETERS = ("gamma", "lambd", "epsilon", "norm_by_std")
#: What SkyRL-Train's ``compute_advantages_and_returns`` always passes; a SkyRL-style function
#: run from a table gets these unless a hyperparameter overrides them.
SKYRL_DEFAULTS: Mapping[str, Any] = {"gamma": 1.0, "lambd": 1.0, "grpo_norm_by_std": True}


def advantage_input(kwargs: Mapping[str, Any]) -> AdvantageInput:
    """The record for SkyRL keywords (``index=None`` puts the whole batch in one group)."""
    rewards = kwargs.get("token_level_rewards")
    mask = kwargs.get("response_mask")
    for key, value in (("token_level_rewards", rewards), ("response_mask", mask)):
        if value is None:
            raise TypeError(f"{key}: expected a [B, T] tensor keyword argument, got none")
    index = kwargs.get("index")
    if index is None and isinstance(rewards, torch.Tensor) and rewards.dim() > 0:
        index = np.zeros(rewards.shape[0], dtype=np.int64)
    with caller_names({"group_ids": "index"}):
        return AdvantageInput(
            token_level_rewards=rewards,
            response_mask=mask,
            group_ids=index,
            values=kwargs.get("values"),
            reward_baselines=kwargs.get("reward_baselines"),
            extras=kwargs.get("extras") or {},
        )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def native_hyperparameters(kwargs: Mapping[str, Any], accepted: Mapping[str, Any] | None) -> dict[str, Any]:
    """The native hyperparameters among SkyRL keywords.

    Aliases are mapped (``HYPER_ALIASES``); only names the function accepts are kept (``accepted``
    from ``Entry.hyperparameters()``; ``None`` means it takes ``**hyper``, then only
    ``KNOWN_HYPERPARAMETERS``); a ``None`` value means "use the native default". Everything else
    (``config``, trainer extras) is ignored, as SkyRL-Train's estimators ignore it.

    Raises:
        ValueError: two spellings of one hyperparameter disagree.
    """
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in kwargs.items():
        if key in RECORD_KEYWORDS or value is None:
            continue
        native = HYPER_ALIASES.get(key, key)
        if native not in (KNOWN_HYPERPARAMETERS if accepted is None else accepted):
            continue
        if native in out and not _same(out[native], value):
            raise ValueError(
                f"{origin[native]}={out[native]!r} and {key}={value!r}: both set {native!r}; "
                f"expected them to agree"
            )
        out[native], origin[native] = value, key
    return out


class SkyRLCallable:
    """A native estimator of a table, called as SkyRL-Train calls its estimators.

    ``fn(token_level_rewards=[B, T], response_mask=[B, T], index=[B], values=[B, T] | None, gamma,
    lambd, epsilon, grpo_norm_by_std / norm_adv_by_std_in_grpo, reward_baselines=[B] | None,
    **ignored) -> (advantages [B, T], returns [B, T])``, checked exactly as
    ``AlgorithmTable.compute_advantages`` checks it. Picklable (holds the table and the name).

    A hyperparameter that the entry fixes with ``functools.partial`` (``dr_grpo`` is ``grpo`` with
    ``norm_by_std=False``) is part of the entry's identity: SkyRL-Train's trainer passes
    ``grpo_norm_by_std=True`` on every call, and that must not turn Dr. GRPO back into GRPO, so a
    keyword naming a fixed hyperparameter is ignored like any other extra.
    """

    def __init__(self, table: AlgorithmTable, name: str) -> None:
        entry = table.entry("advantage_estimator", name)
        self.table, self.name = table, name
        self.__name__ = self.__qualname__ = name
        self.__doc__ = entry.fn.__doc__

    def __call__(self, token_level_rewards=None, response_mask=None, index=None, **kwargs: Any):
        kwargs.update(token_level_rewards=token_level_rewards, response_mask=response_mask, index=index)
        batch = advantage_input(kwargs)
        entry = self.table.entry("advantage_estimator", self.name)
        # Keywords fixed by a partial are not in entry.hyperparameters(), so they are ignored.
        hyper = native_hyperparameters(kwargs, entry.hyperparameters())
        out = self.table.compute_advantages(self.name, batch, **hyper)
        return out.advantages, out.returns

    def __repr__(self) -> str:
        return f"SkyRLCallable({self.name!r})"


def pair(result: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) from a SkyRL-style result; a lone tensor means returns = advantages."""
    if isinstance(result, torch.Tensor):
        return result, result
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(x, torch.Tensor) for x in result):
        return result[0], result[1]
    got = type(result).__name__
    if isinstance(result, (tuple, list)):
        got = f"{got} of {[type(x).__name__ for x in result]}"
    raise TypeError(f"advantage estimator {name!r}: expected (advantages, returns) tensors [B, T], got {got}")


def masked(x: torch.Tensor, mask: torch.Tensor, field: str, name: str) -> torch.Tensor:
    if tuple(x.shape) != tuple(mask.shape):
        raise ValueError(
            f"advantage estimator {name!r}: {field} expected shape [B, T] = {tuple(mask.shape)}, got {tuple(x.shape)}"
        )
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


class NativeFromSkyRL:
    """A SkyRL-style estimator (function or ``AdvantageEstimator`` instance) as a native one.

    Called as ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput``. The SkyRL function
    receives ``token_level_rewards`` (a copy, so in-place edits cannot reach the record),
    ``response_mask`` as 0/1 in the rewards' dtype, ``index`` = the dense group ids as a numpy
    int64 array ``[B]``, ``values`` (a copy), ``reward_baselines`` and ``extras`` when present,
    ``SKYRL_DEFAULTS`` and the hyperparameters (``norm_by_std`` is also passed under both SkyRL
    spellings); keywords it does not accept are left out unless it takes ``**kwargs``.

    Masking: SkyRL-Train never checks the padding, and some user estimators leave non-zero values
    there (e.g. a whitening over the whole ``[B, T]`` tensor). Their outputs are set to 0 wherever
    ``response_mask`` is 0 (NaN/inf there too); on valid tokens they are kept exactly.
    """

    __skyrl_kind__ = "advantage_estimator"

    def __init__(self, name: str, fn: Callable) -> None:
        self.name, self.fn = name, fn
        self.__doc__ = getattr(fn, "__doc__", None) or f"SkyRL-style advantage estimator {name!r} ({describe(fn)})."

    @torch.no_grad()
    def __call__(self, batch: AdvantageInput, **hyper: Any) -> AdvantageOutput:
        kwargs = dict(SKYRL_DEFAULTS)
        if "norm_by_std" in hyper:
            kwargs["grpo_norm_by_std"] = kwargs["norm_adv_by_std_in_grpo"] = hyper["norm_by_std"]
        kwargs.update(hyper)
        kwargs.update(
            token_level_rewards=batch.token_level_rewards.clone(),
            response_mask=batch.float_mask(),
            index=batch.group_ids.cpu().numpy(),
            values=None if batch.values is None else batch.values.clone(),
        )
        if batch.reward_baselines is not None:
            kwargs["reward_baselines"] = batch.reward_baselines.clone()
        if batch.extras:
            kwargs["extras"] = dict(batch.extras)
        adv, ret = pair(call_accepting(self.fn, (), kwargs), self.name)
        mask = batch.response_mask
        return AdvantageOutput(
            advantages=masked(adv, mask, "advantages", self.name), returns=masked(ret, mask, "returns", self.name)
        )

    def __repr__(self) -> str:
        return f"NativeFromSkyRL({self.name!r}, {describe(self.fn)})"


class AdvantageEstimator:
    """Base class of SkyRL-Train's class-based estimators (``skyrl_train.algorithms.advantage_estimators``).

    Subclass it and implement ``compute_advantages(rewards [B, T], values [B, T] | None,
    masks [B, T], **kwargs) -> advantages [B, T]``; ``kwargs`` carry ``index`` and every other
    keyword the trainer passes (``gamma``, ``lambd``, ...). Register the class (or an instance)
    with ``register_advantage_estimator(name, MyEstimator)``.

    Returns: a class-based estimator returns advantages only, so ``returns = advantages`` (as for
    SkyRL-Train's critic-free estimators: GRPO, RLOO). To return both, let ``compute_advantages``
    return the pair ``(advantages, returns)``. Outputs are zeroed wherever the mask is 0.

    An instance is itself a SkyRL-style estimator: ``est(token_level_rewards=..., response_mask=...,
    index=..., values=..., **kwargs) -> (advantages, returns)``. The class attributes ``GRPO``,
    ``GAE``, ... are the built-in names, as the members of SkyRL-Train's ``AdvantageEstimator`` enum.
    """

    GAE = "gae"
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce++"
    MAXRL = "maxrl"

    def compute_advantages(
        self, rewards: torch.Tensor, values: torch.Tensor | None, masks: torch.Tensor, **kwargs: Any
    ):
        """``[B, T]`` advantages (or the pair ``(advantages, returns)``); implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__}.compute_advantages: expected a subclass to implement it")

    @torch.no_grad()
    def __call__(self, token_level_rewards, response_mask, index=None, values=None, **kwargs: Any):
        result = self.compute_advantages(token_level_rewards, values, response_mask, index=index, **kwargs)
        adv, ret = pair(result, type(self).__name__)
        mask = response_mask.bool() if response_mask.dtype != torch.bool else response_mask
        name = type(self).__name__
        return masked(adv, mask, "advantages", name), masked(ret, mask, "returns", name)
