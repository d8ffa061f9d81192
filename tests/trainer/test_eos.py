"""EOS, padding and masks with a real HF tokenizer (a ChatML byte-level BPE built from a GGUF
file written here), on the sampling path (HFBackend) and the greedy evaluation path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from skyrl_fn.models.model import ModelConfig, eos_token_ids, load_model, load_tokenizer
from skyrl_fn.rollout.base import HFBackend, RolloutConfig
from skyrl_fn.trainer.evaluate import evaluate, greedy_responses

from tiny_gguf import write_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("eos")
    write_tiny_gguf(str(d / "tiny.gguf"))
    cfg = ModelConfig(name_or_path=str(d / "tiny.gguf"), cache_dir=str(d / "cache"))
    tok = load_tokenizer(cfg)
    return tok, load_model(cfg, tok).eval()


class Scripted(nn.Module):
    """Row ``b`` emits token ``word`` for ``stop[b]`` steps, then ``end`` (then anything).

    Answers the backend's calls (prefill, then one token per call with a KV cache) with logits
    that put all the mass on the scripted token.
    """

    def __init__(self, vocab: int, stop: list[int], *, word: int, end: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.vocab, self.stop, self.word, self.end = vocab, torch.tensor(stop), word, end
        self.t = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        if input_ids.shape[1] > 1:
            self.t = 0  # prefill: a new batch
        else:
            self.t += 1
        b = input_ids.shape[0]
        stop = self.stop.repeat((b + len(self.stop) - 1) // len(self.stop))[:b]
        target = torch.where(self.t < stop, self.word, self.end)
        logits = torch.full((b, input_ids.shape[1], self.vocab), -30.0)
        logits[torch.arange(b), -1, target] = 30.0
        return type("Out", (), {"logits": logits})()


def test_sampled_masks_stop_at_eos_with_the_chat_tokenizer(real):
    tok, _ = real
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok.convert_tokens_to_ids("he")
    stop = [0, 1, 3, 6]  # EOS first, after 1, after 3, never within the budget of 5
    model = Scripted(len(tok), stop, word=word, end=eos)
    r = HFBackend(model, tok, RolloutConfig(samples_per_prompt=2, max_new_tokens=5)).generate(["hi", "a longer prompt"], seed=0)
    lengths = r.response_mask.sum(-1).tolist()
    assert lengths == [1, 2, 4, 5]  # each row through its EOS, or the budget (B = 2 prompts x 2)
    for i, n in enumerate(lengths):
        ids = r.response_ids[i]
        ended = stop[i % 4] < 5
        assert (ids[n - 1] == eos) == ended and not (ids[: n - 1] == eos).any()
        assert (ids[n:] == tok.pad_token_id).all() and not r.response_mask[i, n:].any()
        assert r.responses[i] == "he" * (n - int(ended))  # no special tokens in the text
    # prompts are chat-formatted and left-padded, the pad masked
    assert tok.decode(r.prompt_ids[0][r.prompt_mask[0]]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not r.prompt_mask[0, 0] and r.prompt_mask[2].all()
    assert r.prompts == ("hi", "a longer prompt")


def test_a_generation_config_eos_also_ends_a_response(real):
    tok, _ = real
    other = tok.convert_tokens_to_ids("<|endoftext|>")
    model = Scripted(len(tok), [2], word=tok.convert_tokens_to_ids("he"), end=other)
    model.generation_config = type("G", (), {"eos_token_id": [other]})()
    assert eos_token_ids(tok, model) == (tok.eos_token_id, other)
    r = HFBackend(model, tok, RolloutConfig(samples_per_prompt=1, max_new_tokens=6)).generate(["x"], seed=0)
    assert r.response_mask.sum().item() == 3 and r.response_ids[0, 2] == other and r.responses == ("hehe",)


def test_greedy_evaluation_reports_lengths_through_eos(real):
    tok, model = real
    texts, lengths, ended = greedy_responses(model, tok, ["hi", "the", "a longer prompt"], max_new_tokens=6, batch_size=2)
    assert len(texts) == 3 and ((lengths <= 6) & (lengths >= 0)).all()
    assert ((lengths == 6) | ended).all()
    # A model whose every greedy token is an EOS id: one-token responses, all ended, empty text.
    import copy

    stopper = copy.deepcopy(model)
    with torch.no_grad():
        stopper.model.norm.weight.zero_()  # all logits 0: argmax is id 0
    stopper.generation_config.eos_token_id = [0]
    texts, lengths, ended = greedy_responses(stopper, tok, ["hi", "the"], max_new_tokens=6)
    assert texts == ["", ""] and lengths.tolist() == [1, 1] and ended.all()


def test_evaluate_scores_with_the_task_reward(real):
    from skyrl_fn.tasks.arithmetic import ArithmeticTask

    tok, model = real
    task = ArithmeticTask(split="eval")
    examples = [task.example(i) for i in range(3)]
    out = evaluate(model, tok, task, examples, max_new_tokens=4)
    assert set(out) == {"eval_accuracy", "eval_reward", "eval_response_length", "eval_eos_rate", "eval_seconds", "eval_size"}
    assert out["eval_size"] == 3 and 0 <= out["eval_accuracy"] <= out["eval_reward"] + 1e-9 <= 1 + 1e-9

    class Always:
        name = "always"

        def reward(self, response, example):
            return 1.0

    assert evaluate(model, tok, Always(), examples, max_new_tokens=2)["eval_accuracy"] == 1.0
    with pytest.raises(ValueError, match="examples"):
        evaluate(model, tok, task, [], max_new_tokens=2)
