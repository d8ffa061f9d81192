"""Fault battery, training level: SIGKILL a training run at seeded random moments, resume it,
and compare with an uninterrupted run (same seed): nothing lost but the step in flight, no
damaged checkpoint loaded, and the same final weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train

STEPS = 8

_CHILD = """
import importlib.util, sys
from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer.run import resolve
from skyrl_fn.trainer.loop import train
spec = importlib.util.spec_from_file_location("tests_conftest", sys.argv[2])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
cfg = helpers.tiny_config(sys.argv[1], trainer={"steps": int(sys.argv[3]), "ckpt_interval": 1, "resume": True})
train(resolve(cfg, DEFAULT_TABLE), on_step=lambda m: print("step", int(m["step"]), flush=True))
"""


def _config(tiny_config, run_dir, **trainer):
    return tiny_config(run_dir, trainer={"steps": STEPS, "ckpt_interval": 1, **trainer})


def kill_resume_trials(tmp_path, tiny_config, table, trials: int, seed: int) -> dict:
    """``trials`` runs, each SIGKILLed once after a seeded random number of steps and delay, then
    resumed to the end; figures as in docs/faults.md."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    conftest = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")
    train(resolve(_config(tiny_config, tmp_path / "reference", keep_checkpoints=STEPS), table))
    at = {ckpt.load(p).step: ckpt.load(p).weights["policy"] for p in ckpt.list_checkpoints(str(tmp_path / "reference" / "checkpoints"))}
    want = at[STEPS]
    rng = random.Random(seed)
    fig = {"trials": 0, "corrupt_loaded": 0, "lost_more_than_one_step": 0, "final_weights_differ": 0}
    for trial in range(trials):
        run_dir = tmp_path / f"run{trial}"
        after, delay = rng.randint(1, STEPS - 2), rng.random() * 0.3
        proc = subprocess.Popen([sys.executable, str(script), str(run_dir), conftest, str(STEPS)], stdout=subprocess.PIPE, text=True)
        last = 0
        try:
            for line in proc.stdout:
                last = int(line.split()[1])
                if last >= after:
                    time.sleep(delay)  # lands anywhere in the next step, its save included
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        fig["trials"] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            c = ckpt.load_latest(str(run_dir / "checkpoints"))
        fig["lost_more_than_one_step"] += c is None or c.step < last
        if c is not None:
            fig["corrupt_loaded"] += any(not torch.equal(c.weights["policy"][k], at[c.step][k]) for k in want)
            for path in ckpt.list_checkpoints(str(run_dir / "checkpoints")):
                ckpt.verify(path)  # raises on a damaged checkpoint in plain sight
        resumed = train(resolve(_config(tiny_config, run_dir, resume=True), table))
        got = ckpt.load(resumed.last_checkpoint).weights["policy"]
        fig["final_weights_differ"] += any(not torch.equal(got[k], want[k]) for k in want)
    return fig


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_config, table):
    fig = kill_resume_trials(tmp_path, tiny_config, table, trials=6, seed=0)
    print("kill-resume trials:", json.dumps(fig))
    assert fig["trials"] == 6 and fig["corrupt_loaded"] == fig["lost_more_than_one_step"] == fig["final_weights_differ"] == 0, fig
