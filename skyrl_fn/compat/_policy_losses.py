"""SkyRL's built-in policy losses in both eras, over the native losses of ``skyrl_fn.losses``.

Both eras call ``fn(log_probs, old_log_probs, advantages, config, loss_mask=None,
rollout_logprobs=None)`` with ``[B, T]`` tensors and a SkyRL config (dataclass, ``DictConfig``,
namespace or mapping; a missing field takes SkyRL's default). The per-token loss is the native
loss's ``token_loss``; what differs is the convention around it:

- SkyRL 0.3.0 (``skyrl_fn.compat``): the off-policy correction of ``config.off_policy_correction``
  (when ``rollout_logprobs`` are given; not for clip_cov, kl_cov, cross_entropy,
  importance_sampling, as SkyRL), then the masked *sum* ``reduce_loss``; returns
  ``(loss, {"clip_ratio": float, ...})``. The mean is in the advantages
  (``apply_loss_reduction_to_advantages_minibatch``).
- the skyrl_train seed era (``skyrl_fn.compat.skyrl_train``): ``use_tis`` /
  ``tis_imp_ratio_cap`` for regular / dual_clip, then the reduction ``config.loss_reduction``
  inside the loss; returns ``(loss, clip_ratio: float)``.

Notation: ``B`` sequences, ``T`` response tokens, ``m`` the loss mask.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import torch

from skyrl_fn import losses as native
from skyrl_fn.compat._calls import caller_names, config_value
from skyrl_fn.compat._functional import masked_mean, reduce_loss
from skyrl_fn.compat.off_policy_correction_utils import apply_off_policy_correction, off_policy_correction_enabled
from skyrl_fn.losses._common import safe_ratio
from skyrl_fn.core.records import PolicyLossInput

__all__ = [
    "PolicyLossType",
    "LOSSES_WITHOUT_OLD_LOGPROBS",
    "LOSSES_WITH_OLD_LOGPROBS",
    "config_field",
    "token_loss",
    "ppo_policy_loss",
    "sapo_policy_loss",
    "gspo_policy_loss",
    "compute_policy_loss_cispo",
    "rollout_is_policy_loss",
    "dppo_policy_loss",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_kl_cov",
    "cross_entropy_loss",
    "importance_sampling_loss",
    "SKYRL_LOSSES",
]


class PolicyLossType(enum.StrEnum):
    """SkyRL 0.3.0's built-in policy-loss names."""

    REGULAR = "regular"
    DUAL_CLIP = "dual_clip"
    GSPO = "gspo"
    CISPO = "cispo"
    ROLLOUT_IS = "rollout_is"
    CLIP_COV = "clip_cov"
    KL_COV = "kl_cov"
    SAPO = "sapo"
    CROSS_ENTROPY = "cross_entropy"
    IMPORTANCE_SAMPLING = "importance_sampling"
    DPPO = "dppo"


#: Losses that optimise against the rollout log-probs, so the "old" forward pass can be skipped
#: (``old_log_probs=None``) when no off-policy correction needs it.
LOSSES_WITHOUT_OLD_LOGPROBS = frozenset({PolicyLossType.ROLLOUT_IS, PolicyLossType.DPPO})
LOSSES_WITH_OLD_LOGPROBS = frozenset(set(PolicyLossType) - LOSSES_WITHOUT_OLD_LOGPROBS)

#: SkyRL defaults of the loss fields (``AlgorithmConfig``), used when a config lacks a field.
_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("eps_clip_low",): 0.2,
    ("eps_clip_high",): 0.2,
    ("clip_ratio_c",): 3.0,
    ("policy_loss_type",): "regular",
    ("loss_reduction",): "token_mean",
    ("sapo", "tau_pos"): 1.0,
    ("sapo", "tau_neg"): 1.05,
    ("cispo", "cispo_eps_clip_low"): 0.0,
    ("cispo", "cispo_eps_clip_high"): 5.0,
    ("clip_cov", "clip_ratio"): 0.0002,
    ("clip_cov", "clip_cov_lb"): 1.0,
    ("clip_cov", "clip_cov_ub"): 5.0,
    ("kl_cov", "kl_cov_frac"): 0.2,
    ("kl_cov", "ppo_kl_coef"): 1.0,
    ("dppo", "dppo_type"): "binary_tv",
    ("dppo", "delta_low"): 0.2,
    ("dppo", "delta_high"): 0.2,
    ("use_tis",): False,
    ("tis_imp_ratio_cap",): -1.0,
}


