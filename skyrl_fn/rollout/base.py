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
from typing import Literal, Protocol, Sequence, runtime_checkable

import attrs
import torch
from torch import nn

from skyrl_fn.core._checks import as_mask, check_floating, check_shape, check_tensor
from skyrl_fn.models.model import encode_prompts, eos_token_ids, position_ids
from skyrl_fn.rollout.sampling import nucleus_log_mass, nucleus_probs

__all__ = [
    "RolloutConfig", "VLLM_TEMPERATURE_RANGE", "RolloutBatch", "RolloutBackend", "HFBackend", "BackendUnavailableError",
]


class BackendUnavailableError(RuntimeError):
    """The requested rollout backend cannot run here (e.g. vllm without CUDA)."""


#: Temperatures every vLLM of the ``[vllm]`` extra samples with as given: ``SamplingParams``
#: raises < 0.01 to 0.01 (0.11 and 0.33) and rejects > 2 (0.33; 0.11 accepted them).
VLLM_TEMPERATURE_RANGE: tuple[float, float] = (0.01, 2.0)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling responses."""

    backend: Literal["hf", "vllm"] = "hf"
    """hf: in-process transformers sampling (CPU or GPU); vllm: needs vllm and CUDA."""
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
    """

    prompt_ids: torch.Tensor = _long("prompt_ids")
    prompt_mask: torch.Tensor = attrs.field(converter=lambda x: as_mask("prompt_mask", x))
    response_ids: torch.Tensor = _long("response_ids")
    response_mask: torch.Tensor = attrs.field(converter=lambda x: as_mask("response_mask", x))
    rollout_log_probs: torch.Tensor = attrs.field()
    group_ids: torch.Tensor = _long("group_ids")
    prompts: tuple[str, ...] = attrs.field(converter=tuple)
    responses: tuple[str, ...] = attrs.field(converter=tuple)

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
    def generate(self, prompts: Sequence[str], *, seed: int) -> RolloutBatch:
        """Sample ``G = cfg.samples_per_prompt`` responses per prompt (KV-cached loop).

        Prompts go through the tokenizer's chat template when it has one (``encode_prompts``).
        Each row stops at an EOS id (``eos_token_ids``: the tokenizer's and the model's
        generation config's; kept, masked 1) or after ``max_new_tokens``; later positions hold
        the pad id with mask 0. Sampling uses a generator seeded with ``seed`` only, so the same
        weights, prompts and seed give the same batch.
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
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) % (2**63 - 1))
        pos = position_ids(attn)
        cache = {cache_keyword(model): DynamicCache()}
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **cache).logits[:, -1]
        next_pos = pos[:, -1:] + 1
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        out_ids, out_lp, out_mask = [], [], []
        for t in range(cfg.max_new_tokens):
            logp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
            probs = nucleus_probs(logp.exp(), cfg.top_p) if cfg.top_p < 1.0 else logp.exp()
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
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
