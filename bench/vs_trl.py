"""GRPO steady-state seconds per step: skyrl_fn (Ray actors included) vs TRL's ``GRPOTrainer``.

The same tiny model (Llama config, hidden 128, 4 layers, seeded init), the same locally built
character tokenizer, the same digits task and partial-credit reward, 8 prompts x 8 samples x
<= 16 new tokens per step, lr 3e-3 warm-up 3, no KL, CPU, no vLLM, the same torch thread count
(``trainer.torch_threads``), no gradient checkpointing, both measured in this process.
A step's time is the wall time between consecutive step-end callbacks; the first ``--warmup``
are dropped and the median is reported.

TRL is an optional bench dependency (``pip install 'skyrl_fn[bench]'`` with the torch pin in
place: ``pip install trl -c <(echo torch==2.13.0)``); without it the TRL half is skipped with a
message.

    .venv/bin/python bench/vs_trl.py [--steps 14] [--warmup 4]

``--model smollm2-135m-instruct`` (or any ``--model.name-or-path`` value) runs both on that
pretrained model instead: the arithmetic task with the ``smollm2`` preset's sizes (4 prompts x 8
samples x <= 20 new tokens, 2 torch threads), chat-formatted prompts on both sides (TRL gets
conversational rows), ``--steps 6 --warmup 2 --rounds 1`` by default.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skyrl_fn import DEFAULT_TABLE  # noqa: E402
from skyrl_fn.cli import parse_config, resolve_names  # noqa: E402

PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 16
MODEL = ["--model.hidden-size", "128", "--model.num-layers", "4", "--model.num-heads", "4", "--model.intermediate-size", "512"]


PRETRAINED: str | None = None  # --model: a pretrained model instead of the tiny one


def _run(steps: int, run_dir: str):
    if PRETRAINED is None:
        model = MODEL
    else:  # the smollm2 preset's task and sizes; lr 2e-5
        model = [
            "--model.name-or-path", PRETRAINED, "--data.task", "arithmetic", "--data.min-value", "1", "--data.max-value", "9",
            "--data.arithmetic-kinds", "add", "--trainer.lr", "2e-5", "--trainer.warmup-steps", "2", "--trainer.torch-threads", "2",
        ]
    argv = [
        *model, "--trainer.steps", str(steps), "--trainer.prompts-per-step", str(PROMPTS),
        "--rollout.samples-per-prompt", str(SAMPLES), "--rollout.max-new-tokens", str(NEW_TOKENS),
        "--trainer.micro-batch-size", str(PROMPTS * SAMPLES), "--trainer.ckpt-interval", "0",
        "--algorithm.advantage-estimator", "grpo", "--logging.run-dir", run_dir,
    ]
    return resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)


def _steady(stamps: list[float], warmup: int) -> float:
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(intervals[max(0, warmup - 1):])


def ours(steps: int, warmup: int) -> tuple[float, float]:
    """(median s/step, last reward) of skyrl_fn on Ray."""
    from skyrl_fn.distributed.ray_runner import train_on_ray

    stamps, rewards = [], []
    run = _run(steps, tempfile.mkdtemp(prefix="skyrl_fn_vs_trl_"))
    train_on_ray(run, on_step=lambda m: (stamps.append(time.perf_counter()), rewards.append(m["reward"])))
    return _steady(stamps, warmup), rewards[-1]


def trl(steps: int, warmup: int) -> tuple[float, float] | None:
    """(median s/step, last reward) of TRL's GRPOTrainer, or None when TRL is not installed."""
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed: skipping its half (pip install trl with the torch pin in place)")
        return None
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from skyrl_fn.models.model import load_model, load_tokenizer
    from skyrl_fn.tasks.choice import make_task
    from skyrl_fn.tasks.base import Example

    run = _run(steps, tempfile.mkdtemp(prefix="skyrl_fn_vs_trl_"))
    cfg = run.config
    task = make_task(cfg.data, seed=cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model, alphabet=task.alphabet)
    model = load_model(cfg.model, tokenizer, seed=cfg.trainer.seed)
    rows = [task.example(i) for i in range(PROMPTS * (steps + 2))]
    chat = PRETRAINED is not None and bool(getattr(tokenizer, "chat_template", None))
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": e.prompt}] if chat else e.prompt, "answer": e.answer} for e in rows
    ])

    def reward(completions, answer, **_):  # the task's own reward, as our side scores
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [task.reward(t, Example(index=0, prompt="", answer=a)) for t, a in zip(texts, answer)]

    stamps, rewards = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_"), use_cpu=True, max_steps=steps,
        per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES, gradient_accumulation_steps=1,
        max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=cfg.trainer.lr,
        warmup_steps=cfg.trainer.warmup_steps, lr_scheduler_type="constant_with_warmup", max_grad_norm=cfg.trainer.grad_clip,
        beta=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=cfg.trainer.seed,
        shuffle_dataset=False, bf16=False, disable_tqdm=True, gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    # The same torch thread count as our actors (trainer.torch_threads): fair, and on a busy
    # 2-core machine 2 OpenMP threads per process thrash.
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    torch.manual_seed(cfg.trainer.seed)
    trainer.train()
    return _steady(stamps, warmup), (rewards[-1] if rewards else float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a pretrained model (e.g. smollm2-135m-instruct) instead of the tiny one")
    p.add_argument("--steps", type=int, default=None, help="default 14 (tiny) / 6 (--model)")
    p.add_argument("--warmup", type=int, default=None, help="default 4 (tiny) / 2 (--model)")
    p.add_argument("--rounds", type=int, default=None, help="alternate ours / TRL this many times; report each one's best (default 2 / 1)")
    a = p.parse_args()
    global PRETRAINED, PROMPTS, NEW_TOKENS
    if a.model is not None:
        PRETRAINED, PROMPTS, NEW_TOKENS = a.model, 4, 20
    big = a.model is not None
    a.steps = a.steps or (6 if big else 14)
    a.warmup = a.warmup or (2 if big else 4)
    a.rounds = a.rounds or (1 if big else 2)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts its workers at nice 15; TRL runs in this process at nice 0. On a shared machine
    # that alone skews the ratio, so both halves get the same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="skyrl_fn_ray_"), log_to_driver=False)
    ours_times, trl_times = [], []
    try:
        for r in range(a.rounds):
            ours_s, ours_r = ours(a.steps, a.warmup)
            ours_times.append(ours_s)
            print(f"round {r + 1} skyrl_fn (Ray): {ours_s:.3f} s/step (last reward {ours_r:.3f})", flush=True)
            theirs = trl(a.steps, a.warmup)
            if theirs is None:
                continue
            trl_times.append(theirs[0])
            print(f"round {r + 1} TRL GRPOTrainer: {theirs[0]:.3f} s/step (last reward {theirs[1]:.3f})", flush=True)
    finally:
        ray.shutdown()
    if not trl_times:
        print(f"skyrl_fn (Ray): {min(ours_times):.3f} s/step; TRL not installed, no ratio")
        return
    ratio = min(ours_times) / min(trl_times)
    print(f"\nbest of {a.rounds}: skyrl_fn (Ray) {min(ours_times):.3f} s/step, TRL {min(trl_times):.3f} s/step")
    print(f"ratio skyrl_fn / TRL: {ratio:.2f}x  (goal <= 1.0)  cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
