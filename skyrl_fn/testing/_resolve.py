"""What the kit tests: a native function, a SkyRL-style keyword function or a registered name.

Every target becomes a native call ``fn(record, **hyper)`` plus the properties it promises. The
call style is detected from the signature:

- advantage estimator, SkyRL style: a parameter named ``token_level_rewards``, or only ``**kwargs``
  (``fn(token_level_rewards, response_mask, index, **kw) -> (advantages, returns)``);
- policy loss, SkyRL style: the first parameter is ``log_probs`` (``fn(log_probs, old_log_probs,
  advantages, config, loss_mask) -> (loss, clip_ratio)``);
- anything else is native. A façade callable returned by ``skyrl_fn.compat``'s registries for a
  table entry is unwrapped to that entry (so its promises apply).

The SkyRL adapters here are deliberately thin (unlike the compat façade, which protects a training
run): the user's function sees the record's own ``token_level_rewards`` / ``log_probs`` tensors and
its outputs are *not* masked, so the kit sees in-place edits and padding leaks as they are.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import attrs
import torch

from skyrl_fn.compat._calls import call_accepting
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput, PolicyLossInput, PolicyLossOutput
from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.core.table import AlgorithmTable, Entry, infer_kind

__all__ = ["Target", "resolve", "SKYRL_ESTIMATOR_DEFAULTS", "SKYRL_LOSS_CONFIG"]

#: What SkyRL-Train's trainer passes to every estimator besides the tensors.
SKYRL_ESTIMATOR_DEFAULTS: Mapping[str, Any] = {"gamma": 1.0, "lambd": 1.0, "grpo_norm_by_std": True}
#: The SkyRL-Train algorithm config fields a SkyRL-style loss gets (hyperparameters override them).
SKYRL_LOSS_CONFIG: Mapping[str, Any] = {
    "eps_clip_low": 0.2,
    "eps_clip_high": 0.2,
    "clip_ratio_c": 3.0,
    "loss_reduction": "token_mean",
    "max_seq_len": None,
    "policy_loss_type": "custom",
}


@attrs.frozen
class Target:
    """A function to check, as a native call.

    Attributes:
        label: how messages name it.
        kind: ``advantage_estimator``, ``policy_loss``, ``aggregation`` or ``kl_estimator``.
        fn: native ``fn(record, **hyper)`` (or ``fn(token_loss, loss_mask, **hyper)``,
            ``fn(log_probs, ref_log_probs, **hyper)``).
        promises: the properties it promises (from the table entry; empty otherwise).
        style: ``"native"``, ``"skyrl"`` or ``"table"``.
    """

    label: str
    kind: str
    fn: Callable = attrs.field(eq=False)
    promises: frozenset[str] = frozenset()
    style: str = "native"


def _params(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _positional(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def is_skyrl_style(fn: Callable, kind: str) -> bool:
    """True if ``fn`` speaks SkyRL-Train's keyword style for ``kind`` (see the module docstring)."""
    if infer_kind(fn) == kind or kind not in _ADAPTERS:  # aggregations and KL estimators: native only
        return False
    params = _params(fn)
    if params is None:
        return False
    names = [p.name for p in params]
    positional = _positional(params)
    if kind == "advantage_estimator":
        if "token_level_rewards" in names:
            return True
        return not positional and any(p.kind == p.VAR_KEYWORD for p in params)
    return bool(positional) and positional[0].name == "log_probs"


def _describe(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return name


class SkyRLEstimator:
    """A SkyRL-style estimator called natively: ``fn(batch: AdvantageInput, **hyper) -> AdvantageOutput``.

    It receives ``token_level_rewards`` (the record's tensor, not a copy), ``response_mask`` as 0/1
    in the rewards' dtype, ``index`` (the dense group ids as a numpy int64 array ``[B]``),
    ``values`` and ``reward_baselines``, ``SKYRL_ESTIMATOR_DEFAULTS`` and the hyperparameters.
    A lone tensor result means ``returns = advantages``.
    """

    __skyrl_kind__ = "advantage_estimator"

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, batch: AdvantageInput, **hyper: Any) -> AdvantageOutput:
        kwargs = dict(SKYRL_ESTIMATOR_DEFAULTS, **hyper)
        kwargs.update(
            token_level_rewards=batch.token_level_rewards,
            response_mask=batch.float_mask(),
            index=batch.group_ids.cpu().numpy(),
            values=batch.values,
        )
        if batch.reward_baselines is not None:
            kwargs["reward_baselines"] = batch.reward_baselines
        result = call_accepting(self.fn, (), kwargs)
        if isinstance(result, torch.Tensor):
            result = (result, result)
        if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(x, torch.Tensor) for x in result)):
            raise TypeError(f"{_describe(self.fn)}: expected (advantages, returns) tensors [B, T], got {type(result).__name__}")
        return AdvantageOutput(advantages=result[0], returns=result[1])


