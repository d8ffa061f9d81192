"""Forward passes of the learner: response log-probs (temperature and top-p, as sampled) and critic values.

Notation: ``B`` sequences, ``Lp`` prompt tokens, ``T`` response tokens, ``L = Lp + T``, ``V``
vocabulary. Sequences are prompt (left-padded) + response (right-padded); positions count only
attended tokens (``skyrl_fn.models.model.position_ids``), exactly as during sampling.

Every pass runs on the columns its rows attend (:func:`attended_columns`): a micro-batch is cut
to its longest prompt and its longest response, not the whole batch's ``L``, and its ``[B, T]``
outputs are padded back with zeros. The result is the same (up to float rounding: the kept
columns' math does not change, since no attended token sees a dropped one — the left padding
is masked and positions count attended tokens, the right padding comes after every response
token); the work shrinks with the padding. The batched passes cut their micro-batches from the
rows ordered by response length (``skyrl_fn.trainer.micro_batches``), so each micro-batch's rows
have similar lengths, and return their ``[B, T]`` results in row order.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from skyrl_fn.ops.logprobs import token_logprobs_from_logits
from skyrl_fn.ops.sum_pi_squared import sum_pi_squared
from skyrl_fn.models.model import ModelConfig, load_model, load_tokenizer, position_ids
from skyrl_fn.rollout.base import RolloutBatch
from skyrl_fn.rollout.sampling import nucleus_log_mass
from skyrl_fn.trainer.fields import ON_REQUEST
from skyrl_fn.trainer.micro_batches import in_row_order, length_order, micro_batch_bounds, micro_batch_overhead
from skyrl_fn.trainer.run import ResolvedRun

__all__ = [
    "attended_columns", "response_logits", "sequence_log_probs", "batched_log_probs", "log_probs_and_fields", "old_policy_pass", "batched_values",
    "response_values", "FrozenScorer",
]

#: Above this vocabulary size log-probs go through ``skyrl_fn.ops.logprobs.token_logprobs_from_logits``.
_CHUNKED_VOCAB = 4096


def _keeps_logits(model: nn.Module) -> bool:
    """True when the model's forward takes ``logits_to_keep`` (recent transformers causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def attended_columns(attention_mask: torch.Tensor, response_len: int) -> tuple[int, int]:
    """``(first, stop)``: the columns ``[first, stop)`` of ``attention_mask [B, L]`` that some row
    attends (its longest prompt from ``first``, its longest response up to ``stop``), keeping at
    least one prompt column and the first response column, so the cut sequences still hold
    ``1 <= T' = stop - (L - T) < stop - first`` response columns."""
    am = attention_mask.bool()
    length, t = am.shape[1], int(response_len)
    used = am.any(0)
    prompt_end = length - t
    cols = torch.nonzero(used).squeeze(-1)
    first = min(int(cols[0]), prompt_end - 1) if cols.numel() else prompt_end - 1
    stop = max(int(cols[-1]) + 1, prompt_end + 1) if cols.numel() else prompt_end + 1
    return first, stop


def _pad_response(x: torch.Tensor, response_len: int) -> torch.Tensor:
    """``x [B, T', ...]`` padded with zeros to ``[B, T, ...]`` (the columns no row attends)."""
    missing = int(response_len) - x.shape[1]
    if missing == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], missing, *x.shape[2:]))], dim=1)


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """``[B, T', V]`` logits that predict the first ``T'`` of the last ``T = response_len`` tokens of
    each sequence (the token at position ``j`` is predicted by the logits at ``j - 1``), on the
    attended columns only (:func:`attended_columns`): ``T'`` is the longest response of the rows
    (at least 1); the logits of the later, unattended positions are not computed."""
    t = int(response_len)
    if t < 1 or t >= input_ids.shape[1]:
        raise ValueError(f"response_len: expected 1 <= T < L = {input_ids.shape[1]}, got {t}")
    first, stop = attended_columns(attention_mask, t)
    t = t - (input_ids.shape[1] - stop)
    input_ids, attention_mask = input_ids[:, first:stop], attention_mask[:, first:stop]
    am = attention_mask.long()
    kwargs = {"logits_to_keep": t + 1} if _keeps_logits(model) else {}  # skip the prompt's logits
    logits = model(input_ids=input_ids, attention_mask=am, position_ids=position_ids(am), use_cache=False, **kwargs).logits
    return logits[:, -t - 1 : -1, :]


