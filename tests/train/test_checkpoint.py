"""Checkpoints: round trip, keep-latest-N, and atomicity under crashes (exception and SIGKILL)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from skyrl_fn.train import checkpoint as ckpt


def _weights(v: float):
    w = torch.full((3, 4), v)
    return {"policy": {"w": w, "tied": w, "b": torch.arange(3.0) + v}}  # "tied" shares storage


def test_round_trip(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    path = ckpt.save(
        str(tmp_path), step=3, weights={"policy": model.state_dict()}, optim={"policy": opt.state_dict()},
        data_state={"position": 12, "seed": 0}, config={"trainer": {"lr": 0.1}}, extra={"kl_coef": 0.2},
    )
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    c = ckpt.load(path)
    assert os.path.basename(path) == "step_00000003" and ckpt.latest_checkpoint(str(tmp_path)) == path
    assert c.step == 3 and c.data_state == {"position": 12, "seed": 0} and c.extra == {"kl_coef": 0.2}
    assert c.config == {"trainer": {"lr": 0.1}}
    for k, v in model.state_dict().items():
        assert torch.equal(c.weights["policy"][k], v)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    opt2.load_state_dict(c.optim["policy"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    ckpt.restore_rng(c.rng)
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]


def test_shared_storage_and_keep_latest(tmp_path):
    for step in range(1, 6):
        ckpt.save(str(tmp_path), step=step, weights=_weights(step), keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["step_00000004", "step_00000005"]
    c = ckpt.load(ckpt.latest_checkpoint(str(tmp_path)))
    assert torch.equal(c.weights["policy"]["tied"], torch.full((3, 4), 5.0))
    ckpt.save(str(tmp_path), step=5, weights=_weights(9.0), keep=2)  # re-save a step: replaced
    assert float(ckpt.load(str(tmp_path / "step_00000005")).weights["policy"]["w"][0, 0]) == 9.0


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="step"):
        ckpt.save(str(tmp_path), step=-1, weights={})
    with pytest.raises(ValueError, match="keep"):
        ckpt.save(str(tmp_path), step=1, weights={}, keep=0)
    with pytest.raises(ValueError, match="weights"):
        ckpt.save(str(tmp_path), step=1, weights={"../x": {}})
    with pytest.raises(FileNotFoundError):
        ckpt.load(str(tmp_path / "nothing"))
    assert ckpt.latest_checkpoint(str(tmp_path / "none")) is None


@pytest.mark.parametrize("fail_at", ["weights", "fsync", "rename"])
def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    good = ckpt.save(str(tmp_path), step=1, weights=_weights(1.0))

    def boom(*a, **k):
        raise OSError(f"simulated crash at {fail_at}")

    if fail_at == "weights":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    elif fail_at == "fsync":
        monkeypatch.setattr(ckpt, "_fsync_dir", boom)
    else:
        real = os.replace

        def replace(src, dst):
            if os.path.basename(str(dst)).startswith("step_"):
                boom()
            return real(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(str(tmp_path), step=2, weights=_weights(2.0))
    assert os.listdir(tmp_path) == ["step_00000001"]  # no half-written directory is visible
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    assert float(ckpt.load(good).weights["policy"]["w"][0, 0]) == 1.0


_SAVER = textwrap.dedent(
    """
    import importlib.util, sys, torch
    # Load the module file alone: the package import (transformers, the table) is slow to start.
    spec = importlib.util.spec_from_file_location("ckpt_alone", sys.argv[2])
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    d = sys.argv[1]
    big = torch.randn(512, 1024)  # ~2 MB per save, so kills land mid-write
    step = 1
    print("ready", flush=True)
    while True:
        ckpt.save(d, step=step, weights={"policy": {"w": big + step, "step": torch.tensor([float(step)])}}, keep=3)
        step += 1
    """
)


def test_sigkill_during_saves_never_leaves_a_corrupt_checkpoint(tmp_path):
    d = tmp_path / "ckpts"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(d), ckpt.__file__], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3 + rng.random() * 0.7)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for path in ckpt.list_checkpoints(str(d)):
            c = ckpt.load(path)  # every visible checkpoint is complete and readable
            assert float(c.weights["policy"]["step"][0]) == c.step
        visible = [n for n in os.listdir(d) if not n.startswith(".")]
        assert all(n.startswith("step_") for n in visible)
    assert ckpt.latest_checkpoint(str(d)) is not None
