"""A saved tiny teacher for the distillation tests."""

from __future__ import annotations

import torch

from skyrl_fn.models.model import ModelConfig, build_tiny_model, build_tokenizer

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def save_teacher(path, *, alphabet: str | None = None, sharpen: float = 6.0, seed: int = 5) -> str:
    """A tiny causal LM with a peaked next-token distribution (its output layer scaled), saved as a
    local HF directory with the character tokenizer over ``alphabet`` (default: the digits task's)."""
    tok = build_tokenizer() if alphabet is None else build_tokenizer(alphabet)
    model = build_tiny_model(ModelConfig(**TINY), tok, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
