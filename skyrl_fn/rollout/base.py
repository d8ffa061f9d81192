"""Rollouts: the ``RolloutBatch`` record, the ``RolloutBackend`` protocol and the ``hf`` backend.

Notation: ``P`` prompts, ``G`` samples per prompt, ``B = P * G`` sequences, ``Lp`` prompt tokens
(left-padded), ``T`` response tokens (right-padded, ``T <= max_new_tokens``), ``V`` vocabulary.

Log-probs: ``rollout_log_probs[b, t]`` is the log-prob of the sampled token under the
distribution it was sampled from — ``softmax(logits / temperature)`` restricted to the top-p
nucleus and renormalised (``skyrl_fn.rollout.sampling``, which also says why and how this differs
from SkyRL/verl at ``top_p < 1``). At ``top_p = 1`` it is ``log softmax(logits / temperature)``
and at temperature 1 a plain forward pass of the same model (tested). The learner scores with
the same temperature and top-p, so rollout and learner log-probs agree (tested for both).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Mapping, Protocol, Sequence, runtime_checkable

import attrs
import torch
from torch import nn

from skyrl_fn.core._checks import as_mask, check_floating, check_shape, check_tensor
from skyrl_fn.models.model import encode_prompts, eos_token_ids, position_ids
from skyrl_fn.rollout.sampling import inverse_cdf_sample, nucleus_log_mass, nucleus_probs, prompt_seed

__all__ = [
    "RolloutConfig", "VLLM_TEMPERATURE_RANGE", "RolloutBatch", "RolloutBackend", "HFBackend", "hf_backend",
    "check_available", "BackendUnavailableError", "concat_rollouts",
]


class BackendUnavailableError(RuntimeError):
    """The requested rollout backend cannot run here (e.g. vllm without CUDA)."""


#: Temperatures every vLLM of the ``[vllm]`` extra samples with as given: ``SamplingParams``
#: raises < 0.01 to 0.01 (0.11 and 0.33) and rejects > 2 (0.33; 0.11 accepted them).
VLLM_TEMPERATURE_RANGE: tuple[float, float] = (0.01, 2.0)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling responses."""

    backend: str = "hf"
    """Rollout backend registered in the table: hf = in-process transformers sampling (CPU or GPU);
    vllm = needs vllm and CUDA; or a plugin's own (kind rollout_backend)."""
    samples_per_prompt: int = 8
    """G, responses sampled per prompt (the GRPO group size)."""
    max_new_tokens: int = 6
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 disables)."""
    gpu_memory_utilization: float = 0.6
    """vllm only: fraction of GPU memory for the engine."""
    tensor_parallel_size: int = 1
    """vllm only: tensor-parallel degree."""


def _long(name: str):
    def convert(x):
        check_tensor(name, x)
        if x.dtype != torch.long:
            raise TypeError(f"{name}: expected int64 token ids, got {x.dtype}")
        return x

    return attrs.field(converter=convert)


@attrs.frozen(kw_only=True, eq=False)
class RolloutBatch:
    """Sampled responses for ``P`` prompts, ``G`` each, ordered prompt-major (``b = p * G + g``).

    Attributes:
        prompt_ids: ``[B, Lp]`` int64, left-padded with the pad id.
        prompt_mask: ``[B, Lp]`` bool, 1 on real prompt tokens.
        response_ids: ``[B, T]`` int64, right-padded with the pad id after EOS.
        response_mask: ``[B, T]`` bool, 1 on generated tokens including the EOS.
        rollout_log_probs: ``[B, T]`` float32 log-probs of the sampled tokens under the sampling
            distribution (0 where the mask is 0).
        group_ids: ``[B]`` int64 prompt index ``p`` of each sequence.
        prompts: ``P`` prompt texts.
        responses: ``B`` decoded response texts (special tokens removed).
        truncated: ``[B]`` bool, True where the response reached ``max_new_tokens`` without an
            EOS (set by the backends; None: unknown, treated as "length == T" by the batch
            transforms).
        loss_mask: ``[B, T]`` bool within ``response_mask``: the tokens the policy loss counts
            (None: all of ``response_mask``). Set by batch transforms (``overlong_filter``).
        teacher_log_probs: ``[B, T]`` float log-probs of the sampled tokens under a teacher (on-policy
            distillation, ``skyrl_fn.trainer.teacher``; 0 where the mask is 0), or None.
        extras: the task's per-sample fields by name (``skyrl_fn.tasks.scoring``: reward
            components and the like), each ``[B]`` or ``[B, T]`` floating; they reach
            ``AdvantageInput.extras`` and ``PolicyLossInput.extras`` under their names. Kept row
            by row by :meth:`select` and :func:`concat_rollouts`.
    """

    prompt_ids: torch.Tensor = _long("prompt_ids")
    prompt_mask: torch.Tensor = attrs.field(converter=lambda x: as_mask("prompt_mask", x))
    response_ids: torch.Tensor = _long("response_ids")
    response_mask: torch.Tensor = attrs.field(converter=lambda x: as_mask("response_mask", x))
    rollout_log_probs: torch.Tensor = attrs.field()
    group_ids: torch.Tensor = _long("group_ids")
    prompts: tuple[str, ...] = attrs.field(converter=tuple)
    responses: tuple[str, ...] = attrs.field(converter=tuple)
    truncated: torch.Tensor | None = attrs.field(default=None, converter=lambda x: None if x is None else as_mask("truncated", x))
    loss_mask: torch.Tensor | None = attrs.field(default=None, converter=lambda x: None if x is None else as_mask("loss_mask", x))
    teacher_log_probs: torch.Tensor | None = attrs.field(default=None)
    extras: Mapping[str, torch.Tensor] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        if self.response_ids.dim() != 2 or self.prompt_ids.dim() != 2:
            raise ValueError(
                f"prompt_ids/response_ids: expected [B, Lp] and [B, T], got "
                f"{tuple(self.prompt_ids.shape)} and {tuple(self.response_ids.shape)}"
            )
        b, t = self.response_ids.shape
        check_shape("prompt_ids", self.prompt_ids, (b, None), "[B, Lp]")
        check_shape("prompt_mask", self.prompt_mask, tuple(self.prompt_ids.shape), "[B, Lp]")
        check_shape("response_mask", self.response_mask, (b, t), "[B, T]")
        check_floating("rollout_log_probs", self.rollout_log_probs)
        check_shape("rollout_log_probs", self.rollout_log_probs, (b, t), "[B, T]")
        check_shape("group_ids", self.group_ids, (b,), "[B]")
        if len(self.responses) != b:
            raise ValueError(f"responses: expected {b} texts (B), got {len(self.responses)}")
        if b and (int(self.group_ids.max()) >= len(self.prompts) or int(self.group_ids.min()) < 0):
            raise ValueError(f"group_ids: expected values in [0, {len(self.prompts)}) (P prompts), got {self.group_ids.tolist()}")
        # A response mask must be a prefix: no generated token after padding.
        if t > 1 and bool((self.response_mask[:, 1:] & ~self.response_mask[:, :-1]).any()):
            raise ValueError("response_mask: expected each row to be 1s then 0s (right padding)")
        if self.truncated is not None:
            check_shape("truncated", self.truncated, (b,), "[B]")
        if self.loss_mask is not None:
            check_shape("loss_mask", self.loss_mask, (b, t), "[B, T]")
            if bool((self.loss_mask & ~self.response_mask).any()):
                raise ValueError("loss_mask: expected 1 only where response_mask is 1, got 1 on a padding position")
        if self.teacher_log_probs is not None:
            check_floating("teacher_log_probs", self.teacher_log_probs)
            check_shape("teacher_log_probs", self.teacher_log_probs, (b, t), "[B, T]")
        for key, x in self.extras.items():
            check_floating(f"extras[{key!r}]", x)
            check_shape(f"extras[{key!r}]", x, (b,) if x.dim() == 1 else (b, t), "[B] or [B, T]")

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.response_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        """``P``."""
        return len(self.prompts)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [B, Lp + T]`` and ``attention_mask [B, Lp + T]`` (bool) of prompt + response."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask

    def response_lengths(self) -> torch.Tensor:
        """``[B]`` int64 number of generated tokens."""
        return self.response_mask.sum(-1)

    def effective_loss_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: ``loss_mask``, or ``response_mask`` when none was set."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """Rows ``rows`` (``[B']`` int64, repeats allowed) with every per-row field; prompts that
        keep no row are dropped and the group ids renumbered ``0..P'-1`` in order of appearance."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        old = self.group_ids[rows]
        order: dict[int, int] = {}
        for g in old.tolist():
            order.setdefault(g, len(order))
        new_ids = torch.tensor([order[g] for g in old.tolist()], dtype=torch.long)

        def pick(x):
            return None if x is None else x[rows]

        return RolloutBatch(
            prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows], response_ids=self.response_ids[rows],
            response_mask=self.response_mask[rows], rollout_log_probs=self.rollout_log_probs[rows], group_ids=new_ids,
            prompts=[self.prompts[g] for g in order], responses=[self.responses[i] for i in rows.tolist()],
            truncated=pick(self.truncated), loss_mask=pick(self.loss_mask), teacher_log_probs=pick(self.teacher_log_probs),
            extras={k: v[rows] for k, v in self.extras.items()},
        )


def concat_rollouts(parts: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One ``RolloutBatch`` from several (prompts left-padded, responses right-padded to the
    longest with ``pad_id``; group ids offset so prompt ``p`` of part ``k`` keeps its rows).
    ``truncated`` and ``teacher_log_probs`` are joined when every part has them, ``loss_mask``
    when any has one; ``extras`` key by key (every part must hold the same keys; ``[B, T]`` ones
    right-padded with 0).

    Raises:
        ValueError: parts with different ``extras`` keys.
    """
    keys = [sorted(p.extras) for p in parts]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"extras: expected the same per-sample fields in every part, got {keys}")
    if len(parts) == 1:
        return parts[0]
    lp = max(p.prompt_ids.shape[1] for p in parts)
    t = max(p.response_ids.shape[1] for p in parts)

    def left(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += p.num_prompts
    truncated = None if any(p.truncated is None for p in parts) else torch.cat([p.truncated for p in parts])
    teacher = None if any(p.teacher_log_probs is None for p in parts) else torch.cat([right(p.teacher_log_probs, t, 0.0) for p in parts])
    loss_mask = None
    if any(p.loss_mask is not None for p in parts):
        loss_mask = torch.cat([right(p.effective_loss_mask(), t, False) for p in parts])
    return RolloutBatch(
        prompt_ids=torch.cat([left(p.prompt_ids, lp, pad_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, lp, False) for p in parts]),
        response_ids=torch.cat([right(p.response_ids, t, pad_id) for p in parts]),
        response_mask=torch.cat([right(p.response_mask, t, False) for p in parts]),
        rollout_log_probs=torch.cat([right(p.rollout_log_probs, t, 0.0) for p in parts]),
        group_ids=torch.cat([p.group_ids + o for p, o in zip(parts, offsets)]),
        prompts=[s for p in parts for s in p.prompts],
        responses=[s for p in parts for s in p.responses],
        truncated=truncated, loss_mask=loss_mask, teacher_log_probs=teacher,
        extras={k: torch.cat([v if v.dim() == 1 else right(v, t, 0.0) for v in (p.extras[k] for p in parts)]) for k in keys[0]},
    )


@runtime_checkable
class RolloutBackend(Protocol):
    """What the training loop needs from a rollout engine.

    ``generate`` samples ``samples_per_prompt`` responses for each prompt with the engine's current
    weights; ``sync_weights`` loads the trainer's weights (a no-op when the engine shares the
    trainer's module in-process).
    """

    def generate(self, prompts: Sequence[str], *, seed: int) -> RolloutBatch:
        """Sample ``G`` responses for each of the ``P`` prompts; deterministic for a fixed seed."""
        ...

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load policy weights (parameter name -> tensor)."""
        ...


class HFBackend:
    """In-process sampling with a transformers causal LM (KV-cached loop; see ``generate``)."""

    def __init__(self, model: nn.Module, tokenizer, cfg: RolloutConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` into the model (in-process the backend shares the trainer's module
        and nothing needs syncing)."""
        self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, seed: int, first_prompt: int = 0) -> RolloutBatch:
        """Sample ``G = cfg.samples_per_prompt`` responses per prompt (KV-cached loop).

        Prompts go through the tokenizer's chat template when it has one (``encode_prompts``).
        Each row stops at an EOS id (``eos_token_ids``: the tokenizer's and the model's
        generation config's; kept, masked 1) or after ``max_new_tokens``; later positions hold
        the pad id with mask 0.

        Seeds: prompt ``p`` of this call is prompt ``first_prompt + p`` of the step, and its ``G``
        rows draw from their own generator seeded with ``prompt_seed(seed, first_prompt + p)``
        (``skyrl_fn.rollout.sampling``; one uniform per row and token, inverse-CDF sampling). So a
        prompt's responses depend on the weights, the step's seed and its index only, not on
        which other prompts share the batch: data-parallel ranks that each sample a share of the
        step's prompts (``first_prompt`` = the share's offset) draw what one worker would.
        """
        from transformers import DynamicCache

        cfg, tok, model = self.cfg, self.tokenizer, self.model
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got none")
        g_per = cfg.samples_per_prompt
        device = next(model.parameters()).device
        enc_ids, enc_mask = encode_prompts(tok, prompts)
        ids = enc_ids.repeat_interleave(g_per, 0).to(device)
        attn = enc_mask.repeat_interleave(g_per, 0).to(device)
        b = ids.shape[0]
        eos, pad = eos_token_ids(tok, model), tok.pad_token_id
        eos_t = torch.tensor(eos, device=device)
        gens = [torch.Generator(device=device).manual_seed(prompt_seed(seed, first_prompt + p)) for p in range(len(prompts))]
        pos = position_ids(attn)
        cache = {cache_keyword(model): DynamicCache()}
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **cache).logits[:, -1]
        next_pos = pos[:, -1:] + 1
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        out_ids, out_lp, out_mask = [], [], []
        for t in range(cfg.max_new_tokens):
            logp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
            probs = nucleus_probs(logp.exp(), cfg.top_p) if cfg.top_p < 1.0 else logp.exp()
            u = torch.cat([torch.rand(g_per, generator=g, device=device) for g in gens])
            nxt = inverse_cdf_sample(probs, u)
            # The log-prob under the distribution sampled from (skyrl_fn.rollout.sampling), as the learner's.
            tok_lp = logp.gather(-1, nxt[:, None]).squeeze(-1)
            if cfg.top_p < 1.0:
                tok_lp = tok_lp - nucleus_log_mass(logits, nxt, temperature=cfg.temperature, top_p=cfg.top_p)
            alive = ~finished
            nxt = torch.where(alive, nxt, pad)
            out_ids.append(nxt)
            out_lp.append(torch.where(alive, tok_lp, 0.0))
            out_mask.append(alive)
            finished = finished | (alive & torch.isin(nxt, eos_t))
            truncated = alive & ~finished  # still going after this token: cut off if the budget ends here
            if bool(finished.all()) or t == cfg.max_new_tokens - 1:
                break
            attn = torch.cat([attn, alive[:, None].long()], dim=1)
            logits = model(
                input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True, **cache
            ).logits[:, -1]
            next_pos = next_pos + 1
        response_ids = torch.stack(out_ids, 1).cpu()
        response_mask = torch.stack(out_mask, 1).cpu()
        texts = []
        for row, m in zip(response_ids.tolist(), response_mask.tolist()):
            kept = [x for x, keep in zip(row, m) if keep and x not in eos]
            texts.append(tok.decode(kept, skip_special_tokens=True))
        return RolloutBatch(
            prompt_ids=ids.cpu(), prompt_mask=attn[:, : ids.shape[1]].cpu().bool(), response_ids=response_ids,
            response_mask=response_mask, rollout_log_probs=torch.stack(out_lp, 1).cpu(),
            group_ids=torch.arange(len(prompts)).repeat_interleave(g_per), prompts=tuple(prompts), responses=texts,
            truncated=truncated.cpu() if len(out_ids) == cfg.max_new_tokens else torch.zeros(b, dtype=torch.bool),
        )


def cache_keyword(model: nn.Module) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache by: ``cache`` (transformers >= 5.2x,
    where ``past_key_values`` warns that it is deprecated) or ``past_key_values`` (older releases)."""
    forward = getattr(model, "forward", model)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def hf_backend(model: nn.Module, tokenizer, rollout: RolloutConfig, *, seed: int = 0, colocated: bool = True) -> HFBackend:
    """The built-in rollout backend ``hf``: :class:`HFBackend` around ``model`` (``seed`` and
    ``colocated`` concern engines with their own weights; this one shares the module)."""
    return HFBackend(model, tokenizer, rollout)


def check_available(factory, rollout: RolloutConfig) -> None:
    """Run ``factory.check_available(rollout)`` if the backend factory has one (vllm: the package
    and a CUDA device), so a backend that cannot run here fails before any model loads.

    Raises:
        BackendUnavailableError: what is missing and how to get it.
    """
    check = getattr(factory, "check_available", None)
    if check is not None:
        check(rollout)
