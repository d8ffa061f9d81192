"""The skyrl_train seed era's policy losses (``skyrl_train.utils.ppo_utils``, early 2026): the
reduction is inside the loss and the second result is a float clip ratio.

``fn(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None) ->
(loss [], clip_ratio: float)``, the per-token loss of ``_policy_losses.token_loss`` reduced by
``config.loss_reduction`` (``reduce_loss`` below). ``regular`` / ``dual_clip`` also honour the
seed's ``use_tis`` / ``tis_imp_ratio_cap`` (token TIS against ``rollout_logprobs``). Notation:
``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

from skyrl_fn.compat._calls import caller_names
from skyrl_fn.compat._policy_losses import config_field, token_loss
from skyrl_fn.losses import aggregation, tis_weights

__all__ = ["reduce_loss", "SEED_LOSSES", "SEED_LOSS_NAMES", "SEED_REDUCTIONS"]

#: The seed's ``loss_reduction`` names -> native aggregation.
SEED_REDUCTIONS: dict[str, Callable] = {
    "token_mean": aggregation.token_mean,
    "sequence_mean": aggregation.seq_mean_token_mean,
    "seq_mean_token_sum_norm": aggregation.seq_mean_token_sum_norm,
}


def _binary(loss: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    if loss_mask.dtype != torch.bool and bool(((loss_mask != 0) & (loss_mask != 1)).any()):
        raise ValueError("loss_mask: expected 0/1 values for a loss reduction, got soft weights")
    return loss_mask != 0


def reduce_loss(
    loss: torch.Tensor, loss_mask: torch.Tensor | None, loss_reduction: str, max_seq_len: int | None = None
) -> torch.Tensor:
    """The seed's reduction of a ``[B, T]`` per-token loss to a scalar (native aggregations)::

        token_mean               sum(l m) / max(sum(m), 1)              (aggregation.token_mean)
        sequence_mean            mean_i(sum_t l m / max(n_i, 1))        (aggregation.seq_mean_token_mean)
        seq_mean_token_sum_norm  mean_i(sum_t l m) / max_seq_len        (aggregation.seq_mean_token_sum_norm)

    ``loss_mask=None`` counts every token.

    Raises:
        ValueError: unknown ``loss_reduction`` ("Invalid loss reduction type"), no ``max_seq_len``
            for ``seq_mean_token_sum_norm``, or a soft (non 0/1) mask.
    """
    fn = SEED_REDUCTIONS.get(loss_reduction)
    if fn is None:
        raise ValueError(f"Invalid loss reduction type: {loss_reduction!r}; expected one of {list(SEED_REDUCTIONS)}")
    if loss_reduction == "seq_mean_token_sum_norm" and max_seq_len is None:
        raise ValueError("max_seq_len: max_seq_len must be provided for seq_mean_token_sum_norm loss reduction, got None")
    return fn(loss, _binary(loss, loss_mask), max_seq_len=max_seq_len)


def _seed(kind: str) -> Callable:
    def loss_fn(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
        if kind == "regular":  # ppo_policy_loss serves both names and reads policy_loss_type
            name = config_field(config, "policy_loss_type")
            if name not in ("regular", "dual_clip"):
                raise ValueError(f"policy_loss_type: loss_type must be either 'regular' or 'dual_clip', got {name!r}")
            reduction = config_field(config, "loss_reduction")
            if reduction not in SEED_REDUCTIONS:
                raise ValueError(
                    f"loss_reduction: loss_reduction must be either 'token_mean', 'sequence_mean', or "
                    f"'seq_mean_token_sum_norm', got {reduction!r}"
                )
        else:
            name = kind
        loss, metrics = token_loss(name, log_probs, old_log_probs, advantages, config, loss_mask, rollout_logprobs)
        if kind == "regular" and config_field(config, "use_tis"):
            if rollout_logprobs is None:
                raise ValueError("rollout_logprobs: expected a [B, T] tensor with use_tis=True, got None")
            with caller_names({"rollout_log_probs": "rollout_logprobs", "cap": "tis_imp_ratio_cap"}):
                w, _ = tis_weights(old_log_probs, rollout_logprobs, _binary(loss, loss_mask), level="token", cap=config_field(config, "tis_imp_ratio_cap"))
            loss = loss * w
        max_seq_len = config_field(config, "max_seq_len")
        return reduce_loss(loss, loss_mask, config_field(config, "loss_reduction"), max_seq_len), metrics["clip_ratio"]

    return loss_fn


ppo_policy_loss = _seed("regular")
sapo_policy_loss = _seed("sapo")
gspo_policy_loss = _seed("gspo")
compute_policy_loss_cispo = _seed("cispo")
compute_policy_loss_clip_cov = _seed("clip_cov")
compute_policy_loss_kl_cov = _seed("kl_cov")

#: The seed's built-in name -> its function here.
SEED_LOSSES: dict[str, Callable] = {
    "regular": ppo_policy_loss,
    "dual_clip": ppo_policy_loss,
    "gspo": gspo_policy_loss,
    "cispo": compute_policy_loss_cispo,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "sapo": sapo_policy_loss,
}
SEED_LOSS_NAMES = frozenset(SEED_LOSSES)
for _name, _fn in (
    ("ppo_policy_loss", ppo_policy_loss), ("sapo_policy_loss", sapo_policy_loss), ("gspo_policy_loss", gspo_policy_loss),
    ("compute_policy_loss_cispo", compute_policy_loss_cispo), ("compute_policy_loss_clip_cov", compute_policy_loss_clip_cov),
    ("compute_policy_loss_kl_cov", compute_policy_loss_kl_cov),
):
    _fn.__name__ = _fn.__qualname__ = _name
    _fn.__doc__ = (
        f"The seed's ``{_name}``: ``(loss reduced by config.loss_reduction, clip_ratio float)``; see the module docstring."
    )
