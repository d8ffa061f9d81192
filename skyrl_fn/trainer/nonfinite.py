"""A non-finite reward, loss or gradient never reaches the weights: the step is skipped, counted
and logged with the rows that carried it; too many consecutive skips stop the run.

Where each check sits (``B`` sequences, ``T`` response tokens):

* rewards ``[B]``: before the experience is built (a NaN reward would turn every advantage of its
  group, or of the batch, into NaN); each offending sample is named with the reward function
  (:func:`reward_rows`);
* loss and gradient: after the backward passes of an optimiser step and before ``step()``; on a
  non-finite loss or global gradient norm the gradients are dropped, the optimiser and the LR
  schedule do not step, and the rows whose inputs or log-probs are non-finite are named
  (:func:`nonfinite_rows`, :func:`describe_rows`);
* the loop keeps a :class:`SkipCounter`: each skipped step is counted (``skipped_steps`` in the
  metrics) and reported; more than ``limit`` consecutive skips raise :class:`NonFiniteStepError`.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import attrs
import torch

__all__ = [
    "NonFiniteStepError", "SkippedStepWarning", "SkipCounter", "reward_rows", "nonfinite_rows", "describe_rows",
    "step_if_finite", "skipped_metrics", "SKIPPED", "SKIP_REASON",
]

#: Metric set to 1.0 on a skipped step (0.0 otherwise).
SKIPPED = "skipped"
#: Key of the one-line reason of a skipped step in the metrics (a string, not plotted).
SKIP_REASON = "skip_reason"


class NonFiniteStepError(RuntimeError):
    """More consecutive steps were skipped for non-finite values than ``trainer.max_consecutive_skips``."""


class SkippedStepWarning(UserWarning):
    """A training step was skipped: a reward, the loss or the gradient was not finite."""


def reward_rows(scores: torch.Tensor, *, prompts: Sequence[str], responses: Sequence[str], group_ids: Sequence[int], function: str) -> list[str]:
    """One description per non-finite reward: the function, the sample and its prompt.

    Args:
        scores: ``[B]`` rewards.
        prompts: the ``P`` prompt texts; ``group_ids[b]`` indexes them.
        responses: the ``B`` response texts.
        group_ids: ``[B]`` prompt index of each sample.
        function: the reward function's name (e.g. ``Gsm8kTask.reward``).
    """
    bad = (~torch.isfinite(scores.detach().float().cpu())).nonzero().flatten().tolist()
    return [
        f"{function} returned {float(scores[b])} for sample {b} (prompt {prompts[int(group_ids[b])][:40]!r}, "
        f"response {responses[b][:40]!r})"
        for b in bad
    ]


def nonfinite_rows(tensors: Mapping[str, torch.Tensor | None], mask: torch.Tensor) -> dict[int, list[str]]:
    """Row -> names of the tensors that are non-finite in that row (where ``mask`` is 1).

    Args:
        tensors: name -> ``[B, T]`` (masked by ``mask``) or ``[B]`` tensor; None entries skipped.
        mask: ``[B, T]`` bool response mask.
    """
    out: dict[int, list[str]] = {}
    m = mask.bool().cpu()
    for name, x in tensors.items():
        if x is None:
            continue
        x = x.detach().float().cpu()
        bad = ~torch.isfinite(x)
        if bad.dim() == 2:
            bad = (bad & m).any(-1)
        for b in bad.nonzero().flatten().tolist():
            out.setdefault(b, []).append(name)
    return out


def describe_rows(rows: Mapping[int, Sequence[str]], *, rewards: torch.Tensor, lengths: torch.Tensor, limit: int = 8) -> str:
    """``row 3 (reward 0.5, length 6): advantages, log_probs; ...`` for the first ``limit`` rows."""
    if not rows:
        return "no row holds a non-finite input or log-prob"
    parts = [
        f"row {b} (reward {float(rewards[b]):.4g}, length {int(lengths[b])}): {', '.join(names)}"
        for b, names in sorted(rows.items())[:limit]
    ]
    more = f"; ... {len(rows) - limit} more rows" if len(rows) > limit else ""
    return "; ".join(parts) + more


def step_if_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, max_norm: float, loss_finite: bool = True) -> tuple[torch.Tensor, bool]:
    """Clip the global gradient norm to ``max_norm`` (<= 0: no clipping) and step ``optimizer`` —
    unless the loss or the norm is not finite: then the gradients are dropped and nothing steps.

    Returns:
        ``(grad_norm, stepped)``.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    elif params:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    else:
        norm = torch.zeros(())
    if not loss_finite or not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    optimizer.step()
    return norm, True


def skipped_metrics(reason: str, *, scores: torch.Tensor, response_mask: torch.Tensor) -> dict[str, object]:
    """The metrics of a skipped step: ``skipped = 1``, the reason, and the batch's finite reward
    mean and mean response length (so the step still shows what was sampled)."""
    s = scores.detach().float()
    finite = s[torch.isfinite(s)]
    return {
        SKIPPED: 1.0, SKIP_REASON: reason,
        "reward": float(finite.mean()) if finite.numel() else float("nan"),
        "response_length": float(response_mask.sum(-1).float().mean()),
    }


@attrs.frozen(kw_only=True)
class SkipCounter:
    """Skipped steps so far; :meth:`record` returns the next counter.

    Attributes:
        limit: the most consecutive skipped steps tolerated (``trainer.max_consecutive_skips``).
        consecutive: skipped steps in a row, up to the last one recorded.
        total: skipped steps in this process.
    """

    limit: int
    consecutive: int = 0
    total: int = 0

    def record(self, metrics: Mapping[str, object], *, step: int) -> "SkipCounter":
        """Count step ``step`` (1-based) from its metrics; warn about a skip.

        Raises:
            NonFiniteStepError: more than ``limit`` consecutive steps skipped.
        """
        if not metrics.get(SKIPPED):
            return attrs.evolve(self, consecutive=0)
        nxt = attrs.evolve(self, consecutive=self.consecutive + 1, total=self.total + 1)
        reason = metrics.get(SKIP_REASON, "a non-finite value")
        if nxt.consecutive > self.limit:
            raise NonFiniteStepError(
                f"trainer.max_consecutive_skips: {nxt.consecutive} consecutive steps skipped (limit {self.limit}), "
                f"the last, step {step}, for {reason}"
            )
        warnings.warn(f"step {step} skipped ({nxt.total} so far): {reason}", SkippedStepWarning, stacklevel=2)
        return nxt