def config_field(config: Any, *path: str) -> Any:
    """``config.<path>``, or SkyRL's default when the config lacks it (None stays None for
    optional fields without a default here)."""
    value = config_value(config, path)
    return _DEFAULTS.get(path) if value is None else value


def _hyper(kind: str, config: Any) -> dict[str, Any]:
    """Native hyperparameters of ``kind`` read from SkyRL's config fields."""
    eps = {"eps_clip_low": config_field(config, "eps_clip_low"), "eps_clip_high": config_field(config, "eps_clip_high")}
    if kind in ("regular", "gspo", "rollout_is"):
        return eps
    if kind == "dual_clip":
        return {**eps, "clip_ratio_c": config_field(config, "clip_ratio_c")}
    if kind == "sapo":
        return {"tau_pos": config_field(config, "sapo", "tau_pos"), "tau_neg": config_field(config, "sapo", "tau_neg")}
    if kind == "cispo":
        return {
            "cispo_eps_clip_low": config_field(config, "cispo", "cispo_eps_clip_low"),
            "cispo_eps_clip_high": config_field(config, "cispo", "cispo_eps_clip_high"),
        }
    if kind == "clip_cov":
        # SkyRL draws the clipped tokens with the global RNG (torch.randperm); the native loss
        # takes an explicit seed, drawn here from the global RNG so torch.manual_seed still governs it.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return {
            **eps,
            "clip_cov_ratio": config_field(config, "clip_cov", "clip_ratio"),
            "clip_cov_lb": config_field(config, "clip_cov", "clip_cov_lb"),
            "clip_cov_ub": config_field(config, "clip_cov", "clip_cov_ub"),
            "clip_cov_seed": seed,
        }
    if kind == "kl_cov":
        return {"kl_cov_frac": config_field(config, "kl_cov", "kl_cov_frac"), "ppo_kl_coef": config_field(config, "kl_cov", "ppo_kl_coef")}
    return {}


_NATIVE: dict[str, Callable] = {
    "regular": native.regular,
    "dual_clip": native.dual_clip,
    "gspo": native.gspo,
    "sapo": native.sapo,
    "cispo": native.cispo,
    "rollout_is": native.rollout_is,
    "clip_cov": native.clip_cov,
    "kl_cov": native.kl_cov,
    "cross_entropy": native.cross_entropy,
    "importance_sampling": native.importance_sampling,
}
#: SkyRL's clip_ratio metric is 0.0 for these (no clipping).
_NO_CLIP = frozenset({"sapo", "kl_cov", "cross_entropy"})


