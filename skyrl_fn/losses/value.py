"""Critic loss and entropy.

Notation: ``B`` sequences, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import torch

from skyrl_fn.core._checks import as_mask, check_finite, check_floating, check_shape
from skyrl_fn.losses._common import clean, masked_mean
from skyrl_fn.core.records import PolicyLossOutput

__all__ = ["value_loss", "entropy_from_logits"]


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    value_clip: float | None = 0.2,
) -> PolicyLossOutput:
    """Clipped value loss (PPO; as SkyRL-Train's ``ppo_critic_loss`` and verl's ``compute_value_loss``)::

        v_clip = old_values + clamp(values - old_values, -value_clip, value_clip)
        loss_t = 0.5 * max((values - R)^2, (v_clip - R)^2) * m_t
        loss_t = 0.5 * (values - R)^2 * m_t                       (value_clip=None)

    Returns the *per-token* loss: reduce it with any aggregation (SkyRL uses ``sequence_mean``,
    i.e. ``seq_mean_token_mean``; verl ``token_mean``), micro-batch-exact like the policy losses.
    Default ``value_clip = 0.2`` as SkyRL-Train (``algorithm.value_clip``).

    Args:
        values: ``[B, T]`` critic predictions (carry the gradient).
        old_values: ``[B, T]`` predictions at rollout time.
        returns: ``[B, T]`` targets ``R``.
        loss_mask: ``[B, T]`` bool (0/1 numeric accepted).
        value_clip: clip range >= 0, or None for the unclipped loss.

    Returns:
        ``PolicyLossOutput`` (the record is just "per-token loss + metrics"): ``token_loss [B, T]``;
        metrics ``vf_clip_frac`` (tokens where the clipped term is larger), ``value_mean``,
        ``value_error`` (mean ``|values - R|``).
    """
    check_floating("values", values)
    if values.dim() != 2:
        raise ValueError(f"values: expected shape [B, T], got {tuple(values.shape)}")
    shape = tuple(values.shape)
    for name, x in (("old_values", old_values), ("returns", returns)):
        check_floating(name, x)
        check_shape(name, x, shape, "[B, T] (as values)")
    m = as_mask("loss_mask", loss_mask, shape)
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_finite(name, x.detach(), m)
    if value_clip is not None and (isinstance(value_clip, bool) or not isinstance(value_clip, (int, float)) or not value_clip >= 0):
        raise ValueError(f"value_clip: expected a number >= 0 or None, got {value_clip!r}")
    v, old, ret = clean(values, m), clean(old_values, m), clean(returns, m)
    unclipped = (v - ret).square()
    if value_clip is None:
        loss = unclipped
        frac = torch.zeros((), dtype=v.dtype, device=v.device)
    else:
        v_clip = old + torch.clamp(v - old, -value_clip, value_clip)
        clipped = (v_clip - ret).square()
        loss = torch.maximum(unclipped, clipped)
        frac = masked_mean((clipped > unclipped).to(v.dtype).detach(), m)
    metrics = {
        "vf_clip_frac": frac,
        "value_mean": masked_mean(v.detach(), m),
        "value_error": masked_mean((v - ret).detach().abs(), m),
    }
    return PolicyLossOutput(token_loss=clean(0.5 * loss, m), metrics=metrics)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution, per position::

        H = logsumexp(z) - sum_v softmax(z)_v z_v

    Computed in the logits' dtype (pass float32 logits for bf16 models); differentiable (entropy
    bonus: subtract ``coef * aggregate(H, mask)`` from the loss, SkyRL's ``entropy_loss_coef``).
    For memory-light entropy from hidden states see ``skyrl_fn.ops.logprobs``.

    Args:
        logits: ``[..., V]`` floating, e.g. ``[B, T, V]``.

    Returns:
        ``[...]``, e.g. ``[B, T]``.
    """
    check_floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    # -inf logits (masked vocabulary) have probability 0 and contribute 0, not 0 * -inf = NaN.
    finite = torch.where(torch.isfinite(logits), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return lse - (probs * finite).sum(dim=-1)
