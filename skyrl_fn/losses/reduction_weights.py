"""Per-token weights that turn a masked *sum* into a loss reduction (SkyRL 0.3.0's convention).

Since early 2026 SkyRL-Train moves the loss reduction out of the policy loss: the advantages of
each mini-batch are multiplied by a weight ``w_{i,t}`` and the loss returns the masked sum
``sum_{i,t} m_{i,t} l_{i,t}``. For a loss that is positively homogeneous in the advantage (every
policy-gradient surrogate is), the sum over the scaled advantages *is* the reduced loss, and the
sums of the micro-batches add up to the mini-batch loss. This module computes ``w``.

Notation: ``B`` sequences (one mini-batch), ``T`` response tokens, ``m`` the loss mask,
``n_i = sum_t m_{i,t}``, ``P`` prompts.
"""

from __future__ import annotations

import torch

from skyrl_fn.core._checks import check_shape, check_tensor

__all__ = ["REDUCTIONS", "reduction_weights"]

#: The reductions :func:`reduction_weights` knows (SkyRL's ``loss_reduction`` names).
REDUCTIONS = ("token_mean", "token_mean_legacy", "sequence_mean", "seq_mean_token_sum_norm", "prompt_mean")


def reduction_weights(
    loss_mask: torch.Tensor,
    *,
    reduction: str = "token_mean",
    max_seq_len: int | None = None,
    micro_batch_size: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T]`` weights ``w`` with ``sum_{i,t} m w l`` = the reduction of the per-token loss ``l``::

        token_mean               w = 1 / max(sum_{i,t} m, 1)
        token_mean_legacy        w = 1 / (K * max(sum_{i in k, t} m, 1))  for row i in micro-batch k of
                                 K = B // micro_batch_size (rows past K * micro_batch_size: w = 0)
        sequence_mean            w_i = 1 / (B * max(n_i, 1))
        seq_mean_token_sum_norm  w = 1 / (B * max_seq_len)                (Dr. GRPO)
        prompt_mean              w_i = 1 / (P * max(sum_{j in p(i), t} m, 1))  (token mean within each
                                 prompt, then the mean over the P prompts present in group_ids)

    as SkyRL 0.3.0's ``apply_loss_reduction_to_advantages_minibatch`` (which divides the advantages
    by ``1 / w``). ``m`` may be soft (non-negative floats): the counts are then sums of weights, as
    SkyRL's. The weights do not depend on ``l``; they are constant over the tokens of a row.

    Args:
        loss_mask: ``[B, T]`` bool or non-negative floats.
        reduction: one of ``REDUCTIONS``.
        max_seq_len: ``seq_mean_token_sum_norm``'s constant (required for it).
        micro_batch_size: rows per micro-batch (required for ``token_mean_legacy``).
        group_ids: ``[B]`` int prompt id of each row (required for ``prompt_mean``); rows with a
            negative id belong to no prompt and get ``w = 0``.

    Returns:
        ``[B, T]`` weights in the mask's floating dtype (float32 for a bool mask).

    Raises:
        ValueError: unknown ``reduction`` (naming the choices), or a required argument missing or
            out of range.
    """
    check_tensor("loss_mask", loss_mask)
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask: expected shape [B, T], got {tuple(loss_mask.shape)}")
    m = loss_mask.to(loss_mask.dtype if loss_mask.dtype.is_floating_point else torch.float32)
    b = m.shape[0]
    if reduction == "token_mean":
        return torch.ones_like(m) / m.sum().clamp(min=1)
    if reduction == "sequence_mean":
        return torch.ones_like(m) / (b * m.sum(dim=-1, keepdim=True).clamp(min=1))
    if reduction == "seq_mean_token_sum_norm":
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len: expected a positive int for seq_mean_token_sum_norm, got {max_seq_len!r}")
        return torch.full_like(m, 1.0 / (b * max_seq_len))
    if reduction == "token_mean_legacy":
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size: expected a positive int for token_mean_legacy, got {micro_batch_size!r}")
        k = b // micro_batch_size
        w = torch.zeros_like(m)
        if k == 0:
            return w
        used = k * micro_batch_size
        counts = m[:used].reshape(k, micro_batch_size, -1).sum(dim=(1, 2)).clamp(min=1)  # [K]
        w[:used] = (1.0 / (k * counts)).repeat_interleave(micro_batch_size)[:, None]
        return w
    if reduction == "prompt_mean":
        if group_ids is None:
            raise ValueError("group_ids: expected a [B] tensor of prompt ids for prompt_mean, got None")
        check_tensor("group_ids", group_ids)
        check_shape("group_ids", group_ids, (b,), "[B]")
        ids = group_ids.to(device=m.device, dtype=torch.long)
        member = ids >= 0
        present = torch.unique(ids[member])
        if present.numel() == 0:
            return torch.zeros_like(m)
        dense = torch.searchsorted(present, ids.clamp(min=0))
        tokens = torch.zeros(present.numel(), dtype=m.dtype, device=m.device).index_add_(
            0, dense[member], m[member].sum(dim=-1)
        )
        row = 1.0 / (present.numel() * tokens.clamp(min=1)[dense])
        return torch.where(member, row, torch.zeros((), dtype=m.dtype, device=m.device))[:, None].expand_as(m).clone()
    raise ValueError(f"reduction: expected one of {list(REDUCTIONS)}, got {reduction!r}")
