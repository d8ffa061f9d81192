"""One log-prob definition (temperature, then top-p) in the hf backend and the learner.

Rollout log-probs equal learner log-probs for every top_p; at top_p < 1 both are the nucleus-
renormalised log-probs that vLLM's ``processed_logprobs`` returns (checked against a reference
written from vLLM's rule), and at top_p = 1 nothing changes.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from skyrl_fn.models.model import ModelConfig, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend, RolloutConfig
from skyrl_fn.trainer.forward import batched_log_probs, sequence_log_probs
from skyrl_fn.rollout.sampling import nucleus_log_mass, nucleus_mask, nucleus_probs, sampling_log_probs

PROMPTS = ["n:74>", "n:3>", "c:12345>", "r:901>"]


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    # A fresh model is close to uniform over ~20 tokens: a 0.9 nucleus drops a few of them.
    model = build_tiny_model(ModelConfig(hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64), tok, seed=1).eval()
    return tok, model


def _rollout(setup, **kw):
    tok, model = setup
    cfg = RolloutConfig(**{"samples_per_prompt": 4, "max_new_tokens": 8, **kw})
    return HFBackend(model, tok, cfg).generate(PROMPTS, seed=7)


def _vllm_rule_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """vLLM's top-p rule, written independently: sort ascending, drop while the cumulative mass
    is <= 1 - p, always keep the most probable token."""
    asc, idx = probs.sort(dim=-1)
    drop = asc.cumsum(-1) <= 1 - p
    drop[..., -1] = False
    return torch.zeros_like(drop).scatter(-1, idx, ~drop)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_rollout_log_probs_equal_learner_log_probs(setup, top_p, temperature):
    _, model = setup
    r = _rollout(setup, top_p=top_p, temperature=temperature)
    lp = batched_log_probs(model, r, micro_batch_size=5, temperature=temperature, top_p=top_p)
    torch.testing.assert_close(lp, r.rollout_log_probs, atol=1e-5, rtol=1e-5)


def test_at_top_p_below_one_the_log_probs_are_of_the_nucleus(setup):
    """Rollout log-probs differ from the full softmax by log(nucleus mass) and equal a per-row
    reference built from vLLM's rule (log_softmax over the kept logits)."""
    _, model = setup
    r = _rollout(setup, top_p=0.9, temperature=0.7)
    full = batched_log_probs(model, r, micro_batch_size=64, temperature=0.7)
    m = r.response_mask
    gap = (r.rollout_log_probs - full)[m]
    assert (gap >= -1e-6).all() and (gap > 1e-3).any(), "the nucleus dropped nothing: the test proves nothing"
    ids, am = r.sequences()
    t = r.response_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am.long(), position_ids=_positions(am)).logits[:, -t - 1 : -1].float() / 0.7
    keep = _vllm_rule_mask(torch.softmax(logits, -1), 0.9)
    ref = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(r.rollout_log_probs[m], ref[m], atol=1e-5, rtol=1e-5)


def _positions(am):
    from skyrl_fn.models.model import position_ids

    return position_ids(am.long())


@given(v=st.integers(2, 40), rows=st.integers(1, 4), p=st.floats(0.05, 0.999), seed=st.integers(0, 2**16))
def test_nucleus_mask_follows_vllms_rule(v, rows, p, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, v, generator=gen) * 3, -1)
    mask = nucleus_mask(probs, p)
    assert torch.equal(mask, _vllm_rule_mask(probs, p))
    assert (torch.where(mask, probs, 0).sum(-1) >= p - 1e-6).all()
    q = nucleus_probs(probs, p)
    torch.testing.assert_close(q.sum(-1), torch.ones(rows))
    assert (q[~mask] == 0).all()


def test_top_p_one_is_the_plain_log_softmax_and_costs_nothing():
    logits = torch.randn(3, 5, 11)
    y = torch.randint(0, 11, (3, 5))
    assert torch.equal(nucleus_log_mass(logits, y, temperature=0.5, top_p=1.0), torch.zeros(3, 5))
    plain = torch.log_softmax(logits / 0.5, -1).gather(-1, y[..., None]).squeeze(-1)
    assert torch.equal(sampling_log_probs(logits, y, temperature=0.5, top_p=1.0), plain)


def test_a_token_outside_the_nucleus_keeps_a_finite_log_prob_and_gradient():
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0]], requires_grad=True)
    y = torch.tensor([3])  # far outside the 0.5 nucleus (which is {0})
    lp = sampling_log_probs(logits, y, top_p=0.5)
    # the set is {0, 3}: log(q3 / (q0 + q3))
    q = torch.softmax(logits.detach(), -1)[0]
    assert torch.isclose(lp.detach(), torch.log(q[3] / (q[0] + q[3]))).all()
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1] == 0 and logits.grad[0, 2] == 0


class _LogitsModel(nn.Module):
    """Returns fixed random logits over a large vocabulary (exercises the chunked learner path)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab // 50, generator=torch.Generator().manual_seed(seed)))
        self.proj = nn.Parameter(torch.randn(vocab // 50, vocab, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return types.SimpleNamespace(logits=self.table[input_ids] @ self.proj)


def test_large_vocabulary_path_agrees_with_the_direct_definition_in_value_and_gradient():
    v = 4100  # above forward._CHUNKED_VOCAB
    model = _LogitsModel(v)
    ids = torch.randint(0, v, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    lp, _ = sequence_log_probs(model, ids, mask, 3, temperature=0.8, top_p=0.9)
    logits = model(ids).logits[:, -4:-1]
    ref = sampling_log_probs(logits, ids[:, -3:], temperature=0.8, top_p=0.9)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    (g1,) = torch.autograd.grad(lp.sum(), model.proj)
    (g2,) = torch.autograd.grad(ref.sum(), model.proj)
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        nucleus_mask(torch.ones(1, 2) / 2, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        nucleus_log_mass(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), temperature=0.0, top_p=0.5)
    with pytest.raises(ValueError, match="targets"):
        nucleus_log_mass(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), top_p=0.5)
