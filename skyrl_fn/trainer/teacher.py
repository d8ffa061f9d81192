"""On-policy distillation: a frozen teacher scores the student's own samples.

The student samples as in any RL step; the teacher (``--teacher.model``) computes the log-prob of
every sampled token, and the advantages get the per-token reverse-KL term

    A_{i,t} += coef * (log pi_teacher(y_{i,t}) - log pi_student(y_{i,t}))

(``skyrl_fn.estimators.distill_term``; ``log pi_student`` is the sampling policy's log-prob: the trainer's old
log-probs when they are recomputed, else the rollout's). Its expectation over the student's
samples, ``-coef * KL(pi_student || pi_teacher)`` per token, is what the policy gradient then
maximises: the reverse KL as a per-token reward, as Thinking Machines' "On-Policy Distillation"
(2025), prime-rl (``teacher_tau``) and verl/Trinity's on-policy distillation advantage define it
(Agarwal et al. 2024 for the method). With the ``distill`` estimator it is the whole advantage;
with any other estimator it is added to the RL advantages, so ``coef`` weighs distillation against
the task reward. No discounting: each token's term stays on that token (Thinking Machines use
discount 0 too).

The teacher runs in its own role (:class:`TeacherWorker`; on Ray the ``TeacherModel`` actor, like
the reference model), with the policy's sampling temperature and top-p. It must share the policy's
tokenizer: :func:`check_teacher_vocabulary` compares them before any model loads.

Notation: ``B`` sequences, ``T`` response tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import attrs

from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.forward import FrozenScorer
from skyrl_fn.models.model import load_tokenizer

__all__ = ["teacher_model_config", "check_teacher_vocabulary", "with_teacher_log_probs", "TeacherWorker"]


def teacher_model_config(config: TrainConfig) -> ModelConfig:
    """The ``ModelConfig`` of ``config.teacher`` (None when there is no teacher): the tiny model with
    the teacher's sizes, or the model at ``teacher.model``; chat template and context length as the
    policy's."""
    te = config.teacher
    if te.model is None:
        raise ValueError("teacher.model: expected 'tiny' or a model path, got None")
    tiny = te.model == "tiny"
    return dataclasses.replace(
        config.model, name_or_path=None if tiny else te.model, gguf_file=None, dtype=te.dtype, hidden_size=te.hidden_size,
        num_layers=te.num_layers, num_heads=te.num_heads, intermediate_size=te.intermediate_size,
    )


def check_teacher_vocabulary(config: TrainConfig, alphabet: str) -> None:
    """Raise ValueError unless the teacher's tokenizer is the policy's (same token -> id map and
    special ids): its log-probs must be of the very tokens the student sampled.

    Loads the two tokenizers only (no weights), so it runs before training. ``alphabet``: the
    task's (what the embedded character tokenizer is built from).
    """
    student = load_tokenizer(config.model, alphabet=alphabet)
    teacher = load_tokenizer(teacher_model_config(config), alphabet=alphabet)
    a, b = student.get_vocab(), teacher.get_vocab()
    where = f"teacher.model {config.teacher.model!r}"
    policy = config.model.name_or_path or "the tiny model"
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            f"{where}: expected the policy's tokenizer ({policy}: {len(a)} tokens), got a different vocabulary "
            f"({len(b)} tokens; e.g. {differ}); distillation needs the teacher to score the student's own token ids"
        )
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(student, name) != getattr(teacher, name):
            raise ValueError(f"{where}: expected {name} {getattr(student, name)} (the policy's), got {getattr(teacher, name)}")


def with_teacher_log_probs(parts: Sequence[Any], *, pad_id: int) -> tuple[Any, dict[str, float]]:
    """``(generated, teacher_log_probs [B, T])`` -> the ``Generated`` batch carrying them (run where
    the batch lives by ``Workers.transform``; ``pad_id`` unused)."""
    generated, teacher_lp = parts
    rollout = attrs.evolve(generated.rollout, teacher_log_probs=teacher_lp)
    return attrs.evolve(generated, rollout=rollout), {}


class TeacherWorker(FrozenScorer):
    """The frozen teacher: log-probs of the sampled tokens (``teacher.model``; :meth:`log_probs`)."""

    def __init__(self, run: ResolvedRun, *, device: str = "cpu") -> None:
        super().__init__(run, teacher_model_config(run.config), seed=run.config.teacher.seed, device=device)

