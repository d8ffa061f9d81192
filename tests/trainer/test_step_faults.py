"""Faults inside a training run: a NaN reward or gradient is skipped and counted (weights and
optimiser untouched), too many in a row stop the run, a raising reward names the sample, a damaged
checkpoint is skipped on resume, an incompatible resume is refused and a compatible one applies."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train
from skyrl_fn.trainer.nonfinite import NonFiniteStepError, SkippedStepWarning
from skyrl_fn.trainer.resume import IncompatibleResumeError
from skyrl_fn.tasks.base import DigitsTask, RewardError


def _weights_at(run_dir, step):
    return ckpt.load(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_reward_skips_the_step_names_the_sample_and_counts(make_config, table, monkeypatch, tmp_path):
    real = DigitsTask.reward
    calls = {"n": 0}

    def reward(self, response, example):
        calls["n"] += 1
        # Step 2 (the second batch of B = 8 samples) gets one NaN at its sample 5.
        return math.nan if calls["n"] == 8 + 6 else real(self, response, example)

    monkeypatch.setattr(DigitsTask, "reward", reward)
    cfg = make_config(trainer={"steps": 3, "ckpt_interval": 1, "keep_checkpoints": 5})
    with pytest.warns(SkippedStepWarning) as caught:
        s = train(resolve(cfg, table))
    (w,) = [str(x.message) for x in caught]
    assert w.startswith("step 2 skipped (1 so far): a non-finite reward: ") and ".<locals>.reward returned nan for sample 5 (prompt " in w
    assert [h["skipped"] for h in s.history] == [0.0, 1.0, 0.0]
    assert [h["skipped_steps"] for h in s.history] == [0.0, 1.0, 1.0]
    run_dir = cfg.logging.run_dir
    before, after = _weights_at(run_dir, 1), _weights_at(run_dir, 2)
    assert _same(before.weights["policy"], after.weights["policy"])  # the NaN never reached the weights
    assert before.optim["policy"]["state"][0]["step"] == after.optim["policy"]["state"][0]["step"]  # nor AdamW
    assert not _same(after.weights["policy"], _weights_at(run_dir, 3).weights["policy"])  # training went on


def _nan_loss_table(table, *, when):
    """The default table plus a policy loss ``nan_at`` that is ``regular`` except on the calls in
    ``when`` (1-based), where the per-token loss is NaN."""
    calls = {"n": 0}
    regular = table.policy_loss("regular")

    def nan_at(batch, **hyper):
        out = regular(batch, **hyper)
        calls["n"] += 1
        if calls["n"] in when:
            import attrs

            return attrs.evolve(out, token_loss=out.token_loss * math.nan)
        return out

    return table.register("nan_at", nan_at, kind="policy_loss")


def test_nan_loss_skips_the_step_with_the_rows(make_config, table):
    cfg = make_config(algorithm={"policy_loss": "nan_at"}, trainer={"steps": 3, "ckpt_interval": 1, "keep_checkpoints": 5})
    with pytest.warns(SkippedStepWarning, match="step 2 skipped \\(1 so far\\): a non-finite loss"):
        s = train(resolve(cfg, _nan_loss_table(table, when={2})))
    assert [h["skipped"] for h in s.history] == [0.0, 1.0, 0.0]
    run_dir = cfg.logging.run_dir
    assert _same(_weights_at(run_dir, 1).weights["policy"], _weights_at(run_dir, 2).weights["policy"])


def test_too_many_consecutive_skips_stop_the_run(make_config, table):
    cfg = make_config(algorithm={"policy_loss": "nan_at"}, trainer={"steps": 10, "max_consecutive_skips": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedStepWarning)
        with pytest.raises(NonFiniteStepError, match="3 consecutive steps skipped \\(limit 2\\), the last, step 3, for a non-finite loss"):
            train(resolve(cfg, _nan_loss_table(table, when=set(range(1, 100)))))


def test_a_raising_reward_names_the_function_and_sample(make_config, table, monkeypatch):
    def reward(self, response, example):
        raise KeyError("no answer")

    monkeypatch.setattr(DigitsTask, "reward", reward)
    with pytest.raises(RewardError, match="reward: .*reward raised KeyError: 'no answer' on sample 0 \\(prompt 0 "):
        train(resolve(make_config(trainer={"steps": 1}), table))


def test_resume_skips_a_damaged_latest_checkpoint(make_config, table, tiny_config):
    cfg = make_config(trainer={"steps": 4, "ckpt_interval": 2})
    train(resolve(cfg, table))
    latest = os.path.join(cfg.ckpt_dir, "step_00000004")
    with open(os.path.join(latest, "policy.safetensors"), "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        s = train(resolve(tiny_config(cfg.logging.run_dir, trainer={"steps": 6, "ckpt_interval": 2, "resume": True}), table))
    assert s.resumed_from == 2 and len(s.history) == 4
    messages = [str(w.message) for w in caught]
    assert "step_00000004: policy.safetensors: sha256" in messages[0] and "step_00000002, the newest" in messages[1]


def test_resume_refuses_a_changed_model_shape(make_config, table, tiny_config):
    cfg = make_config(trainer={"steps": 2})
    train(resolve(cfg, table))
    changed = tiny_config(cfg.logging.run_dir, trainer={"steps": 4, "resume": True}, model={"hidden_size": 48, "num_heads": 2})
    with pytest.raises(IncompatibleResumeError, match="model.hidden_size: 32 -> 48"):
        train(resolve(changed, table))


def test_resume_applies_a_changed_learning_rate_and_warns(make_config, table, tiny_config):
    cfg = make_config(trainer={"steps": 4, "ckpt_interval": 2, "warmup_steps": 0})
    train(resolve(cfg, table))
    faster = tiny_config(cfg.logging.run_dir, trainer={"steps": 6, "ckpt_interval": 2, "warmup_steps": 0, "resume": True, "lr": 1e-2})
    with pytest.warns(ckpt.CheckpointWarning, match="trainer.lr: 0.003 -> 0.01"):
        s = train(resolve(faster, table))
    assert s.resumed_from == 4 and [h["lr"] for h in s.history] == [1e-2, 1e-2]


def test_a_run_emits_no_deprecation_warning(make_config, table):
    """Sampling, scoring, the reference, the critic, the updates and checkpoints: nothing of ours
    calls a deprecated API (e.g. transformers' ``past_key_values``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        algorithm = {"advantage_estimator": "gae", "use_kl_loss": True}
        train(resolve(make_config(algorithm=algorithm, trainer={"steps": 2, "ckpt_interval": 1}), table))
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert not deprecations, [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations]


def test_the_aggregation_max_length_is_the_generation_budget(make_config, table):
    """``max_seq_len`` (Dr. GRPO's constant normaliser) is ``rollout.max_new_tokens`` at every
    step, not the longest response of the batch (which would vary from step to step)."""
    seen = []

    def recording(token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None):
        seen.append(max_seq_len)
        return (token_loss * loss_mask).sum() / (global_seqs * max_seq_len)

    t = table.register("recording", recording, kind="aggregation")
    train(resolve(make_config(algorithm={"loss_reduction": "recording"}, rollout={"max_new_tokens": 40}, trainer={"steps": 2}), t))
    assert seen and set(seen) == {40}
