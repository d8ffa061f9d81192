"""The training step as composable pieces, usable in-process and inside Ray actors.

Every function takes its models, optimisers and the ``ResolvedRun`` explicitly; nothing reads a
global. The algorithm pieces are the callables bound once in ``run.algorithm``; no name is
looked up here.

Notation: ``P`` prompts, ``G`` samples per prompt, ``B = P * G`` sequences, ``Lp`` prompt tokens,
``T`` response tokens, ``L = Lp + T``, ``V`` vocabulary.

One step (see ``skyrl_fn.trainer.loop``)::

    rollout  = backend.generate(prompts, seed=...)                  # RolloutBatch
    scores   = task rewards                                         # [B]
    old_lp   = batched_log_probs(policy, rollout)   (or None: from the update's first pass)
    ref_lp   = batched_log_probs(reference, rollout)   (KL only)    # [B, T]
    values   = batched_values(critic, rollout)   (critic only)    # [B, T]
    exp, m   = make_experience(run, rollout, scores, old_log_probs=old_lp, ...)
    policy_update(run, policy_state, exp); critic_update(run, critic_state, exp)   (skyrl_fn.trainer.critic)
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch
from torch import nn

from skyrl_fn.ops.kernels import compile_kernel
from skyrl_fn.losses.aggregation import group_token_totals
from skyrl_fn.ops.compile import compile_loss
from skyrl_fn.losses.objective import SUMMED_METRICS
from skyrl_fn.core.records import PolicyLossInput, ReducedLoss
from skyrl_fn.trainer.fields import step_fields
from skyrl_fn.trainer.micro_batches import even_bounds, length_order, micro_batch_bounds, micro_batch_overhead
from skyrl_fn.trainer.run import ResolvedRun

# Re-exported: the learner's public surface is one import away (forward passes and experience
# live in their own modules).
from skyrl_fn.trainer.experience import (
    Experience,
    KLController,
    compute_advantages,
    kl_controller_of,
    make_experience,
    token_rewards,
)
from skyrl_fn.trainer.forward import batched_log_probs, batched_values, response_values, sequence_log_probs
from skyrl_fn.trainer.sharding import Collectives
from skyrl_fn.trainer.nonfinite import describe_rows, nonfinite_rows, reward_rows, skipped_metrics, step_if_finite

__all__ = [
    "TrainState", "Experience", "KLController", "kl_controller_of",
    "make_optimizer", "make_train_state", "sequence_log_probs", "batched_log_probs", "batched_values",
    "token_rewards", "compute_advantages", "make_experience", "loss_kernel", "policy_update",
    "masked_row", "add_metric", "response_values", "experience_and_update", "set_hyperparameters",
]


@attrs.frozen(kw_only=True, eq=False)
class TrainState:
    """A trainable module with its optimiser and LR schedule (the objects themselves mutate in
    ``policy_update``/``critic_update``; the holder does not).

    Attributes:
        model: the module (policy or critic).
        optimizer: ``torch.optim.AdamW`` over its parameters.
        scheduler: linear warm-up ``LambdaLR``, stepped once per training step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


