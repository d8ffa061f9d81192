"""The training step as composable pieces, usable in-process and inside Ray actors.

Every function takes its models, optimisers and the ``ResolvedRun`` explicitly; nothing reads a
global. The algorithm pieces are looked up by name in ``run.table``.

Notation: ``P`` prompts, ``G`` samples per prompt, ``B = P * G`` sequences, ``Lp`` prompt tokens,
``T`` response tokens, ``L = Lp + T``, ``V`` vocabulary.

One step (see ``skyrl_fn.train.loop``)::

    rollout  = backend.generate(prompts, seed=...)                  # RolloutBatch
    scores   = task rewards                                         # [B]
    old_lp   = batched_log_probs(policy, rollout)   (or None: from the update's first pass)
    ref_lp   = batched_log_probs(reference, rollout)   (KL only)    # [B, T]
    values   = batched_values(critic, rollout)         (GAE only)   # [B, T]
    exp, m   = make_experience(run, rollout, scores, old_log_probs=old_lp, ...)
    policy_update(run, policy_state, exp); critic_update(run, critic_state, exp)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
import torch
from torch import nn

from skyrl_fn.records import PolicyLossInput
from skyrl_fn.train.config import ResolvedRun, accepts

# Re-exported: the learner's public surface is one import away (forward passes and experience
# live in their own modules).
from skyrl_fn.train.experience import (
    Experience,
    KLController,
    compute_advantages,
    make_experience,
    token_rewards,
)
from skyrl_fn.train.forward import batched_log_probs, batched_values, response_values, sequence_log_probs

__all__ = [
    "TrainState", "Experience", "KLController",
    "make_optimizer", "make_train_state", "sequence_log_probs", "batched_log_probs", "batched_values",
    "token_rewards", "compute_advantages", "make_experience", "loss_kernel", "policy_update",
    "critic_update", "value_loss", "response_values",
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


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and a linear warm-up ``lr * min(1, (k + 1) / warmup_steps)`` at optimiser step ``k``.

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
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    w = max(int(warmup_steps), 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if w == 0 else min(1.0, (k + 1) / w))
    return opt, sched


def make_train_state(model: nn.Module, *, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0) -> TrainState:
    """``TrainState`` of ``model`` with :func:`make_optimizer`."""
    opt, sched = make_optimizer(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
    return TrainState(model=model, optimizer=opt, scheduler=sched)


# -- losses and updates ----------------------------------------------------------------------


def _aggregate(fn: Callable, token_loss, mask, *, hyper: Mapping[str, Any], global_tokens, global_seqs, max_seq_len):
    extra = {}
    for name, value in (("global_tokens", global_tokens), ("global_seqs", global_seqs), ("max_seq_len", max_seq_len)):
        if accepts(fn, name):
            extra[name] = value
    return fn(token_loss, mask, **hyper, **extra)


def loss_kernel(run: ResolvedRun, *, device_type: str = "cpu") -> Callable[..., tuple[torch.Tensor, Mapping[str, torch.Tensor]]]:
    """The policy loss + aggregation of ``run`` as one function (compiled when
    ``algorithm.compile``; on ``device_type="cuda"`` with ``skyrl_fn.gpu.compile_kernel`` in
    ``algorithm.compile_mode``, half-precision inputs upcast to float32 inside the graph)::

        kernel(PolicyLossInput, global_tokens, global_seqs, max_seq_len) -> (loss [], metrics)

    With ``algorithm.off_policy_correction`` = ``tis`` / ``tis_sequence`` the per-token loss is
    multiplied by the truncated importance weights ``min(pi_old / pi_rollout, tis_cap)`` per token
    / per sequence (``skyrl_fn.losses.tis_weights``), correcting for the rollout engine's drift.

    The aggregation receives the GLOBAL token and sequence counts of the whole batch, so the sum
    of the micro-batch losses is exactly the full-batch loss (and gradient accumulation gives the
    full-batch gradient). An aggregation that takes none of the global counts is weighted by the
    micro-batch's share of sequences instead (exact for per-sequence means only).
    """
    a = run.config.algorithm
    loss_fn = run.table.policy_loss(a.policy_loss)
    agg_fn = run.table.get("aggregation", a.loss_reduction)
    loss_hyper, agg_hyper = dict(run.policy_loss_hyper), dict(run.aggregation_hyper)
    uses_globals = any(accepts(agg_fn, n) for n in ("global_tokens", "global_seqs"))
    tis_level = {"none": None, "tis": "token", "tis_sequence": "sequence"}[a.off_policy_correction]

    def kernel(batch: PolicyLossInput, global_tokens, global_seqs, max_seq_len):
        out = loss_fn(batch, **loss_hyper)
        token_loss, metrics = out.token_loss, dict(out.metrics)
        if tis_level is not None and batch.rollout_log_probs is not None:
            from skyrl_fn.losses import tis_weights

            w, tis_metrics = tis_weights(batch.old_log_probs, batch.rollout_log_probs, batch.loss_mask, level=tis_level, cap=a.tis_cap)
            token_loss = token_loss * w
            metrics.update(tis_metrics)
        loss = _aggregate(agg_fn, token_loss, batch.loss_mask, hyper=agg_hyper, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_seq_len)
        if not uses_globals:
            loss = loss * (batch.batch_size / global_seqs)
        return loss, metrics

    if a.compile and device_type == "cuda":
        from skyrl_fn.gpu.kernels import compile_kernel

        return compile_kernel(kernel, mode=a.compile_mode, device_type="cuda")
    if a.compile:
        helper = _compiled_helper()
        return helper(kernel) if helper is not None else torch.compile(kernel, dynamic=True)
    return kernel


def _compiled_helper() -> Callable | None:
    try:
        from skyrl_fn.losses import compile_loss
    except ImportError:
        return None
    return compile_loss


def policy_update(run: ResolvedRun, state: TrainState, exp: Experience, *, kernel: Callable | None = None) -> dict[str, float]:
    """``algorithm.update_epochs`` optimiser steps on ``exp`` with gradient accumulation.

    Per micro-batch: ``loss = agg(policy_loss) [+ kl_loss_coef * agg(kl)] [- entropy_coef *
    agg(entropy)]``, each aggregated with the global counts and backpropagated; then the global
    gradient norm is clipped to ``trainer.grad_clip`` and AdamW steps. The LR schedule steps once.

    Args:
        run: the resolved run.
        state: the policy's ``TrainState`` (mutated: parameters, optimiser and schedule).
        exp: the experience.
        kernel: a prebuilt :func:`loss_kernel` (built per call when None; pass one to reuse a
            compiled kernel).

    Returns:
        metrics (python floats): loss, pg metrics of the loss, grad_norm, lr, kl_loss, entropy.
    """
    a, tr = run.config.algorithm, run.config.trainer
    kernel = kernel or loss_kernel(run)
    model, opt = state.model, state.optimizer
    model.train()
    b, t = exp.batch_size, exp.response_len
    mask = exp.response_mask
    global_tokens = mask.sum().clamp(min=1).to(torch.float32)
    global_seqs = torch.tensor(float(b))
    kl_fn = run.table.get("kl_estimator", a.kl_estimator) if a.use_kl_loss else None
    agg_fn = run.table.get("aggregation", a.loss_reduction)
    sums: dict[str, float] = {}
    mbs = tr.micro_batch_size
    first_pass: dict[int, torch.Tensor] = {}  # old log-probs taken from epoch 0 when not given
    for _ in range(a.update_epochs):
        opt.zero_grad(set_to_none=True)
        for s in range(0, b, mbs):
            mb = exp.slice(s, s + mbs)
            lp, ent = sequence_log_probs(model, mb.input_ids, mb.attention_mask, t, temperature=run.config.rollout.temperature, top_p=run.config.rollout.top_p, with_entropy=a.entropy_coef != 0)
            old = mb.old_log_probs
            if old is None:
                # No optimiser step has happened before the first epoch ends, so this forward
                # pass is the sampling policy's.
                old = first_pass.setdefault(s, torch.where(mb.response_mask, lp.detach(), 0.0))
            batch = PolicyLossInput(
                log_probs=lp, old_log_probs=old, advantages=mb.advantages, loss_mask=mb.response_mask,
                ref_log_probs=mb.ref_log_probs, rollout_log_probs=mb.rollout_log_probs,
            )
            loss, metrics = kernel(batch, global_tokens, global_seqs, t)
            share = mb.batch_size / b
            _acc(sums, "pg_loss", loss.detach(), 1.0)
            if kl_fn is not None:
                kl = torch.where(mb.response_mask, kl_fn(lp, mb.ref_log_probs, **run.kl_hyper), 0.0)
                kl_loss = _aggregate(agg_fn, kl, mb.response_mask, hyper=run.aggregation_hyper, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=t)
                loss = loss + a.kl_loss_coef * kl_loss
                _acc(sums, "kl_loss", kl_loss.detach(), 1.0)
            if ent is not None:
                ent_loss = _aggregate(agg_fn, torch.where(mb.response_mask, ent, 0.0), mb.response_mask, hyper=run.aggregation_hyper, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=t)
                loss = loss - a.entropy_coef * ent_loss
                _acc(sums, "entropy", ent_loss.detach(), 1.0)
            loss.backward()
            _acc(sums, "loss", loss.detach(), 1.0)
            for k, v in metrics.items():
                _acc(sums, k, v, share)
        grad_norm = _clip(model, tr.grad_clip)
        opt.step()
        _acc(sums, "grad_norm", grad_norm, 1.0)
    out = {k: v / a.update_epochs for k, v in sums.items()}
    out["lr"] = float(opt.param_groups[0]["lr"])  # the rate this step used
    state.scheduler.step()
    return out


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
    from skyrl_fn.losses import value_loss as per_token
    from skyrl_fn.losses.aggregation import token_mean

    out = per_token(values, old_values, returns, mask, value_clip=clip if clip > 0 else None)
    return token_mean(out.token_loss, mask, global_tokens=global_tokens)


def critic_update(run: ResolvedRun, state: TrainState, exp: Experience) -> dict[str, float]:
    """One optimiser step of the critic per update epoch on the clipped value loss (accumulated
    over micro-batches with the global token count), grad-norm clipped. Returns
    ``value_loss``, ``critic_grad_norm``, ``critic_lr``."""
    if exp.values is None:
        raise ValueError("exp.values: expected [B, T] old critic values for the critic update, got None")
    a, tr = run.config.algorithm, run.config.trainer
    model, opt = state.model, state.optimizer
    model.train()
    b, t = exp.batch_size, exp.response_len
    global_tokens = exp.response_mask.sum().clamp(min=1).float()
    sums: dict[str, float] = {}
    for _ in range(a.update_epochs):
        opt.zero_grad(set_to_none=True)
        for s in range(0, b, tr.micro_batch_size):
            mb = exp.slice(s, s + tr.micro_batch_size)
            v = response_values(model, mb.input_ids, mb.attention_mask, t).float()
            loss = value_loss(v, mb.values, mb.returns, mb.response_mask, clip=a.value_clip, global_tokens=global_tokens)
            loss.backward()
            _acc(sums, "value_loss", loss.detach(), 1.0)
        _acc(sums, "critic_grad_norm", _clip(model, tr.grad_clip), 1.0)
        opt.step()
    out = {k: v / a.update_epochs for k, v in sums.items()}
    out["critic_lr"] = float(opt.param_groups[0]["lr"])
    state.scheduler.step()
    return out


def _clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def _acc(sums: dict[str, float], key: str, value: Any, weight: float) -> None:
    # One sync per metric per micro-batch, outside the loss itself.
    sums[key] = sums.get(key, 0.0) + float(value) * weight
