"""Held-out evaluation: greedy decoding on a fixed set of prompts the policy never trains on,
scored with the task's reward.

    eval_accuracy = #{held-out prompts whose greedy response earns the full reward 1.0} / N   (pass@1)

The set is fixed for a run: the first ``eval.size`` distinct prompts of the task's held-out split
(``task.heldout()``, e.g. ``arithmetic``'s eval split, disjoint from training by construction) or
of the rows in ``eval.path`` (gsm8k-style ``{"prompt", "answer"}`` jsonl). Decoding is
``model.generate(do_sample=False)`` with the same prompt encoding (chat template, left padding)
and EOS ids as the rollout backend, so only the sampling rule differs from training.

The loop evaluates at step 0 (before any update), every ``eval.every`` steps and after the last
step; the metrics join that step's row (``eval_*`` keys).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from skyrl_fn.trainer.config import EvalConfig, TrainConfig
from skyrl_fn.tasks.gsm8k import Gsm8kTask
from skyrl_fn.models.model import encode_prompts, eos_token_ids
from skyrl_fn.tasks.base import Example, Rewarded, Task
from skyrl_fn.tasks.scoring import reward_value

__all__ = ["heldout_task", "heldout_examples", "eval_due", "evaluate", "greedy_responses"]


def heldout_task(task: Task, cfg: EvalConfig) -> Task:
    """The task whose examples form the held-out set: ``eval.path`` rows, else ``task.heldout()``.

    Raises:
        ValueError: the task has no held-out split and no ``eval.path`` was given.
    """
    if cfg.path:
        held = Gsm8kTask.from_jsonl(cfg.path)
        return task.rescore(held) if isinstance(task, Rewarded) else held
    heldout = getattr(task, "heldout", None)
    if heldout is None:
        raise ValueError(
            f"eval.path: task {task.name!r} has no held-out split of its own; expected a jsonl of held-out "
            f'{{"prompt", "answer"}} rows with --eval.every > 0, got None'
        )
    return heldout()


def heldout_examples(task: Task, cfg: EvalConfig) -> tuple[Task, list[Example]]:
    """``(held-out task, its first eval.size distinct prompts)``.

    Repeated prompts are skipped (a small generated split repeats itself), scanning at most
    ``20 * eval.size`` examples, so the set may be smaller than ``eval.size``: ``eval_size``
    in the metrics says how many were scored.
    """
    held = heldout_task(task, cfg)
    size = held.size()
    limit = 20 * cfg.size if size is None else size
    seen: set[str] = set()
    out: list[Example] = []
    for i in range(limit):
        e = held.example(i)
        if e.prompt not in seen:
            seen.add(e.prompt)
            out.append(e)
            if len(out) == cfg.size:
                break
    return held, out


def eval_due(config: TrainConfig, done: int) -> bool:
    """True when the loop evaluates after ``done`` completed steps (0 = before training)."""
    every = config.eval.every
    return every > 0 and (done == 0 or done % every == 0 or done == config.trainer.steps)


@torch.no_grad()
def greedy_responses(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Greedy responses to ``prompts`` (``P`` of them), in batches of ``batch_size``.

    Returns:
        ``(texts, lengths [P], ended [P])``: decoded texts without special tokens, generated
        token counts up to and including the first EOS, and whether an EOS ended the response.
    """
    eos = eos_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    texts: list[str] = []
    lengths, ended = [], []
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(tokenizer, prompts[lo: lo + batch_size])
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=list(eos), pad_token_id=tokenizer.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )[:, ids.shape[1]:].cpu()
            is_eos = torch.isin(out, torch.tensor(eos))
            stop = is_eos.any(-1)
            first = torch.where(stop, is_eos.int().argmax(-1), out.shape[1])
            for row, n, hit in zip(out.tolist(), first.tolist(), stop.tolist()):
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
                lengths.append(n + int(hit))
                ended.append(hit)
    finally:
        model.train(was_training)
    return texts, torch.tensor(lengths), torch.tensor(ended)


def evaluate(
    model: nn.Module, tokenizer, task: Task, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int = 32
) -> dict[str, float]:
    """Greedy pass@1 of ``model`` on ``examples`` scored by ``task.reward``.

    Returns:
        ``eval_accuracy`` (fraction with reward 1.0), ``eval_reward`` (mean reward),
        ``eval_response_length`` (mean tokens), ``eval_eos_rate`` (fraction ended by EOS rather
        than the token limit), ``eval_seconds``, ``eval_size``.
    """
    if not examples:
        raise ValueError("examples: expected at least one held-out example, got none")
    t0 = time.perf_counter()
    texts, lengths, ended = greedy_responses(
        model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    rewards = [reward_value(task.reward(t, e), None)[0] for t, e in zip(texts, examples)]  # the score, not any fields
    n = len(examples)
    return {
        "eval_accuracy": sum(r >= 1.0 for r in rewards) / n,
        "eval_reward": sum(rewards) / n,
        "eval_response_length": float(lengths.float().mean()),
        "eval_eos_rate": float(ended.float().mean()),
        "eval_seconds": time.perf_counter() - t0,
        "eval_size": float(n),
    }
