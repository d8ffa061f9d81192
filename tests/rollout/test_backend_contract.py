"""The rollout-backend contract, run against every backend that can run here.

``hf`` runs everywhere; ``vllm`` is skipped (with the reason: package and/or CUDA missing) unless
vLLM and a CUDA GPU are present. On a GPU machine with ``pip install -e '.[vllm]'`` this file is
the acceptance test of the vLLM backend::

    pytest tests/rollout/test_backend_contract.py -rs

Contract (``skyrl_fn.rollout.base.RolloutBatch``): same fields and dtypes; ``B = P * G`` rows,
prompt-major; prompt ids are our tokenizer's, left-padded; ``response_mask`` is 1 exactly on the
generated tokens up to and including EOS (a row without EOS has ``max_new_tokens`` tokens);
rollout log-probs equal a forward pass of the same weights (``log softmax(z / tau)``); a seed
gives the same batch; ``sync_weights`` makes the next batch come from the new weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch

from skyrl_fn.rollout.vllm_backend import make_vllm_backend, vllm_unavailable_reason
from skyrl_fn.models.model import DIGITS_ALPHABET, ModelConfig, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend, RolloutBatch, RolloutConfig
from skyrl_fn.trainer.learner import batched_log_probs

BACKENDS = ("hf", "vllm")
PROMPTS = ("n:12>", "c:3456>", "r:9>")
# head_dim 64: a size every vLLM attention backend supports.
MODEL = ModelConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, max_position_embeddings=64)
BASE = RolloutConfig(samples_per_prompt=8, max_new_tokens=12, temperature=1.0, top_p=1.0, gpu_memory_utilization=0.3)
# Max |rollout - forward| log-prob error. hf shares the kernels, but sampling with the KV cache
# and one full forward pass still differ by float32 rounding that depends on the CPU's kernels
# (seen up to 1.03e-4 on one Xeon); vLLM (fp32 weights) does not share them. A stale policy is
# off by far more (asserted > 10x).
ATOL = {"hf": 5e-4, "vllm": 2e-2}


def unavailable(name: str) -> str | None:
    return None if name == "hf" else vllm_unavailable_reason()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(DIGITS_ALPHABET)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(MODEL, tokenizer, seed=0).eval()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, model, tokenizer):
    """One backend per kind for the whole module (a vLLM engine takes tens of seconds to start)."""
    reason = unavailable(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    if request.param == "hf":
        b = HFBackend(model, tokenizer, BASE)
    else:
        b = make_vllm_backend(BASE, model, tokenizer, colocated=False)
    b.name = request.param
    yield b
    if request.param == "vllm":
        del b.llm
        torch.cuda.empty_cache()


@contextlib.contextmanager
def sampling(backend, **changes):
    """Per-call sampling settings (both backends read ``backend.cfg`` at every ``generate``)."""
    saved = backend.cfg
    backend.cfg = dataclasses.replace(saved, **changes)
    try:
        yield backend.cfg
    finally:
        backend.cfg = saved


def forward_log_probs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    return batched_log_probs(model, batch, micro_batch_size=64, temperature=temperature)


def test_record_fields_shapes_and_dtypes(backend):
    batch = backend.generate(PROMPTS, seed=0)
    p, g = len(PROMPTS), BASE.samples_per_prompt
    assert isinstance(batch, RolloutBatch)
    assert batch.batch_size == p * g and batch.num_prompts == p and batch.prompts == PROMPTS
    assert batch.prompt_ids.dtype == batch.response_ids.dtype == batch.group_ids.dtype == torch.long
    assert batch.prompt_mask.dtype == batch.response_mask.dtype == torch.bool
    assert batch.rollout_log_probs.dtype == torch.float32
    assert 1 <= batch.response_ids.shape[1] <= BASE.max_new_tokens
    assert len(batch.responses) == p * g and all(isinstance(r, str) for r in batch.responses)
    assert all(t.device.type == "cpu" for t in (batch.prompt_ids, batch.response_ids, batch.rollout_log_probs))


def test_prompt_ids_are_our_tokenizer_left_padded(backend, tokenizer):
    batch = backend.generate(PROMPTS, seed=1)
    g = BASE.samples_per_prompt
    for r in range(batch.batch_size):
        ids = tokenizer(PROMPTS[r // g], add_special_tokens=False)["input_ids"]
        n = len(ids)
        assert batch.prompt_ids[r, -n:].tolist() == ids
        assert batch.prompt_mask[r].tolist() == [False] * (batch.prompt_ids.shape[1] - n) + [True] * n


def test_response_mask_covers_generated_tokens_up_to_and_including_eos(backend, tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = backend.generate(PROMPTS, seed=2)
    ended = truncated = 0
    for ids, mask, lp in zip(batch.response_ids.tolist(), batch.response_mask.tolist(), batch.rollout_log_probs):
        n = sum(mask)
        assert n >= 1 and mask == [True] * n + [False] * (len(mask) - n)
        assert eos not in ids[: n - 1], "a token after EOS is marked as generated"
        if ids[n - 1] == eos:
            ended += 1
        else:
            assert n == BASE.max_new_tokens, "a row stopped early without EOS"
            truncated += 1
        assert ids[n:] == [pad] * (len(ids) - n)
        assert torch.all(lp[n:] == 0) and torch.all(torch.isfinite(lp[:n])) and torch.all(lp[:n] <= 0)
    # 24 rows of up to 12 tokens from a random 20-token model: both cases occur.
    assert ended > 0 and truncated > 0, (ended, truncated)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_match_a_forward_pass(backend, model, temperature):
    with sampling(backend, temperature=temperature):
        batch = backend.generate(PROMPTS, seed=3)
    ref = forward_log_probs(model, batch, temperature)
    m = batch.response_mask
    err = (batch.rollout_log_probs - ref).abs()[m].max()
    assert err <= ATOL[backend.name], f"max |rollout - forward| = {float(err):.2e} at temperature {temperature}"


@pytest.mark.parametrize("g", [1, 3])
def test_samples_per_prompt_are_grouped_prompt_major(backend, g):
    with sampling(backend, samples_per_prompt=g):
        batch = backend.generate(PROMPTS, seed=4)
    assert batch.batch_size == len(PROMPTS) * g
    assert batch.group_ids.tolist() == [p for p in range(len(PROMPTS)) for _ in range(g)]
    for p in range(len(PROMPTS)):
        rows = batch.prompt_ids[p * g : (p + 1) * g]
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_same_seed_same_batch_other_seed_other_batch(backend):
    a = backend.generate(PROMPTS, seed=5)
    b = backend.generate(PROMPTS, seed=5)
    c = backend.generate(PROMPTS, seed=6)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.allclose(a.rollout_log_probs, b.rollout_log_probs, atol=1e-6)
    assert a.responses == b.responses
    assert not (a.response_ids.shape == c.response_ids.shape and torch.equal(a.response_ids, c.response_ids))


def test_samples_of_one_prompt_differ(backend):
    batch = backend.generate(PROMPTS[:1], seed=7)
    rows = {tuple(r) for r in batch.response_ids.tolist()}
    assert len(rows) > 1, "all G samples of a prompt are identical"


def test_sync_weights_makes_the_next_batch_come_from_the_new_weights(backend, model):
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old = copy.deepcopy(model).eval()
    new = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        for p in new.parameters():
            p.add_(0.5 * torch.randn_like(p))
    try:
        backend.sync_weights({k: v.detach().clone() for k, v in new.state_dict().items()})
        batch = backend.generate(PROMPTS, seed=8)
        m = batch.response_mask
        err_new = (batch.rollout_log_probs - forward_log_probs(new, batch, 1.0)).abs()[m].max()
        err_old = (batch.rollout_log_probs - forward_log_probs(old, batch, 1.0)).abs()[m].max()
        assert err_new <= ATOL[backend.name], f"after sync: max |rollout - new forward| = {float(err_new):.2e}"
        assert err_old > 10 * ATOL[backend.name], "rollout log-probs still match the old weights"
    finally:
        backend.sync_weights(original)
        model.load_state_dict(original)