def _mask(log_probs: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(log_probs) if loss_mask is None else loss_mask


def token_loss(
    kind: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    config: Any,
    loss_mask: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``([B, T] per-token loss, {"clip_ratio": float, ...})`` of SkyRL's loss ``kind``, before any
    off-policy correction and reduction. ``dppo`` is SkyRL's surrogate ``-r A keep`` with
    ``r = exp(log_probs - mu)`` (gradient through ``r``) and the native ``dppo_mask``; every other
    kind is the native loss of the same name with SkyRL's config fields as hyperparameters."""
    mask = _mask(log_probs, loss_mask)
    valid = mask != 0
    if old_log_probs is None:
        if kind not in LOSSES_WITHOUT_OLD_LOGPROBS or rollout_logprobs is None:
            raise ValueError(
                f"old_log_probs: policy loss {kind!r} expected a [B, T] tensor (only "
                f"{sorted(LOSSES_WITHOUT_OLD_LOGPROBS)} run on rollout_logprobs alone), got None"
            )
        old_log_probs = rollout_logprobs
    if kind == "rollout_is" and rollout_logprobs is None:
        raise ValueError("rollout_logprobs: rollout_is expected a [B, T] tensor of rollout log-probs, got None")
    if kind == "dppo":
        dppo_type = config_field(config, "dppo", "dppo_type")
        divergence = {"binary_tv": "tv", "binary_kl": "kl"}.get(dppo_type)
        if divergence is None:
            raise ValueError(f"dppo.dppo_type: Unknown DPPO type: {dppo_type!r}. Must be 'binary_tv' or 'binary_kl'.")
        mu = rollout_logprobs if rollout_logprobs is not None else old_log_probs
        keep = native.dppo_mask(
            log_probs, mu, advantages, divergence=divergence,
            delta_low=config_field(config, "dppo", "delta_low"), delta_high=config_field(config, "dppo", "delta_high"),
        )
        ratio = safe_ratio((log_probs - mu).float()).to(log_probs.dtype)
        loss = -(ratio * advantages * keep.to(advantages.dtype))
        return loss, {"clip_ratio": masked_mean((~keep).float(), mask).item()}
    fn = _NATIVE.get(kind)
    if fn is None:
        raise ValueError(f"policy_loss_type: unknown policy loss {kind!r}; expected one of {sorted(_NATIVE) + ['dppo']}")
    with caller_names({"rollout_log_probs": "rollout_logprobs"}):
        batch = PolicyLossInput(
            log_probs=log_probs,
            old_log_probs=old_log_probs,
            advantages=advantages,
            loss_mask=valid,
            rollout_log_probs=rollout_logprobs,
        )
        out = fn(batch, **_hyper(kind, config))
    if kind == "importance_sampling":
        ratio = torch.exp(log_probs - old_log_probs).detach()
        return out.token_loss, {"importance_ratio": masked_mean(ratio, loss_mask).item()}
    clip = 0.0 if kind in _NO_CLIP else float(out.metrics["clip_ratio"])
    return out.token_loss, {"clip_ratio": clip}


# -- SkyRL 0.3.0 ---------------------------------------------------------------------------------
#: Losses SkyRL 0.3.0 runs through ``apply_off_policy_correction``.
_CORRECTED = frozenset({"regular", "dual_clip", "sapo", "gspo", "cispo", "rollout_is", "dppo"})


def _loss_030(kind: str, log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
    loss, metrics = token_loss(kind, log_probs, old_log_probs, advantages, config, loss_mask, rollout_logprobs)
    correction = config_value(config, ("off_policy_correction",))
    if kind in _CORRECTED and correction is not None and rollout_logprobs is not None:
        if old_log_probs is None and off_policy_correction_enabled(correction):
            raise ValueError(
                "old_log_probs: expected a [B, T] tensor when off_policy_correction is enabled "
                "(the correction compares old and rollout log-probs), got None"
            )
        loss, loss_mask, extra = apply_off_policy_correction(
            loss, old_log_probs, rollout_logprobs, _mask(log_probs, loss_mask), correction
        )
        metrics.update(extra)
    return reduce_loss(loss, loss_mask), metrics


def _named(kind: str, doc: str) -> Callable:
    def loss_fn(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
        return _loss_030(kind, log_probs, old_log_probs, advantages, config, loss_mask, rollout_logprobs)

    loss_fn.__doc__ = doc
    return loss_fn


def ppo_policy_loss(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
    """PPO clip (``config.policy_loss_type="regular"``) or dual-clip (``"dual_clip"``, with
    ``clip_ratio_c``); native ``regular`` / ``dual_clip``. Reads ``eps_clip_low/high``,
    ``clip_ratio_c``, ``off_policy_correction``. Returns ``(masked sum [], {"clip_ratio", ...})``.

    Raises:
        ValueError: ``policy_loss_type`` is neither (SkyRL asserts).
    """
    kind = config_field(config, "policy_loss_type")
    if kind not in ("regular", "dual_clip"):
        raise ValueError(f"policy_loss_type: loss_type must be either 'regular' or 'dual_clip', got {kind!r}")
    return _loss_030(kind, log_probs, old_log_probs, advantages, config, loss_mask, rollout_logprobs)


sapo_policy_loss = _named("sapo", "SAPO (native ``sapo``; ``sapo.tau_pos/tau_neg``), off-policy corrected, masked sum; clip_ratio 0.0.")
gspo_policy_loss = _named("gspo", "GSPO-token (native ``gspo``; ``eps_clip_low/high``), off-policy corrected, masked sum.")
compute_policy_loss_cispo = _named("cispo", "CISPO (native ``cispo``; ``cispo.cispo_eps_clip_low/high``), off-policy corrected, masked sum.")
rollout_is_policy_loss = _named(
    "rollout_is",
    "Rollout-IS policy gradient against ``rollout_logprobs`` (native ``rollout_is``; ``eps_clip_low/high``); "
    "``old_log_probs`` may be None when no off-policy correction is enabled. Masked sum.",
)
dppo_policy_loss = _named(
    "dppo",
    "DPPO-Binary (``dppo.dppo_type`` binary_tv / binary_kl, ``dppo.delta_low/high``): ``-r A keep`` with "
    "``r = exp(log_probs - mu)``, ``mu`` = ``rollout_logprobs`` if given else ``old_log_probs`` (which may then "
    "be None), ``keep`` from the native ``dppo_mask``. Off-policy corrected, masked sum.",
)
compute_policy_loss_clip_cov = _named(
    "clip_cov",
    "Clip-Cov (native ``clip_cov``; ``clip_cov.clip_ratio/clip_cov_lb/clip_cov_ub``, ``eps_clip_low/high``; "
    "the random draw is seeded from the global RNG). Masked sum, no off-policy correction (as SkyRL).",
)
compute_policy_loss_kl_cov = _named(
    "kl_cov", "KL-Cov (native ``kl_cov``; ``kl_cov.kl_cov_frac/ppo_kl_coef``). Masked sum; clip_ratio 0.0."
)
cross_entropy_loss = _named("cross_entropy", "SFT negative log-likelihood ``-log_probs`` (native ``cross_entropy``). Masked sum.")
importance_sampling_loss = _named(
    "importance_sampling",
    "``-exp(log_probs - old_log_probs) A`` (native ``importance_sampling``). Masked sum; metrics "
    "``{'importance_ratio': masked mean ratio}``.",
)
for _fn, _name in (
    (sapo_policy_loss, "sapo_policy_loss"), (gspo_policy_loss, "gspo_policy_loss"),
    (compute_policy_loss_cispo, "compute_policy_loss_cispo"), (rollout_is_policy_loss, "rollout_is_policy_loss"),
    (dppo_policy_loss, "dppo_policy_loss"), (compute_policy_loss_clip_cov, "compute_policy_loss_clip_cov"),
    (compute_policy_loss_kl_cov, "compute_policy_loss_kl_cov"), (cross_entropy_loss, "cross_entropy_loss"),
    (importance_sampling_loss, "importance_sampling_loss"),
):
    _fn.__name__ = _fn.__qualname__ = _name

#: SkyRL 0.3.0's built-in name -> its function here.
SKYRL_LOSSES: dict[str, Callable] = {
    "regular": ppo_policy_loss,
    "dual_clip": ppo_policy_loss,
    "gspo": gspo_policy_loss,
    "cispo": compute_policy_loss_cispo,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "sapo": sapo_policy_loss,
    "cross_entropy": cross_entropy_loss,
    "importance_sampling": importance_sampling_loss,
    "dppo": dppo_policy_loss,
    "rollout_is": rollout_is_policy_loss,
}