#: Devices on which :func:`make_optimizer` uses torch's fused AdamW kernel.
_FUSED_ADAMW_DEVICES = frozenset({"cpu", "cuda"})


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and a linear warm-up ``lr * min(1, (k + 1) / warmup_steps)`` at optimiser step ``k``.

    AdamW runs torch's fused kernel (``fused=True``) when every parameter is on the CPU or a CUDA
    device: one kernel for all parameters instead of a Python loop of per-parameter ops, the same
    update within float rounding (1 ulp). On a data-parallel rank, whose parameters are FSDP2
    DTensor shards, the loop pays DTensor's dispatch on every op: measured at hidden 256 x 4 layers,
    a step takes 6.5 ms fused vs 40 ms looped (a whole plain model: 6 ms vs 18 ms).

    Args:
        model: whose trainable parameters are optimised.
        lr: peak learning rate (> 0).
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: steps of linear warm-up (0 = constant lr).
    """
    if lr <= 0:
        raise ValueError(f"lr: expected > 0, got {lr!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in _FUSED_ADAMW_DEVICES for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)
    w = max(int(warmup_steps), 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if w == 0 else min(1.0, (k + 1) / w))
    return opt, sched


def make_train_state(model: nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0) -> TrainState:
    """``TrainState`` of ``model`` with :func:`make_optimizer`."""
    opt, sched = make_optimizer(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
    return TrainState(model=model, optimizer=opt, scheduler=sched)


def set_hyperparameters(state: TrainState, *, lr: float, weight_decay: float) -> None:
    """Make ``state`` use ``lr`` and ``weight_decay`` from now on, keeping its schedule position
    and AdamW moments (after loading a checkpoint's optimiser and schedule, which carry the old
    values: a resume with a changed ``trainer.lr`` must not keep training at the old rate)."""
    sched = state.scheduler
    sched.base_lrs = [lr for _ in sched.base_lrs]
    for group, factor in zip(state.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
        group["lr"] = lr * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in state.optimizer.param_groups]


# -- losses and updates ----------------------------------------------------------------------


def loss_kernel(run: ResolvedRun, *, device_type: str = "cpu") -> Callable[..., ReducedLoss]:
    """The run's policy objective with every piece bound: ``run.algorithm.objective()``, a
    ``functools.partial`` of ``skyrl_fn.losses.policy_objective``, compiled when
    ``algorithm.compile`` (on ``device_type="cuda"`` with ``skyrl_fn.ops.kernels.compile_kernel`` in
    ``algorithm.compile_mode``, half-precision inputs upcast to float32 inside the graph)::

        kernel(PolicyLossInput, *, global_tokens, global_seqs, max_seq_len, entropy=None) -> ReducedLoss

    The objective receives the GLOBAL token and sequence counts of the whole batch, so the sum of
    the micro-batch losses is exactly the full-batch loss (and gradient accumulation gives the
    full-batch gradient).
    """
    a = run.config.algorithm
    kernel = run.algorithm.objective()
    if a.compile and device_type == "cuda":
        return compile_kernel(kernel, mode=a.compile_mode, device_type="cuda")
    if a.compile:
        return compile_loss(kernel)
    return kernel


def _prompt_totals(run: ResolvedRun, exp: Experience, filler: Experience | None, dp: Collectives | None) -> Callable[[int, int], dict[str, Any]]:
    """``fn(start, stop)``: the prompt keywords of rows ``[start, stop)`` for an aggregation over
    prompts (``prompt_mean``): each row's prompt, its prompt's valid tokens over the whole step and
    the step's prompt count, so micro-batches that split a prompt add up exactly; ``{}`` for every
    other aggregation. With ``dp`` the prompt count is summed over the ranks (each holds whole
    prompt groups, so its per-prompt token totals are already the whole step's); ``start >= B``:
    the keywords of the masked ``filler`` row."""
    if not run.algorithm.aggregation_takes_groups:
        return lambda start, stop: {}
    if exp.group_ids is None:
        raise ValueError(f"group_ids: expected the [B] prompt ids in the experience for aggregation {run.algorithm.names['aggregation']!r}, got None")
    tokens, groups = group_token_totals(exp.response_mask, exp.group_ids)
    if dp:
        groups = torch.tensor(dp.total(float(groups)), dtype=groups.dtype, device=groups.device)
    pad = None if filler is None else {"group_ids": filler.group_ids, "group_tokens": torch.ones_like(filler.group_ids), "global_groups": groups}

    def rows(start: int, stop: int) -> dict[str, Any]:
        if start >= exp.batch_size:
            return pad
        return {"group_ids": exp.group_ids[start:stop], "group_tokens": tokens[start:stop], "global_groups": groups}

    return rows


def policy_update(
    run: ResolvedRun,
    state: TrainState,
    exp: Experience,
    *,
    kernel: Callable | None = None,
    global_tokens: torch.Tensor | None = None,
    global_seqs: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    dp: Collectives | None = None,
    filler: Experience | None = None,
) -> dict[str, float]:
    """``algorithm.update_epochs`` optimiser steps on ``exp`` with gradient accumulation.

    Per micro-batch: the run's policy objective (``skyrl_fn.losses.policy_objective``: policy
    loss, off-policy correction, KL loss and entropy bonus, each aggregated with the global
    counts) is backpropagated; then the global gradient norm is clipped to ``trainer.grad_clip``
    and AdamW steps. The LR schedule steps once.

    The micro-batches are cut from ``exp``'s rows ordered by response length, longest first
    (``skyrl_fn.trainer.micro_batches``), so each forward pass runs on few padding columns —
    unless the policy loss or the aggregation does not promise ``microbatch_invariant``
    (``token_mean_legacy``, ``clip_cov``, ``kl_cov``: their loss depends on which rows share a
    micro-batch, so they keep the row order, SkyRL's). The
    order is the update's own: the normalisers count the whole batch, ``prompt_mean``'s
    per-prompt totals follow each row, the old log-probs taken from the first epoch are kept per
    micro-batch, and a skipped step names the caller's rows; the loss, gradient and metrics are
    those of the micro-batches in row order up to float rounding.

    Args:
        run: the resolved run.
        state: the policy's ``TrainState`` (mutated: parameters, optimiser and schedule).
        exp: the experience (the whole batch, or this worker's share of it).
        kernel: a prebuilt :func:`loss_kernel` (built per call when None; pass one to reuse a
            compiled kernel).
        global_tokens, global_seqs: the normalisers of the whole optimiser step when ``exp`` is
            a share of it (data-parallel); None: counted on ``exp``.
        scores: ``[B]`` rewards, named in the report of a skipped step.
        dp: the ranks of a data-parallel (FSDP2) update, ``exp`` being this rank's share
            (``skyrl_fn.trainer.sharding``). The token and sequence counts are all-reduced (the
            whole batch's normalisers); every rank runs as many micro-batches as the rank with
            the most (the extra ones fully masked: zero loss and gradient, but the same
            collectives); a non-finite loss on any rank skips the step on all; the metrics are
            summed over ranks with the whole batch's weights, so they are the whole batch's.
        filler: with ``dp``, a row whose response mask is all zero, run in place of the missing
            micro-batches (default: row 0 of ``exp`` masked; required when ``exp`` has no row,
            a rank left without a prompt group).

    Returns:
        metrics (python floats): loss, pg_loss, the loss's metrics, grad_norm, lr, kl_loss,
        entropy, ``skipped`` (0.0). A non-finite loss or gradient norm skips the step
        (``skyrl_fn.trainer.nonfinite``): the gradients are dropped, neither the optimiser nor the
        LR schedule steps, and the metrics are ``skipped = 1.0``, ``grad_norm``, ``lr`` and
        ``skip_reason`` naming the rows with a non-finite input or log-prob (reward, length).
    """
    a, tr = run.config.algorithm, run.config.trainer
    kernel = kernel or loss_kernel(run)
    model, opt = state.model, state.optimizer
    model.train()
    caller_mask = exp.response_mask  # the caller's rows (a skipped step's report counts their lengths)
    # Micro-batches of rows of similar lengths: row i of `exp` is the caller's row order[i]
    # (the row order when the objective depends on which rows share a micro-batch).
    mbs = tr.micro_batch_size
    if run.algorithm.microbatch_invariant:
        order = length_order(exp.response_mask)
        exp = exp.rows(order)
        bounds = micro_batch_bounds(exp.attention_mask, exp.response_len, mbs, overhead=micro_batch_overhead(model))
    else:  # the caller's rows as they are (no copy), SkyRL's cuts
        order = torch.arange(exp.batch_size)
        bounds = even_bounds(exp.batch_size, mbs)
    b, t = exp.batch_size, exp.response_len
    mask = exp.response_mask
    n_mb = len(bounds)
    # With dp: the whole batch's tokens and sequences, and the most micro-batches of any rank.
    tokens, seqs, n_all = dp.batch_counts(mask.sum(), b, n_mb) if dp else (mask.sum(), b, n_mb)
    if global_tokens is None:
        global_tokens = torch.as_tensor(tokens).clamp(min=1).to(torch.float32)
    if global_seqs is None:
        global_seqs = torch.tensor(float(seqs))
    batch_seqs = float(global_seqs) if dp else float(b)  # B of the whole batch (the metrics' weights)
    with_entropy = run.algorithm.entropy_coef != 0
    # The aggregation's max length is the configured generation budget, one constant for every
    # step (Dr. GRPO's normaliser), never the longest response of this batch.
    max_len = run.config.rollout.max_new_tokens
    sums: dict[str, float] = {}
    bounds += [(b, b)] * (n_all - n_mb)  # (b, b): a masked filler (dp)
    filler = filler if filler is not None else (masked_row(exp) if b else None)
    prompts = _prompt_totals(run, exp, filler, dp)
    first_pass: dict[int, torch.Tensor] = {}  # old log-probs taken from epoch 0 when not given
    stepped = 0
    for epoch in range(a.update_epochs):
        opt.zero_grad(set_to_none=True)
        bad: dict[int, list[str]] | None = None  # rows of a non-finite loss, once one is seen
        for i, (s, e) in enumerate(bounds):
            mb = exp.slice(s, e) if s < b else filler
            lp, ent = sequence_log_probs(model, mb.input_ids, mb.attention_mask, t, temperature=run.config.rollout.temperature, top_p=run.config.rollout.top_p, with_entropy=with_entropy)
            old = mb.old_log_probs
            if old is None:
                # No optimiser step has happened before the first epoch ends, so this forward
                # pass is the sampling policy's.
                old = first_pass.setdefault(s, torch.where(mb.response_mask, lp.detach(), 0.0))
            batch = PolicyLossInput(
                log_probs=lp, old_log_probs=old, advantages=mb.advantages, loss_mask=mb.response_mask,
                ref_log_probs=mb.ref_log_probs, rollout_log_probs=mb.rollout_log_probs,
                extras=step_fields(old, mb.rollout_log_probs, {}, mb.extras),  # the step's per-sample fields
            )
            out = kernel(batch, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_len, entropy=ent, **prompts(s, e))
            finite = bool(torch.isfinite(out.loss))
            if not finite and bad is None:
                tensors = {"advantages": mb.advantages, "log_probs": lp, "old_log_probs": old, "ref_log_probs": mb.ref_log_probs, "rollout_log_probs": mb.rollout_log_probs}
                rows = nonfinite_rows(tensors, mb.response_mask) if s < b else {}  # not the filler's
                bad = {int(order[s + r]): names for r, names in rows.items()}
            if not finite and not dp:
                break
            if dp:  # every rank makes the same calls, so it backpropagates even a non-finite loss
                dp.accumulate(model, last=i == len(bounds) - 1)
            out.loss.backward()
            if s >= b:  # the filler (no rows): every rank reports the same metric names
                for k in ("loss", *out.metrics):
                    sums.setdefault(k, 0.0)
            if s >= b or not finite:  # or a step about to be skipped
                continue
            share = mb.batch_size / batch_seqs
            add_metric(sums, "loss", out.loss.detach(), 1.0)
            for k, v in out.metrics.items():
                # The objective's terms are globally normalised (they sum over micro-batches);
                # the loss's own metrics are means of each micro-batch.
                add_metric(sums, k, v, 1.0 if k in SUMMED_METRICS else share)
        if dp and not dp.all_true(bad is None) and bad is None:
            bad = {}  # a non-finite loss on another rank: no row of this share to name
        grad_norm, ok = step_if_finite(model, opt, max_norm=tr.grad_clip, loss_finite=bad is None)
        if not ok:
            what = "loss" if bad is not None else f"gradient (norm {float(grad_norm)})"
            rewards = scores if scores is not None else torch.full((b,), float("nan"))
            reason = f"a non-finite {what} in update epoch {epoch + 1}: " + describe_rows(bad or {}, rewards=rewards, lengths=caller_mask.sum(-1))
            skipped = {"skipped": 1.0, "skip_reason": reason, "grad_norm": float(grad_norm), "lr": float(opt.param_groups[0]["lr"])}
            if stepped:
                state.scheduler.step()
            return skipped
        stepped += 1
        add_metric(sums, "grad_norm", grad_norm / (dp.world_size if dp else 1), 1.0)  # the same on every rank
    if dp:
        sums = dp.sum_metrics(sums)
    out_metrics = {k: v / a.update_epochs for k, v in sums.items()}
    out_metrics["lr"] = float(opt.param_groups[0]["lr"])  # the rate this step used
    out_metrics["skipped"] = 0.0
    state.scheduler.step()
    return out_metrics


def experience_and_update(
    run: ResolvedRun,
    state: TrainState,
    rollout,
    scores: torch.Tensor,
    *,
    reward_function: str,
    old_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kernel: Callable | None = None,
    rank_rows: torch.Tensor | None = None,
    dp: Collectives | None = None,
    fields: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], Experience | None]:
    """:func:`make_experience` then :func:`policy_update`, unless something is not finite.

    Skipped (``skyrl_fn.trainer.nonfinite``; metrics ``skipped = 1.0`` and ``skip_reason``, no
    experience returned, nothing updated): a non-finite reward (each sample named with
    ``reward_function``), a non-finite reference/rollout/old log-prob or critic value (the rows
    named), or a non-finite loss or gradient in :func:`policy_update`.

    Args:
        rollout: the ``RolloutBatch``; scores ``[B]``; the log-probs and values ``[B, T]``.
        reward_function: the reward's name for the report (``tasks.reward_function_name``).
        fields: the trainer's per-sample fields computed on request (``make_experience``).
        rank_rows, dp: data-parallel update: the experience is made of the whole batch (identical
            on every rank) and this rank updates on its share ``rank_rows`` (``[B']`` int64) with
            :func:`policy_update`'s ``dp``.

    Returns:
        ``(metrics, experience or None)``; the experience (of the whole batch) feeds the critic update.
    """
    mask = rollout.response_mask
    bad = reward_rows(scores, prompts=rollout.prompts, responses=rollout.responses, group_ids=rollout.group_ids.tolist(), function=reward_function)
    if bad:
        return skipped_metrics("a non-finite reward: " + "; ".join(bad), scores=scores, response_mask=mask), None
    inputs = {"ref_log_probs": ref_log_probs, "values": values, "rollout_log_probs": rollout.rollout_log_probs, "old_log_probs": old_log_probs, **(fields or {})}
    rows = nonfinite_rows(inputs, mask)
    if rows:
        reason = "non-finite inputs: " + describe_rows(rows, rewards=scores, lengths=mask.sum(-1))
        return skipped_metrics(reason, scores=scores, response_mask=mask), None
    exp, metrics = make_experience(run, rollout, scores, old_log_probs=old_log_probs, ref_log_probs=ref_log_probs, values=values, kl_coef=kl_coef, fields=fields)
    share = exp if rank_rows is None else exp.rows(rank_rows)
    filler = None if rank_rows is None else masked_row(exp)  # a rank may hold no prompt group
    metrics.update(policy_update(run, state, share, kernel=kernel, scores=scores if rank_rows is None else scores[rank_rows], dp=dp, filler=filler))
    return metrics, (None if metrics["skipped"] else exp)


def masked_row(exp: Experience) -> Experience:
    """Row 0 of ``exp`` with an all-zero response mask: its loss and gradient are exactly 0."""
    one = exp.slice(0, 1)
    return attrs.evolve(one, response_mask=torch.zeros_like(one.response_mask))


def add_metric(sums: dict[str, float], key: str, value: Any, weight: float) -> None:
    """``sums[key] += value * weight`` (one host sync per metric per micro-batch, outside the loss itself)."""
    sums[key] = sums.get(key, 0.0) + float(value) * weight
