"""Rollouts: record invariants, log-probs equal to a forward pass, determinism, backend checks."""

from __future__ import annotations

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer.config import TrainConfig
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.learner import batched_log_probs
from skyrl_fn.models.model import ModelConfig, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import (
    BackendUnavailableError,
    HFBackend,
    RolloutBackend,
    RolloutBatch,
    RolloutConfig,
    hf_backend,
)

PROMPTS = ["n:74>", "n:3>", "c:12345>"]


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64), tok, seed=0).eval()
    return tok, model


def _gen(setup, seed=0, **kw):
    tok, model = setup
    cfg = RolloutConfig(**{"samples_per_prompt": 4, "max_new_tokens": 7, **kw})
    return HFBackend(model, tok, cfg).generate(PROMPTS, seed=seed)


def test_record_invariants(setup):
    tok, _ = setup
    r = _gen(setup)
    b = 3 * 4
    assert isinstance(r, RolloutBatch) and r.batch_size == b and r.num_prompts == 3
    assert r.response_ids.shape == r.response_mask.shape == r.rollout_log_probs.shape
    assert r.response_ids.shape[0] == b and 1 <= r.response_ids.shape[1] <= 7
    assert r.group_ids.tolist() == [p for p in range(3) for _ in range(4)]
    assert r.response_mask.dtype == torch.bool and r.prompt_mask.dtype == torch.bool
    # Prompts: left padded, identical within a group.
    for i in range(b):
        n = len(PROMPTS[i // 4])
        assert r.prompt_mask[i].sum() == n and r.prompt_mask[i, -n:].all()
        assert tok.decode(r.prompt_ids[i][r.prompt_mask[i]]) == PROMPTS[i // 4]
    # Responses: a prefix of generated tokens ending at EOS (or the budget), pad afterwards.
    for i in range(b):
        m = r.response_mask[i]
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any() and n >= 1
        ids = r.response_ids[i]
        assert (ids[n:] == tok.pad_token_id).all()
        eos_at = (ids[:n] == tok.eos_token_id).nonzero().flatten().tolist()
        assert eos_at in ([], [n - 1]) and (eos_at or n == r.response_ids.shape[1])
        assert r.responses[i] == tok.decode(ids[:n][ids[:n] != tok.eos_token_id], skip_special_tokens=True)
    assert (r.rollout_log_probs[~r.response_mask] == 0).all()
    assert (r.rollout_log_probs[r.response_mask] < 0).all()


def test_log_probs_equal_a_forward_pass_at_temperature_one(setup):
    _, model = setup
    r = _gen(setup, seed=3)
    lp = batched_log_probs(model, r, micro_batch_size=5)
    torch.testing.assert_close(lp, r.rollout_log_probs, atol=1e-5, rtol=1e-5)


def test_log_probs_at_other_temperatures_match_the_learner(setup):
    _, model = setup
    r = _gen(setup, seed=4, temperature=0.7)
    lp = batched_log_probs(model, r, micro_batch_size=64, temperature=0.7)
    torch.testing.assert_close(lp, r.rollout_log_probs, atol=1e-5, rtol=1e-5)
    plain = batched_log_probs(model, r, micro_batch_size=64)
    assert not torch.allclose(plain[r.response_mask], r.rollout_log_probs[r.response_mask])


def test_sampling_is_deterministic_per_seed(setup):
    a, b, c = _gen(setup, seed=1), _gen(setup, seed=1), _gen(setup, seed=2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.rollout_log_probs, b.rollout_log_probs)
    assert not torch.equal(a.response_ids, c.response_ids) if a.response_ids.shape == c.response_ids.shape else True


def test_top_p_keeps_a_valid_record(setup):
    r = _gen(setup, top_p=0.5)
    assert r.batch_size == 12 and torch.isfinite(r.rollout_log_probs).all()


def test_record_validation():
    ok = dict(
        prompt_ids=torch.zeros(2, 3, dtype=torch.long), prompt_mask=torch.ones(2, 3, dtype=torch.bool),
        response_ids=torch.zeros(2, 4, dtype=torch.long), response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        rollout_log_probs=torch.zeros(2, 4), group_ids=torch.tensor([0, 0]), prompts=["a"], responses=["x", "y"],
    )
    RolloutBatch(**ok)
    with pytest.raises(ValueError, match="right padding"):
        RolloutBatch(**{**ok, "response_mask": torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])})
    with pytest.raises(ValueError, match="rollout_log_probs"):
        RolloutBatch(**{**ok, "rollout_log_probs": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="response_ids"):
        RolloutBatch(**{**ok, "response_ids": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="group_ids"):
        RolloutBatch(**{**ok, "group_ids": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="responses"):
        RolloutBatch(**{**ok, "responses": ["x"]})


def test_backend_protocol_and_vllm_check(setup, monkeypatch):
    tok, model = setup
    assert isinstance(hf_backend(model, tok, RolloutConfig()), RolloutBackend)
    hf, vllm = (resolve(TrainConfig(rollout=RolloutConfig(backend=b)), DEFAULT_TABLE) for b in ("hf", "vllm"))
    hf.check_backend_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        vllm.check_backend_available()
    with pytest.raises(BackendUnavailableError):
        vllm.make_backend(model, tok)


def test_vllm_fails_before_any_model_loads(make_config, table, monkeypatch):
    from skyrl_fn.trainer import loop
    from skyrl_fn.models import model as model_mod
    from skyrl_fn.trainer import roles
    from skyrl_fn.trainer.run import resolve

    def boom(*a, **k):
        raise AssertionError("a model was built before the backend check")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(roles, "load_model", boom)
    monkeypatch.setattr(model_mod, "build_tiny_model", boom)
    run = resolve(make_config(rollout={"backend": "vllm"}), table)
    with pytest.raises(BackendUnavailableError, match="vllm"):
        loop.train(run)


def test_sampling_emits_no_deprecation_warning():
    """Our own calls into transformers raise no FutureWarning/DeprecationWarning (e.g. the
    ``past_key_values`` keyword, renamed ``cache``)."""
    import warnings

    from skyrl_fn.models.model import ModelConfig
    from skyrl_fn.rollout.base import RolloutConfig
    from skyrl_fn.models.model import build_tiny_model, build_tokenizer
    from skyrl_fn.rollout.base import HFBackend, cache_keyword

    tok = build_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok)
    assert cache_keyword(model) in ("cache", "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = HFBackend(model, tok, RolloutConfig(samples_per_prompt=2, max_new_tokens=3)).generate(["n:12>"], seed=0)
    assert out.batch_size == 2
