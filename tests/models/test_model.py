"""Models and tokenizer: built offline, seeded, loadable from a local directory."""

from __future__ import annotations

import pytest
import torch

from skyrl_fn.models.model import (
    DIGITS_ALPHABET,
    TEXT_ALPHABET,
    ModelConfig,
    build_critic,
    build_tiny_model,
    build_tokenizer,
    load_model,
    load_tokenizer,
    position_ids,
)


def test_tokenizer_round_trip_and_specials():
    tok = build_tokenizer(DIGITS_ALPHABET)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 3 + len(DIGITS_ALPHABET)
    ids = tok("n:74>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tok.decode(ids) == "n:74>"
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "n:74>"
    batch = tok(["n:7>", "c:123>"], padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0][:2] == [0, 0]  # left padding


def test_text_tokenizer_keeps_spaces_and_newlines():
    tok = build_tokenizer(TEXT_ALPHABET)
    text = "Question: 3 + 4?\n#### 7"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_rejects_duplicates():
    with pytest.raises(ValueError, match="alphabet"):
        build_tokenizer("aab")


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    tok = build_tokenizer()
    cfg = ModelConfig()
    state = torch.get_rng_state()
    a, b, c = build_tiny_model(cfg, tok, seed=1), build_tiny_model(cfg, tok, seed=1), build_tiny_model(cfg, tok, seed=2)
    assert torch.equal(state, torch.get_rng_state())
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    n = sum(p.numel() for p in a.parameters())
    assert 50_000 < n < 2_000_000
    logits = a(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, len(tok))


def test_bf16_and_bad_sizes():
    tok = build_tokenizer()
    m = build_tiny_model(ModelConfig(dtype="bf16", hidden_size=32, num_heads=2, num_layers=1), tok)
    assert next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_model(ModelConfig(hidden_size=30, num_heads=4), tok)


def test_load_local_directory(tmp_path):
    tok = build_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64)
    model = build_tiny_model(cfg, tok, seed=5)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    local = ModelConfig(name_or_path=str(tmp_path / "m"))
    tok2 = load_tokenizer(local)
    loaded = load_model(local, tok2)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert tok2.decode(tok2("n:1>", add_special_tokens=False)["input_ids"]) == "n:1>"
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    bf = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), dtype="bf16"), tok2)
    assert next(bf.parameters()).dtype == torch.bfloat16


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected a local HF directory.*downloads are disabled"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))


def test_critic_values_shape_and_positions():
    tok = build_tokenizer()
    critic = build_critic(ModelConfig(hidden_size=32, num_heads=2, num_layers=1), tok)
    ids = torch.tensor([[0, 3, 4], [5, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    v = critic(ids, mask)
    assert v.shape == (2, 3) and v.dtype == torch.float32
    assert position_ids(mask).tolist() == [[0, 0, 1], [0, 1, 2]]
