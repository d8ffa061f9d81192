"""Policy losses across the two call styles.

SkyRL-Train calls ``fn(log_probs, old_log_probs, advantages, config, loss_mask=None,
rollout_logprobs=None) -> (loss, clip_ratio)``, the loss already reduced as ``config.loss_reduction``
says. Natively a loss is ``fn(batch: PolicyLossInput, **hyper) -> PolicyLossOutput(token_loss
[B, T], metrics)`` and the reduction is a separate ``aggregation`` entry of the table. The two
tables below are the whole mapping between SkyRL's config and native hyperparameters.
Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch

from skyrl_fn.compat._calls import LossConfig, call_accepting, config_value, describe
from skyrl_fn.compat._config import AlgorithmConfig
from skyrl_fn.compat.off_policy_correction_utils import apply_off_policy_correction, off_policy_correction_enabled
from skyrl_fn.losses.aggregation import SKYRL_REDUCTIONS
from skyrl_fn.losses.reduction_weights import reduction_weights
from skyrl_fn.core.records import PolicyLossInput, PolicyLossOutput
from skyrl_fn.core.table import AlgorithmTable, UnknownNameError, unknown_name_message

__all__ = [
    "CONFIG_FIELDS",
    "LOSS_REDUCTIONS",
    "SkyRLPolicyLoss",
    "SkyRLSumPolicyLoss",
    "NativeFromSkyRLLoss",
    "config_from_hyperparameters",
]

#: Native hyperparameter -> its field path in SkyRL-Train's algorithm config. A native
#: hyperparameter not listed here is read from the top-level config field of the same name.
CONFIG_FIELDS: Mapping[str, tuple[str, ...]] = {
    "eps_clip_low": ("eps_clip_low",),
    "eps_clip_high": ("eps_clip_high",),
    "clip_ratio_c": ("clip_ratio_c",),
    "tau_pos": ("sapo", "tau_pos"),
    "tau_neg": ("sapo", "tau_neg"),
    "cispo_eps_clip_low": ("cispo", "cispo_eps_clip_low"),
    "cispo_eps_clip_high": ("cispo", "cispo_eps_clip_high"),
    "clip_cov_ratio": ("clip_cov", "clip_ratio"),
    "clip_cov_lb": ("clip_cov", "clip_cov_lb"),
    "clip_cov_ub": ("clip_cov", "clip_cov_ub"),
    "kl_cov_frac": ("kl_cov", "kl_cov_frac"),
    "ppo_kl_coef": ("kl_cov", "ppo_kl_coef"),
    "max_seq_len": ("max_seq_len",),
}

#: SkyRL-Train ``loss_reduction`` -> native aggregation name (native names are accepted as well).
#: SkyRL-Train's ``loss_reduction`` names -> our aggregation names (one source: the losses package).
LOSS_REDUCTIONS: Mapping[str, str] = SKYRL_REDUCTIONS


def _from_config(config: Any, accepted: Mapping[str, Any] | None) -> dict[str, Any]:
    """Native hyperparameters read from a SkyRL-style config (absent fields keep native defaults)."""
    names = list(CONFIG_FIELDS) if accepted is None else list(accepted)
    out = {}
    for name in names:
        value = config_value(config, CONFIG_FIELDS.get(name, (name,)))
        if value is None and len(CONFIG_FIELDS.get(name, ())) > 1:
            value = config_value(config, (name,))  # a flat config spelling the native name
        if value is not None:
            out[name] = value
    return out


def config_from_hyperparameters(hyper: Mapping[str, Any], **fields: Any) -> LossConfig:
    """The inverse mapping: a SkyRL-style config carrying native hyperparameters at SkyRL's paths.

    ``{"tau_pos": 1.0, "eps_clip_low": 0.2}`` gives ``config.sapo.tau_pos`` and
    ``config.eps_clip_low``; ``fields`` are set at the top level (e.g. ``loss_reduction``).
    """
    data: dict[str, Any] = dict(fields)
    for name, value in hyper.items():
        path = CONFIG_FIELDS.get(name, (name,))
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return LossConfig(data)


def _aggregation(table: AlgorithmTable, config: Any) -> tuple[str, dict[str, Any]]:
    reduction = config_value(config, ("loss_reduction",)) or "token_mean"
    name = LOSS_REDUCTIONS.get(reduction, reduction)
    available = table.names("aggregation")
    if name not in available:
        choices = sorted(set(LOSS_REDUCTIONS) | set(available))
        raise UnknownNameError(f"config.loss_reduction: {unknown_name_message('loss reduction', reduction, choices)}")
    return name, _from_config(config, table.entry("aggregation", name).hyperparameters())


class _TableLoss:
    """A table's policy loss called the SkyRL way: holds the table and the name (so it pickles),
    named and documented as the entry."""

    def __init__(self, table: AlgorithmTable, name: str) -> None:
        entry = table.entry("policy_loss", name)
        self.table, self.name = table, name
        self.__name__ = self.__qualname__ = name
        self.__doc__ = entry.fn.__doc__


class SkyRLPolicyLoss(_TableLoss):
    """A native policy loss of a table, called as SkyRL-Train calls its policy losses.

    ``fn(log_probs [B, T], old_log_probs [B, T], advantages [B, T], config, loss_mask [B, T] | None,
    rollout_logprobs [B, T] | None, **ignored) -> (loss [], clip_ratio: float)``.

    Hyperparameters come from ``config`` through ``CONFIG_FIELDS`` (a missing or None field takes
    the native default); the per-token loss is reduced by the aggregation named by
    ``config.loss_reduction`` (``LOSS_REDUCTIONS``, default ``token_mean``; ``max_seq_len`` from
    the config). ``clip_ratio`` is ``float(metrics["clip_ratio"])``, 0.0 when the loss reports
    none (SkyRL-Train returns a Python float here, so this is the façade's one device sync).
    ``loss_mask=None`` trains on every token. Picklable (holds the table and the name).
    """

    def __call__(
        self, log_probs, old_log_probs, advantages, config=None, loss_mask=None, rollout_logprobs=None, **kwargs: Any
    ):
        if loss_mask is None:
            loss_mask = torch.ones(log_probs.shape, dtype=torch.bool, device=log_probs.device)
        batch = PolicyLossInput(
            log_probs=log_probs,
            old_log_probs=old_log_probs,
            advantages=advantages,
            loss_mask=loss_mask,
            rollout_log_probs=rollout_logprobs,
            ref_log_probs=kwargs.get("ref_log_probs"),
        )
        correction = config_value(config, ("off_policy_correction",))
        if correction is not None and rollout_logprobs is not None and off_policy_correction_enabled(correction):
            raise ValueError(
                f"config.off_policy_correction: the seed-era policy loss {self.name!r} cannot apply it (the "
                f"seed's losses predate it); call it through skyrl_fn.compat (SkyRL 0.3.0), or leave it unset"
            )
        entry = self.table.entry("policy_loss", self.name)
        out = entry.fn(batch, **_from_config(config, entry.hyperparameters()))
        if not isinstance(out, PolicyLossOutput):
            raise TypeError(
                f"policy loss {self.name!r}: expected it to return a PolicyLossOutput, got {type(out).__name__}"
            )
        agg_name, agg_hyper = _aggregation(self.table, config)
        loss = self.table.get("aggregation", agg_name)(out.token_loss, batch.loss_mask, **agg_hyper)
        clip = out.metrics.get("clip_ratio")
        return loss, 0.0 if clip is None else float(clip)

    def __repr__(self) -> str:
        return f"SkyRLPolicyLoss({self.name!r})"


class SkyRLSumPolicyLoss(_TableLoss):
    """A native policy loss of a table, called as SkyRL 0.3.0 calls its policy losses.

    ``fn(log_probs [B, T], old_log_probs [B, T], advantages [B, T], config, loss_mask [B, T] | None,
    rollout_logprobs [B, T] | None, **ignored) -> (loss [], {"clip_ratio": float})``: the native
    per-token loss (hyperparameters from ``config`` through ``CONFIG_FIELDS``), the off-policy
    correction of ``config.off_policy_correction`` when ``rollout_logprobs`` are given, then the
    masked sum (the reduction is in the advantages, as SkyRL 0.3.0). For the table's losses that
    SkyRL does not ship (e.g. ``reinforce``, ``gpg``, ``geo_mean``); picklable.
    """

    def __call__(
        self, log_probs, old_log_probs, advantages, config=None, loss_mask=None, rollout_logprobs=None, **kwargs: Any
    ):
        mask = torch.ones_like(log_probs) if loss_mask is None else loss_mask
        batch = PolicyLossInput(
            log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=mask != 0,
            rollout_log_probs=rollout_logprobs, ref_log_probs=kwargs.get("ref_log_probs"),
        )
        entry = self.table.entry("policy_loss", self.name)
        out = entry.fn(batch, **_from_config(config, entry.hyperparameters()))
        if not isinstance(out, PolicyLossOutput):
            raise TypeError(f"policy loss {self.name!r}: expected it to return a PolicyLossOutput, got {type(out).__name__}")
        loss, mask, metrics = apply_off_policy_correction(
            out.token_loss, old_log_probs, rollout_logprobs, mask, config_value(config, ("off_policy_correction",))
        )
        clip = out.metrics.get("clip_ratio")
        return (loss * mask).sum(), {"clip_ratio": 0.0 if clip is None else float(clip), **metrics}

    def __repr__(self) -> str:
        return f"SkyRLSumPolicyLoss({self.name!r})"


def _metric(key: str, value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics[{key!r}]: expected a scalar, got shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    raise TypeError(f"metrics[{key!r}]: expected a number or scalar tensor, got {type(value).__name__}")


#: Keyword hyperparameters of a wrapped SkyRL-style loss (``NativeFromSkyRLLoss``), with SkyRL's
#: own config defaults (``AlgorithmConfig``), so a SkyRL loss reading ``config.eps_clip_low`` gets
#: 0.2 unless ``--algorithm.loss.eps-clip-low`` says otherwise. Each one given (not None) becomes the
#: config field of that name (``CONFIG_FIELDS`` paths); ``loss_reduction`` is the launcher's
#: aggregation, told to the loss in SkyRL's vocabulary.
WRAPPED_LOSS_HYPERPARAMETERS: Mapping[str, Any] = {
    "config": None,
    "loss_reduction": "token_mean",
    **{k: config_value(AlgorithmConfig(), path) for k, path in CONFIG_FIELDS.items()},
}

#: Aggregation / loss_reduction names -> SkyRL's ``loss_reduction`` (what a SkyRL-style loss reads).
_SKYRL_REDUCTION = {
    "token_mean": "token_mean",
    "token_mean_legacy": "token_mean_legacy",
    "sequence_mean": "sequence_mean",
    "seq_mean_token_mean": "sequence_mean",
    "seq_mean_token_sum_norm": "seq_mean_token_sum_norm",
}


def skyrl_reduction(name: str, loss: str) -> str:
    """SkyRL's ``loss_reduction`` for an aggregation name (native names accepted).

    Raises:
        ValueError: a reduction a SkyRL-style loss cannot follow (``token_sum``,
            ``seq_mean_token_sum``, ``prompt_mean``: no per-prompt ids here), naming ``loss_reduction``.
    """
    out = _SKYRL_REDUCTION.get(name)
    if out is None:
        raise ValueError(
            f"loss_reduction: the SkyRL-style policy loss {loss!r} expected one of {sorted(_SKYRL_REDUCTION)}, got {name!r}"
        )
    return out


class NativeFromSkyRLLoss:
    """A SkyRL-style policy loss as a native one: ``fn(batch: PolicyLossInput, *, loss_reduction,
    eps_clip_low, ..., config) -> PolicyLossOutput`` (keywords: ``WRAPPED_LOSS_HYPERPARAMETERS``).

    The SkyRL function gets ``(log_probs, old_log_probs, advantages, config)`` with ``loss_mask``
    as 0/1 in the log-probs' dtype and ``rollout_logprobs`` (when the batch has them and the
    function accepts them). ``config`` is the ``config=`` hyperparameter if given (a plain dict
    becomes a ``LossConfig``), else ``config_from_hyperparameters`` of the hyperparameters given
    (``policy_loss_type`` = the name, ``loss_reduction`` in SkyRL's vocabulary, ``max_seq_len``
    default ``T``); a field not given is absent (reading it raises AttributeError naming it). The
    launcher passes its own ``loss_reduction``, ``eps_clip_low/high`` and ``clip_ratio_c``.

    Let ``w`` be the weights of the reduction over this batch (``skyrl_fn.losses.reduction_weights``:
    ``sum(l m w)`` is the reduced loss) and ``c = sum(m w)``. The seed era's contract
    (``presummed=False``): the function reduces by ``config.loss_reduction`` itself and returns
    ``S``. SkyRL 0.3.0's (``presummed=True``, losses registered through ``skyrl_fn.compat``): it
    receives the advantages times ``w`` and returns the masked *sum* ``S``. Either way ``token_loss
    = S / c * m``: every aggregation is ``sum(l m w)`` up to a constant factor, so the aggregation
    of the same name gives back ``S`` and its gradient on this batch, and exactly its share of the
    global loss under micro-batching. A ``[B, T]`` result is the per-token loss (zeroed off the
    mask; with ``presummed`` divided by ``w``, exact for a loss positively homogeneous in the
    advantage). The second result (a clip ratio, a metrics dict or None) becomes detached scalar
    metrics; a bare number is ``metrics["clip_ratio"]``.

    Raises:
        ValueError: a reduction a SkyRL-style loss cannot follow (see ``skyrl_reduction``).
    """

    __skyrl_kind__ = "policy_loss"

    def __init__(self, name: str, fn: Callable, *, presummed: bool = False) -> None:
        self.name, self.fn, self.presummed = name, fn, presummed
        self.__doc__ = getattr(fn, "__doc__", None) or f"SkyRL-style policy loss {name!r} ({describe(fn)})."
        # Advertised keyword hyperparameters (no **kwargs): the launcher passes its config fields of
        # these names (loss_reduction, eps_clip_*, clip_ratio_c), unknown policy_loss_kwargs are errors.
        params = [inspect.Parameter("batch", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=PolicyLossInput)]
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in WRAPPED_LOSS_HYPERPARAMETERS.items()]
        self.__signature__ = inspect.Signature(params, return_annotation=PolicyLossOutput)

    def __call__(self, batch: PolicyLossInput, **hyper: Any) -> PolicyLossOutput:
        config = hyper.pop("config", None)
        t = batch.log_probs.shape[1]
        if config is None:
            given = {k: v for k, v in {**WRAPPED_LOSS_HYPERPARAMETERS, **hyper}.items() if v is not None and k != "config"}
            reduction = skyrl_reduction(given.pop("loss_reduction", "token_mean"), self.name)
            given.setdefault("max_seq_len", t)
            config = config_from_hyperparameters(given, policy_loss_type=self.name, loss_reduction=reduction)
        else:
            if isinstance(config, dict):  # SkyRL code reads fields as attributes
                config = LossConfig(config)
            reduction = skyrl_reduction(config_value(config, ("loss_reduction",)) or "token_mean", self.name)
        mask = batch.loss_mask.to(batch.log_probs.dtype)
        kwargs: dict[str, Any] = {"loss_mask": mask}
        if batch.rollout_log_probs is not None:
            kwargs["rollout_logprobs"] = batch.rollout_log_probs
        w = reduction_weights(
            mask, reduction=reduction, max_seq_len=config_value(config, ("max_seq_len",)) or t, micro_batch_size=mask.shape[0]
        ).to(batch.advantages.dtype)
        scale = (mask * w).sum()  # the reduction of an all-ones loss: S / scale * m reduces back to S
        advantages = batch.advantages * w if self.presummed else batch.advantages
        result = call_accepting(self.fn, (batch.log_probs, batch.old_log_probs, advantages, config), kwargs)
        if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.Tensor)):
            raise TypeError(
                f"policy loss {self.name!r}: expected (loss tensor, clip_ratio or metrics), got {type(result).__name__}"
            )
        loss, second = result
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if loss.dim() == 0 or loss.numel() == 1:
            token_loss = torch.where(scale > 0, loss.reshape(()) / torch.where(scale > 0, scale, 1.0), zero) * mask
        elif tuple(loss.shape) == tuple(mask.shape) and self.presummed:
            # per-token results over scaled advantages: l(A w) = w l(A) for a loss homogeneous in A
            keep = batch.loss_mask & (w > 0)
            token_loss = torch.where(keep, loss / torch.where(keep, w, 1.0), zero)
        elif tuple(loss.shape) == tuple(mask.shape):
            token_loss = torch.where(batch.loss_mask, loss, zero)
        else:
            raise ValueError(
                f"policy loss {self.name!r}: expected a scalar or [B, T] = {tuple(mask.shape)} loss, "
                f"got {tuple(loss.shape)}"
            )
        if second is None:
            raw: Mapping[str, Any] = {}
        elif isinstance(second, Mapping):
            raw = {k: v for k, v in second.items() if v is not None}
        else:
            raw = {"clip_ratio": second}
        return PolicyLossOutput(token_loss=token_loss, metrics={k: _metric(k, v, mask) for k, v in raw.items()})

    def __repr__(self) -> str:
        era = ", presummed=True" if self.presummed else ""
        return f"NativeFromSkyRLLoss({self.name!r}, {describe(self.fn)}{era})"