def sequence_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the last ``T = response_len`` tokens of each sequence under the sampling
    distribution: ``log softmax(z / tau)``, renormalised over the top-p nucleus when ``top_p < 1``
    (``skyrl_fn.rollout.sampling``, the definition the rollout backends use).

    Args:
        model: a causal LM returning ``logits [B, L, V]``.
        input_ids: ``[B, L]`` prompt (left-padded) + response (right-padded).
        attention_mask: ``[B, L]`` bool or 0/1.
        response_len: ``T``.
        temperature: ``tau``; the sampling temperature, so scores match the rollout's.
        top_p: the sampling nucleus mass ``p`` (1 = the whole vocabulary, no extra work).
        with_entropy: also return the per-token entropy of ``softmax(z / tau)`` (the full
            distribution, whatever ``top_p``).

    Returns:
        ``log_probs [B, T]`` float32 (with grad if enabled) and ``entropy [B, T]`` or None.
    """
    logits = response_logits(model, input_ids, attention_mask, response_len)
    return _response_log_probs(logits, input_ids, response_len, temperature=temperature, top_p=top_p, with_entropy=with_entropy)


def _response_log_probs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_len: int, *, temperature: float, top_p: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` log-probs (and entropies) of the response tokens of ``input_ids [B, L]`` from
    :func:`response_logits`' ``[B, T', V]`` logits, zero-padded from ``T'`` back to ``T``."""
    targets = input_ids[:, -int(response_len):][:, : logits.shape[1]]
    lp, ent = _log_probs_of(logits, targets, temperature=temperature, top_p=top_p, with_entropy=with_entropy)
    return _pad_response(lp, response_len), (None if ent is None else _pad_response(ent, response_len))


