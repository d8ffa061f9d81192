"""On-policy distillation: the per-token term is the reverse KL's estimate, a student trained on it
gets closer to its teacher (exact reverse KL over the vocabulary), and a teacher with another
vocabulary, or ``distill`` without a teacher, is refused before training."""

from __future__ import annotations

import attrs
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.estimators import distill_term
from skyrl_fn.cli.preflight import PreflightError, preflight
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.models.model import ModelConfig, encode_prompts, load_model, load_tokenizer
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train
from skyrl_fn.tasks.base import DataState, next_prompts

from trainer.teachers import TINY, save_teacher


def test_the_term_is_minus_the_reverse_kl_in_expectation():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7).log_softmax(-1), torch.randn(5, 7).log_softmax(-1)
    # every token y of the vocabulary as a "sample", weighted by the student's probability of it
    term = distill_term(student, teacher, torch.ones(5, 7, dtype=torch.bool), coef=0.5)
    expected = (student.exp() * term).sum(-1)
    reverse_kl = (student.exp() * (student - teacher)).sum(-1)
    torch.testing.assert_close(expected, -0.5 * reverse_kl)
    assert (distill_term(student, teacher, torch.zeros(5, 7, dtype=torch.bool)) == 0).all()
    with pytest.raises(ValueError, match="expected one shape"):
        distill_term(student, teacher[:, :3], torch.ones(5, 7, dtype=torch.bool))


def _reverse_kl(student, teacher, ids, mask) -> float:
    """Exact KL(student || teacher) of the next-token distributions after each prompt."""
    with torch.no_grad():
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        s = student(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].log_softmax(-1)
        t = teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].log_softmax(-1)
    return float((s.exp() * (s - t)).sum(-1).mean())


def test_a_distilled_student_gets_closer_to_its_teacher(make_config, tmp_path):
    path = save_teacher(tmp_path / "teacher")
    cfg = make_config(
        algorithm={"advantage_estimator": "distill"}, teacher={"model": path},
        trainer={"steps": 10, "ckpt_interval": 0, "prompts_per_step": 4, "lr": 1e-2}, rollout={"samples_per_prompt": 8, "max_new_tokens": 3},
    )
    run = resolve(cfg, DEFAULT_TABLE)
    assert run.uses_teacher and not run.uses_reference
    summary = train(run)
    assert all("teacher_kl" in h for h in summary.history)
    task = run.make_task()
    tok = load_tokenizer(cfg.model, alphabet=task.alphabet)
    examples, _ = next_prompts(task, DataState(seed=123), 16, shuffle=True)
    ids, mask = encode_prompts(tok, [e.prompt for e in examples])
    teacher = load_model(ModelConfig(name_or_path=path), load_tokenizer(ModelConfig(name_or_path=path))).eval()
    before = load_model(cfg.model, tok, seed=cfg.trainer.seed).eval()
    after = load_model(cfg.model, tok, seed=cfg.trainer.seed).eval()
    after.load_state_dict(ckpt.load(summary.last_checkpoint).weights["policy"])
    kl_before, kl_after = _reverse_kl(before, teacher, ids, mask), _reverse_kl(after, teacher, ids, mask)
    assert kl_after < 0.6 * kl_before, (kl_before, kl_after)
    # the sampled estimate the run logs falls too
    first, last = summary.history[0]["teacher_kl"], summary.history[-1]["teacher_kl"]
    assert last < first


def test_a_teacher_with_another_vocabulary_is_refused_before_training(make_config, tmp_path):
    path = save_teacher(tmp_path / "letters", alphabet="abcdefghij")
    run = resolve(make_config(teacher={"model": path}), DEFAULT_TABLE)
    with pytest.raises(PreflightError, match=r"teacher.model '.*letters': expected the policy's tokenizer \(the tiny model: \d+ tokens\), got a different vocabulary"):
        preflight(run)
    missing = resolve(make_config(teacher={"model": str(tmp_path / "nowhere")}), DEFAULT_TABLE)
    with pytest.raises(PreflightError, match="teacher.model"):
        preflight(missing)


def test_distill_needs_a_teacher_and_the_teacher_settings_are_checked(make_config):
    with pytest.raises(ValueError, match="teacher.model: advantage estimator 'distill' distils from a teacher"):
        resolve(make_config(algorithm={"advantage_estimator": "distill"}), DEFAULT_TABLE)
    with pytest.raises(ValueError, match="teacher.coef: expected > 0, got 0.0"):
        resolve(make_config(teacher={"model": "tiny", "coef": 0.0}), DEFAULT_TABLE)
    with pytest.raises(ValueError, match="teacher.hidden_size: expected a multiple of teacher.num_heads"):
        resolve(make_config(teacher={"model": "tiny", "hidden_size": 30}), DEFAULT_TABLE)


def test_distillation_added_to_grpo_changes_the_advantages_by_the_term(make_config):
    from skyrl_fn.trainer.experience import make_experience
    from skyrl_fn.trainer.roles import PolicyWorker

    run = resolve(make_config(teacher={"model": "tiny", "coef": 0.5, **TINY}), DEFAULT_TABLE)
    worker = PolicyWorker(run, samples=True)
    task = run.make_task()
    gen = worker.generate(next_prompts(task, DataState(seed=0), 2, shuffle=True)[0], seed=1)
    teacher_lp = torch.where(gen.rollout.response_mask, -1.0, 0.0)
    with_teacher = attrs.evolve(gen.rollout, teacher_log_probs=teacher_lp)
    plain, _ = make_experience(run, gen.rollout, gen.scores)
    distilled, metrics = make_experience(run, with_teacher, gen.scores)
    term = distill_term(gen.rollout.rollout_log_probs, teacher_lp, gen.rollout.response_mask, coef=0.5)
    torch.testing.assert_close(distilled.advantages, plain.advantages + term)
    assert metrics["teacher_kl"] == pytest.approx(float(-(term.sum() / 0.5) / gen.rollout.response_mask.sum()), rel=1e-5)
