"""The per-sample fields of a training step: what the trainer provides, what the task provides, and
the check, before any model loads, that every field the chosen pieces read is provided.

An estimator or loss reads a field ``<key>`` of ``AdvantageInput.extras`` / ``PolicyLossInput.extras``
when it declares ``requires("extras.<key>")`` (or names it through a ``fields_from``
hyperparameter, GDPO's ``reward_keys``). A field comes from one of two places:

* the trainer (:data:`TRAINER_FIELDS`): ``old_log_probs`` and ``rollout_log_probs`` every step,
  ``sum_pi_squared`` only when a chosen piece reads it (:data:`ON_REQUEST`; computed in the policy
  forward pass that gives the old log-probs, ``skyrl_fn.trainer.forward.old_policy_pass``);
* the task's reward (``skyrl_fn.tasks.scoring.provides``): reward components and the like, carried
  row by row in ``RolloutBatch.extras``.

:func:`step_fields` is the one place a step's fields are put together; the trainer special-cases
no name besides.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from skyrl_fn.core.requires import missing_fields

__all__ = ["TRAINER_FIELDS", "ON_REQUEST", "check_fields", "requested_fields", "step_fields"]

#: The per-sample fields the trainer provides: the sampling policy's log-probs of the sampled
#: tokens (recomputed with ``algorithm.recompute_old_log_probs``, or when a piece reads
#: ``sum_pi_squared``; else the rollout engine's), the rollout engine's, and
#: ``sum_v pi(v)^2`` of the sampling policy at each response token (:data:`ON_REQUEST`).
TRAINER_FIELDS: tuple[str, ...] = ("old_log_probs", "rollout_log_probs", "sum_pi_squared")
#: Trainer fields computed only when a chosen piece reads them (they cost a forward pass).
ON_REQUEST: frozenset[str] = frozenset({"sum_pi_squared"})


def requested_fields(needs: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The :data:`ON_REQUEST` fields some piece of ``needs`` (label -> keys) reads."""
    return frozenset(k for keys in needs.values() for k in keys if k in ON_REQUEST)


def check_fields(needs: Mapping[str, frozenset[str]], task_fields: Sequence[str], *, task: str) -> None:
    """Raise unless every field a piece reads is provided by the trainer or the task.

    Args:
        needs: a label of each piece (``"algorithm.advantage_estimator 'gdpo'"``) -> the extras
            keys it reads as bound (``skyrl_fn.algorithm.Algorithm.fields``).
        task_fields: the fields the task's reward provides (``skyrl_fn.tasks.scoring.provided_fields``).
        task: how the task is named in the message (``"task 'digits'"``, with its reward).

    Raises:
        ValueError: a task field that has a trainer field's name; a field nobody provides, naming
            the piece, the field, and what the trainer and the task provide.
    """
    clash = sorted(set(task_fields) & set(TRAINER_FIELDS))
    if clash:
        raise ValueError(f"{task}: provides {clash}, which the trainer provides itself ({list(TRAINER_FIELDS)}); rename the field")
    provided = list(task_fields) if task_fields else "no per-sample fields"
    missing_fields(
        needs, {*TRAINER_FIELDS, *task_fields},
        source=f"{task} provides {provided} and the trainer provides {list(TRAINER_FIELDS)} (a reward declares its "
        f"fields with skyrl_fn.tasks.provides and returns them with 'score')",
    )


def step_fields(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, computed: Mapping[str, torch.Tensor], task: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The per-sample fields of a step (or a micro-batch of it), by name: the trainer's
    (:data:`TRAINER_FIELDS`; ``computed`` holds the :data:`ON_REQUEST` ones the run computes) and
    the task's (``RolloutBatch.extras``). ``[B, T]`` or ``[B]`` tensors."""
    return {"old_log_probs": old_log_probs, "rollout_log_probs": rollout_log_probs, **computed, **task}
