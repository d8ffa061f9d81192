"""The learner's forward passes run on the attended columns only: the same log-probs, entropies,
values, losses and gradients as on the whole padded batch."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyrl_fn.models.model import build_critic, build_tiny_model, build_tokenizer, position_ids
from skyrl_fn.rollout.base import HFBackend
from skyrl_fn.trainer import forward
from skyrl_fn.trainer.critic import critic_update
from skyrl_fn.trainer.forward import attended_columns, response_values, sequence_log_probs
from skyrl_fn.trainer.learner import batched_log_probs, batched_values, make_experience, make_train_state, policy_update
from skyrl_fn.trainer.run import resolve

PROMPTS = ["n:74>", "n:35>", "n:0>"]


@pytest.fixture
def sampled(make_config):
    cfg = make_config()
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    rollout = HFBackend(model.eval(), tok, cfg.rollout).generate(PROMPTS, seed=0)
    return cfg, tok, model, rollout


def _padded(ids, mask, t, left: int, right: int, pad_id: int):
    """``ids``/``mask`` with ``left`` more prompt-padding columns and ``right`` more response columns."""
    b = ids.shape[0]
    ids = torch.cat([torch.full((b, left), pad_id), ids, torch.full((b, right), pad_id)], dim=1)
    mask = torch.cat([torch.zeros(b, left, dtype=torch.bool), mask.bool(), torch.zeros(b, right, dtype=torch.bool)], dim=1)
    return ids, mask, t + right


def _untrimmed_log_probs(model, ids, mask, t):
    """The reference: every column through the model, ``log softmax`` of the response's logits."""
    am = mask.long()
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids(am), use_cache=False).logits[:, -t - 1 : -1].float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, ids[:, -t:].unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_attended_columns_keep_every_attended_token_and_one_response_column():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert attended_columns(mask, 4) == (1, 6)  # prompt 4 columns, responses of 1 and 2 tokens
    none = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)  # no response token attended
    assert attended_columns(none, 2) == (1, 4)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert attended_columns(empty, 2) == (2, 4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(left=st.integers(0, 3), right=st.integers(0, 5), rows=st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True))
def test_log_probs_entropy_and_gradients_equal_the_untrimmed_pass(sampled, left, right, rows):
    cfg, tok, model, rollout = sampled
    ids, mask = rollout.sequences()
    index = torch.tensor(rows)
    ids, mask, t = _padded(ids[index], mask[index], rollout.response_ids.shape[1], left, right, int(tok.pad_token_id))
    resp = mask[:, -t:]
    weights = torch.linspace(-1, 1, t)[None, :] * resp
    got_model, want_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    lp, ent = sequence_log_probs(got_model, ids, mask, t, with_entropy=True)
    want_lp, want_ent = _untrimmed_log_probs(want_model, ids, mask, t)
    assert lp.shape == ent.shape == (len(rows), t)
    torch.testing.assert_close(lp[resp], want_lp[resp], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[resp], want_ent[resp], atol=1e-5, rtol=1e-5)
    kept = t - (ids.shape[1] - attended_columns(mask, t)[1])
    assert not lp[:, kept:].any() and not ent[:, kept:].any()  # after the longest response: 0, not computed
    (torch.where(resp, lp, 0.0) * weights).sum().backward()
    (torch.where(resp, want_lp, 0.0) * weights).sum().backward()
    for (name, p), q in zip(got_model.named_parameters(), want_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_critic_values_equal_the_untrimmed_pass(sampled):
    cfg, tok, _, rollout = sampled
    critic = build_critic(cfg.model, tok, seed=0).eval()
    ids, mask = rollout.sequences()
    ids, mask, t = _padded(ids, mask, rollout.response_ids.shape[1], 2, 3, int(tok.pad_token_id))
    with torch.no_grad():
        got = response_values(critic, ids[:2], mask[:2], t)
        want = critic(ids[:2], mask[:2].long())[:, -t - 1 : -1]
    resp = mask[:2, -t:]
    torch.testing.assert_close(got[resp], want[resp], atol=1e-5, rtol=1e-5)


def _untrimmed(monkeypatch):
    monkeypatch.setattr(forward, "attended_columns", lambda mask, t: (0, mask.shape[1]))


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "prompt_mean"])
def test_a_trimmed_update_gives_the_untrimmed_loss_and_gradient(make_config, table, monkeypatch, reduction):
    # micro-batches of 2 rows: each is cut to its own longest response, shorter than the batch's
    cfg = make_config(algorithm={"loss_reduction": reduction}, rollout={"samples_per_prompt": 4}, trainer={"micro_batch_size": 2, "grad_clip": 0.0})
    run = resolve(cfg, table)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    rollout = HFBackend(model.eval(), tok, cfg.rollout).generate(PROMPTS, seed=0)
    lengths = rollout.response_mask.sum(-1)
    assert (lengths.view(-1, 2).max(-1).values < rollout.response_ids.shape[1]).any()  # some micro-batch is cut
    exp, _ = make_experience(run, rollout, torch.linspace(0, 1, rollout.batch_size))

    def update():
        m = copy.deepcopy(model)
        out = policy_update(run, make_train_state(m, lr=1e-12), exp)  # old log-probs from the first pass
        return {n: p.grad.clone() for n, p in m.named_parameters()}, out

    cut, got = update()
    with monkeypatch.context() as mp:
        _untrimmed(mp)
        whole, want = update()
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
    for k in whole:
        torch.testing.assert_close(cut[k], whole[k], atol=1e-6, rtol=1e-4, msg=k)


def test_trimmed_batched_passes_and_critic_update_equal_the_untrimmed(make_config, table, monkeypatch):
    cfg = make_config(algorithm={"advantage_estimator": "gae"}, rollout={"samples_per_prompt": 4}, trainer={"micro_batch_size": 2, "grad_clip": 0.0})
    run = resolve(cfg, table)
    tok = build_tokenizer()
    model = build_tiny_model(cfg.model, tok, seed=0)
    critic = build_critic(cfg.model, tok, seed=0)
    rollout = HFBackend(model.eval(), tok, cfg.rollout).generate(PROMPTS, seed=0)

    def passes():
        lp = batched_log_probs(model, rollout, micro_batch_size=2)
        values = batched_values(critic, rollout, micro_batch_size=2)
        exp, _ = make_experience(run, rollout, torch.linspace(0, 1, rollout.batch_size), old_log_probs=lp, values=values)
        c = copy.deepcopy(critic)
        out = critic_update(run, make_train_state(c, lr=1e-12), exp)
        return lp, values, out, {n: p.grad.clone() for n, p in c.named_parameters()}

    got = passes()
    with monkeypatch.context() as mp:
        _untrimmed(mp)
        want = passes()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[2]["value_loss"] == pytest.approx(want[2]["value_loss"], rel=1e-5, abs=1e-7)
    for k in want[3]:
        torch.testing.assert_close(got[3][k], want[3][k], atol=1e-6, rtol=1e-4, msg=k)
