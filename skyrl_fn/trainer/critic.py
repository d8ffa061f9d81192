"""The critic's training step: the PPO clipped value loss over the whole batch's tokens and one
optimiser step per update epoch, in-process, in the critic actor and on data-parallel ranks.

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import torch

from skyrl_fn.losses.aggregation import token_mean
from skyrl_fn.losses.value import value_loss as token_value_loss
from skyrl_fn.trainer.experience import Experience
from skyrl_fn.trainer.forward import response_values
from skyrl_fn.trainer.learner import TrainState, add_metric, masked_row
from skyrl_fn.trainer.micro_batches import length_order, micro_batch_bounds, micro_batch_overhead
from skyrl_fn.trainer.nonfinite import step_if_finite
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.sharding import Collectives

__all__ = ["value_loss", "critic_update"]


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip: float, global_tokens: torch.Tensor
) -> torch.Tensor:
    """PPO clipped value loss, summed over tokens and divided by the global token count::

        v_c = old + clip(v - old, -c, c);   L = 0.5 * sum_t max((v - R)^2, (v_c - R)^2) m_t / N

    (the per-token loss is ``skyrl_fn.losses.value_loss``; the sum over micro-batches is the
    full-batch loss).

    Args:
        values, old_values, returns: ``[B, T]``.
        mask: ``[B, T]`` bool.
        clip: ``c`` (<= 0 disables clipping).
        global_tokens: ``N``, the token count of the whole batch.
    """

    out = token_value_loss(values, old_values, returns, mask, value_clip=clip if clip > 0 else None)
    return token_mean(out.token_loss, mask, global_tokens=global_tokens)


def critic_update(
    run: ResolvedRun, state: TrainState, exp: Experience, *, dp: Collectives | None = None, filler: Experience | None = None
) -> dict[str, float]:
    """One optimiser step of the critic per update epoch on the clipped value loss (accumulated
    over micro-batches with the global token count), grad-norm clipped. Returns
    ``value_loss``, ``critic_grad_norm``, ``critic_lr``.

    ``dp``, ``filler``: a data-parallel (FSDP2) critic update on this rank's share ``exp``, as in
    :func:`policy_update`: the token count is all-reduced, every rank runs as many micro-batches
    as the rank with the most (``filler``: a fully masked row), a non-finite loss on any rank
    skips the step on all, the metrics are summed over ranks.

    As in :func:`policy_update`, the micro-batches are cut from the rows ordered by response
    length (``skyrl_fn.trainer.micro_batches``); the loss and gradient change by float rounding
    only."""
    if exp.values is None:
        raise ValueError("exp.values: expected [B, T] old critic values for the critic update, got None")
    a, tr = run.config.algorithm, run.config.trainer
    model, opt = state.model, state.optimizer
    model.train()
    exp = exp.rows(length_order(exp.response_mask))  # micro-batches of rows of similar lengths
    b, t = exp.batch_size, exp.response_len
    bounds = micro_batch_bounds(exp.attention_mask, t, tr.micro_batch_size, overhead=micro_batch_overhead(model))
    n_mb = len(bounds)
    tokens, _, n_all = dp.batch_counts(exp.response_mask.sum(), b, n_mb) if dp else (exp.response_mask.sum(), b, n_mb)
    global_tokens = torch.as_tensor(tokens).clamp(min=1).float()
    filler = filler if filler is not None else (masked_row(exp) if b else None)
    bounds += [(b, b)] * (n_all - n_mb)  # (b, b): the filler
    sums: dict[str, float] = {"value_loss": 0.0}
    for epoch in range(a.update_epochs):
        opt.zero_grad(set_to_none=True)
        finite = True
        for i, (s, e) in enumerate(bounds):
            mb = exp.slice(s, e) if s < b else filler
            v = response_values(model, mb.input_ids, mb.attention_mask, t).float()
            loss = value_loss(v, mb.values, mb.returns, mb.response_mask, clip=a.value_clip, global_tokens=global_tokens)
            finite = finite and bool(torch.isfinite(loss))
            if not finite and not dp:
                break
            if dp:  # every rank makes the same calls
                dp.accumulate(model, last=i == len(bounds) - 1)
            loss.backward()
            if finite:
                add_metric(sums, "value_loss", loss.detach(), 1.0)
        if dp:
            finite = dp.all_true(finite)
        grad_norm, ok = step_if_finite(model, opt, max_norm=tr.grad_clip, loss_finite=finite)
        if not ok:  # the critic keeps its weights; the policy step is reported on its own
            return {"critic_skipped": 1.0, "critic_grad_norm": float(grad_norm)}
        add_metric(sums, "critic_grad_norm", grad_norm / (dp.world_size if dp else 1), 1.0)
    if dp:
        sums = dp.sum_metrics(sums)
    out = {k: v / a.update_epochs for k, v in sums.items()}
    out["critic_lr"] = float(opt.param_groups[0]["lr"])
    state.scheduler.step()
    return out