class _Config(dict):
    """A SkyRL-style config: attribute and mapping access; a missing field reads as None."""

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return self.get(key)


class SkyRLPolicyLossAdapter:
    """A SkyRL-style policy loss called natively: ``fn(batch: PolicyLossInput, **hyper) -> PolicyLossOutput``.

    The SkyRL function returns a loss already reduced to a scalar ``L``; the per-token loss is
    ``L * mask`` (so ``token_mean`` aggregation gives back ``L``). ``config`` holds
    ``SKYRL_LOSS_CONFIG`` updated with the hyperparameters (``max_seq_len`` defaults to ``T``);
    ``loss_mask`` is 0/1 in the log-probs' dtype.
    """

    __skyrl_kind__ = "policy_loss"

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, batch: PolicyLossInput, **hyper: Any) -> PolicyLossOutput:
        config = _Config(SKYRL_LOSS_CONFIG, **hyper)
        if config["max_seq_len"] is None:
            config["max_seq_len"] = batch.log_probs.shape[1]
        mask = batch.loss_mask.to(batch.log_probs.dtype)
        kwargs: dict[str, Any] = {"loss_mask": mask}
        if batch.rollout_log_probs is not None:
            kwargs["rollout_logprobs"] = batch.rollout_log_probs
        result = call_accepting(self.fn, (batch.log_probs, batch.old_log_probs, batch.advantages, config), kwargs)
        if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.Tensor)):
            raise TypeError(f"{_describe(self.fn)}: expected (loss tensor, clip_ratio), got {type(result).__name__}")
        loss, clip = result
        if loss.numel() != 1:
            raise ValueError(f"{_describe(self.fn)}: expected a scalar loss, got shape {tuple(loss.shape)}")
        metrics = {}
        if isinstance(clip, torch.Tensor) and clip.numel() == 1:
            metrics["clip_ratio"] = clip.detach().reshape(())
        elif isinstance(clip, (int, float)) and not isinstance(clip, bool):
            metrics["clip_ratio"] = torch.tensor(float(clip))
        return PolicyLossOutput(token_loss=loss.reshape(()) * mask, metrics=metrics)


_ADAPTERS = {"advantage_estimator": SkyRLEstimator, "policy_loss": SkyRLPolicyLossAdapter}


def _from_entry(entry: Entry, label: str | None = None) -> Target:
    return Target(label=label or f"{entry.name!r} ({entry.kind})", kind=entry.kind, fn=entry.fn, promises=entry.promises, style="table")


def resolve(target: Any, kind: str, table: AlgorithmTable | None = None) -> Target:
    """A ``Target`` for a registered name, a table ``Entry``, a compat façade callable, a native
    function or a SkyRL-style function of ``kind``.

    Raises:
        UnknownNameError: ``target`` is a name not registered under ``kind`` in ``table``.
        TypeError: ``target`` is neither a name nor a callable.
    """
    table = DEFAULT_TABLE if table is None else table
    if isinstance(target, str):
        return _from_entry(table.entry(kind, target))
    if isinstance(target, Entry):
        if target.kind != kind:
            raise ValueError(f"target: expected an entry of kind {kind!r}, got {target.kind!r} ({target.name!r})")
        return _from_entry(target)
    if not callable(target):
        raise TypeError(f"target: expected a registered name or a callable {kind}, got {type(target).__name__}")
    inner_table, inner_name = getattr(target, "table", None), getattr(target, "name", None)
    if isinstance(inner_table, AlgorithmTable) and isinstance(inner_name, str) and (kind, inner_name) in inner_table:
        return _from_entry(inner_table.entry(kind, inner_name), f"{inner_name!r} ({kind}, via the SkyRL façade)")
    label = f"{_describe(target)} ({kind})"
    if is_skyrl_style(target, kind):
        return Target(label=f"{_describe(target)} ({kind}, SkyRL style)", kind=kind, fn=_ADAPTERS[kind](target), style="skyrl")
    return Target(label=label, kind=kind, fn=target)