def _log_probs_of(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float, top_p: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # top_p < 1: minus log of the nucleus mass (0 and never computed at top_p = 1).
    log_mass = nucleus_log_mass(logits, targets, temperature=temperature, top_p=top_p) if top_p < 1.0 else None
    if logits.shape[-1] > _CHUNKED_VOCAB:
        # Large vocabularies: the memory-light helper avoids the [B, T, V] log-softmax.

        out = token_logprobs_from_logits(logits, targets, temperature=temperature, with_entropy=with_entropy, ignore_index=None)
        lp, ent = (out.log_probs.float(), out.entropy.float()) if with_entropy else (out.float(), None)
        return (lp if log_mass is None else lp - log_mass), ent
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    log_probs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if log_mass is not None:
        log_probs = log_probs - log_mass
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return log_probs, entropy


def _by_length(rollout: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order [B], input_ids [B, L], attention_mask [B, L])``: the rollout's sequences with their
    rows ordered by response length (:func:`~skyrl_fn.trainer.micro_batches.length_order`), so
    consecutive micro-batches hold rows of similar lengths; ``in_row_order`` maps results back."""
    order = length_order(rollout.response_mask)
    ids, mask = (x[order] for x in rollout.sequences())
    return order, ids, mask


def batched_log_probs(
    model: nn.Module, rollout: RolloutBatch, *, micro_batch_size: int, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """``[B, T]`` float32 log-probs of ``rollout``'s responses under ``model`` (no grad) at the
    sampling ``temperature`` and ``top_p`` (:func:`sequence_log_probs`), in micro-batches of
    ``micro_batch_size`` sequences cut from the rows ordered by response length
    (``skyrl_fn.trainer.micro_batches``); in row order, 0 where the response mask is 0."""
    return log_probs_and_fields(model, rollout, micro_batch_size=micro_batch_size, temperature=temperature, top_p=top_p)[0]


@torch.no_grad()
def log_probs_and_fields(
    model: nn.Module, rollout: RolloutBatch, *, micro_batch_size: int, temperature: float = 1.0, top_p: float = 1.0,
    fields: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`batched_log_probs` and, from the same forward pass, the trainer's per-sample
    ``fields`` computed on request (``skyrl_fn.trainer.fields.ON_REQUEST``), each ``[B, T]``
    float32 and 0 where the response mask is 0:

    ``sum_pi_squared``: ``sum_v pi_t(v)^2`` with ``pi_t = softmax(z_t / tau)`` over the whole
    vocabulary (``skyrl_fn.ops.sum_pi_squared``; verl's ``calculate_sum_pi_squared``, read by the
    optimal token baselines). Deviation: at ``top_p < 1`` the log-probs are the nucleus's
    renormalised ones (``skyrl_fn.rollout.sampling``) while ``q`` stays the full distribution's, as
    verl's (which models top-p in neither).

    Raises:
        ValueError: a field the trainer does not compute.
    """
    unknown = sorted(set(fields) - ON_REQUEST)
    if unknown:
        raise ValueError(f"fields: expected names from {sorted(ON_REQUEST)}, got {unknown}")
    order, ids, mask = _by_length(rollout)
    t = rollout.response_ids.shape[1]
    lps: list[torch.Tensor] = []
    computed: dict[str, list[torch.Tensor]] = {k: [] for k in fields}
    for s, e in micro_batch_bounds(mask, t, micro_batch_size, overhead=micro_batch_overhead(model)):
        logits = response_logits(model, ids[s:e], mask[s:e], t)
        lps.append(_response_log_probs(logits, ids[s:e], t, temperature=temperature, top_p=top_p, with_entropy=False)[0])
        if "sum_pi_squared" in computed:
            computed["sum_pi_squared"].append(_pad_response(sum_pi_squared(logits, temperature=temperature), t))
    m = rollout.response_mask

    def rows(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.where(m, in_row_order(torch.cat(parts), order), 0.0)

    return rows(lps), {k: rows(v) for k, v in computed.items()}


def response_values(critic: nn.Module, ids: torch.Tensor, mask: torch.Tensor, t: int) -> torch.Tensor:
    """``[B, T]`` values ``V(s_t)`` read at the position *before* each response token (the state
    that emits it), with gradient; computed on the attended columns (:func:`attended_columns`),
    0 after the longest response of the rows."""
    first, stop = attended_columns(mask, t)
    kept = t - (ids.shape[1] - stop)
    values = critic(ids[:, first:stop], mask[:, first:stop].long())[:, -kept - 1 : -1]
    return _pad_response(values, t)


@torch.no_grad()
def batched_values(critic: nn.Module, rollout: RolloutBatch, *, micro_batch_size: int) -> torch.Tensor:
    """``[B, T]`` float32 critic values ``V(s_t)`` before each response token, in micro-batches
    of ``micro_batch_size`` rows of similar lengths (as :func:`batched_log_probs`); in row order,
    0 off the mask."""
    order, ids, mask = _by_length(rollout)
    t = rollout.response_ids.shape[1]
    out = [response_values(critic, ids[s:e], mask[s:e], t) for s, e in micro_batch_bounds(mask, t, micro_batch_size, overhead=micro_batch_overhead(critic))]
    return torch.where(rollout.response_mask, in_row_order(torch.cat(out).float(), order), 0.0)


@torch.no_grad()
def old_policy_pass(run: ResolvedRun, model: nn.Module, rollout: RolloutBatch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The policy pass before the update: ``(old log-probs [B, T], trainer fields computed on
    request)`` (:func:`log_probs_and_fields`) when ``algorithm.recompute_old_log_probs`` or a chosen
    piece reads such a field (``run.computed_fields``: the advantages need it before the update);
    ``(None, {})`` otherwise (``policy_update`` takes the old log-probs from its first pass)."""
    cfg = run.config
    if not (cfg.algorithm.recompute_old_log_probs or run.computed_fields):
        return None, {}
    return log_probs_and_fields(
        model, rollout, micro_batch_size=cfg.trainer.micro_batch_size, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, fields=run.computed_fields,
    )


class FrozenScorer:
    """A frozen model that scores the sampled tokens (the reference model, a distillation teacher).

    Args:
        run: the resolved run (its task's alphabet builds the embedded tokenizer; its temperature
            and top-p define the log-probs).
        model_cfg: the model to load.
        seed: its initialisation seed (the embedded tiny model).
        device: where it runs.
    """

    def __init__(self, run: ResolvedRun, model_cfg: ModelConfig, *, seed: int, device: str = "cpu") -> None:
        self.run = run
        self.device = device
        tokenizer = load_tokenizer(model_cfg, alphabet=run.make_task().alphabet)
        self.model = load_model(model_cfg, tokenizer, seed=seed).eval()
        self.model.requires_grad_(False)
        if device != "cpu":
            self.model = self.model.to(device)

    def log_probs(self, rollout: RolloutBatch) -> torch.Tensor:
        """``[B, T]`` log-probs of the sampled tokens (the policy's temperature and top-p)."""
        cfg = self.run.config
        return batched_log_probs(self.model, rollout, micro_batch_size=cfg.trainer.micro_batch_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
