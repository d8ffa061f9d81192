"""``distill``: the advantage estimator of pure on-policy distillation (no outcome reward).

On-policy distillation (Agarwal et al. 2024, https://arxiv.org/abs/2306.13649; Thinking Machines,
"On-Policy Distillation", 2025; verl's, prime-rl's and NeMo-RL's recipes) trains the student on its
own samples against a teacher's per-token log-probs: the advantage of token ``y_t`` is the
negative per-token reverse KL ``-(log pi_student(y_t) - log pi_teacher(y_t))`` times a coefficient.
The trainer adds that term to every run with a teacher (``skyrl_fn.trainer.teacher``), on top of
whichever estimator the run names; ``distill`` is the estimator with no outcome term at all, so the
teacher's term is the whole advantage.
"""

from __future__ import annotations

import torch

from skyrl_fn.core.records import AdvantageInput, AdvantageOutput
from skyrl_fn.core.requires import requires

__all__ = ["distill", "distill_term"]


@requires("teacher_log_probs")
@torch.no_grad()
def distill(batch: AdvantageInput) -> AdvantageOutput:
    """No outcome term: ``A_{i,t} = 0`` and returns 0, ``[B, T]``; the run's teacher term
    ``coef * (log pi_teacher - log pi_student)`` (added by the trainer) is the whole advantage.

    On-policy distillation as Agarwal et al. 2024 (arXiv:2306.13649) with the reverse KL as a
    per-token reward (Thinking Machines 2025); ``distill_term`` is the term.

    Requires ``teacher_log_probs``: a run naming this estimator must name ``teacher.model``.

    Args:
        batch: ``AdvantageInput`` (``token_level_rewards [B, T]`` give the output's shape and dtype).

    Returns:
        ``AdvantageOutput`` of zeros ``[B, T]`` in the rewards' dtype.
    """
    zeros = torch.zeros_like(batch.token_level_rewards)
    return AdvantageOutput(advantages=zeros, returns=zeros.clone())


def distill_term(log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, mask: torch.Tensor, *, coef: float = 1.0) -> torch.Tensor:
    """``[B, T]`` per-token distillation advantage, 0 off the mask::

        D_{i,t} = coef * (log pi_teacher(y_{i,t}) - log pi_student(y_{i,t}))

    the negative per-token reverse-KL estimate (``k1``) as a reward: under the student's samples
    ``E[D_t] = -coef * KL(pi_student || pi_teacher)`` at that position.

    Args:
        log_probs: ``[B, T]`` student (sampling policy) log-probs of the sampled tokens.
        teacher_log_probs: ``[B, T]`` teacher log-probs of the same tokens.
        mask: ``[B, T]`` bool.
        coef: weight.

    Returns:
        ``[B, T]`` float32.
    """
    if log_probs.shape != teacher_log_probs.shape or log_probs.shape != mask.shape:
        raise ValueError(
            f"log_probs/teacher_log_probs/mask: expected one shape [B, T], got {tuple(log_probs.shape)}, "
            f"{tuple(teacher_log_probs.shape)}, {tuple(mask.shape)}"
        )
    return torch.where(mask.bool(), coef * (teacher_log_probs.float() - log_probs.float()), 0.0)
