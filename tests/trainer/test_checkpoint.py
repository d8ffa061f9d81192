"""Checkpoints: round trip, manifest, keep-latest-N, and the fault battery: a failed write at every
point of a save (ENOSPC), every kind of damage to every file (fallback to the previous one), and
SIGKILL at seeded random points of saves (line events and wall-clock times)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import errno
import json
import warnings

import numpy as np
import pytest
import torch

from skyrl_fn.trainer import checkpoint as ckpt


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



def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    path = ckpt.save(str(tmp_path), step=2, weights=_weights(2.0), config={"model": {"hidden_size": 8}})
    m = ckpt.verify(path)
    on_disk = sorted(n for n in os.listdir(path) if n != ckpt.MANIFEST)
    assert sorted(m["files"]) == on_disk == ["optim.pt", "policy.safetensors", "rng.pt", "state.json"]
    for name, entry in m["files"].items():
        data = (tmp_path / "step_00000002" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert m["config"] == {"model": {"hidden_size": 8}} and m["step"] == 2
    assert set(m["versions"]) == {"skyrl_fn", "torch"} and ckpt.load(path).versions == m["versions"]


# -- damage to a finished checkpoint: detected, named, and the previous one used -----------------

def _damage(path: str, how: str, rng: random.Random) -> None:
    data = open(path, "rb").read()
    if how == "flip":  # one bit somewhere
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    elif how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "random":  # overwritten with random bytes of the same size
        data = bytes(rng.randrange(256) for _ in range(len(data)))
    elif how == "append":
        data = data + b"\0"
    elif how == "delete":
        os.remove(path)
        return
    with open(path, "wb") as f:
        f.write(data)


DAMAGE = ["flip", "truncate", "random", "append", "delete"]
FILES = ["policy.safetensors", "optim.pt", "rng.pt", "state.json", "manifest.json"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_damaged_latest_is_skipped_naming_the_file(tmp_path, name, how):
    ckpt.save(str(tmp_path), step=1, weights=_weights(1.0), keep=3)
    latest = ckpt.save(str(tmp_path), step=2, weights=_weights(2.0), keep=3)
    _damage(os.path.join(latest, name), how, random.Random(hash((name, how)) % 1000))
    with pytest.raises(ckpt.CheckpointCorruptError, match=name.replace(".", r"\.")) as err:
        ckpt.load(latest)
    assert err.value.file == name and err.value.path == latest
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        c = ckpt.load_latest(str(tmp_path))
    assert c.step == 1 and float(c.weights["policy"]["w"][0, 0]) == 1.0  # the fallback, intact
    messages = [str(w.message) for w in caught]
    assert any(name in m and "step_00000002" in m for m in messages)
    assert any("using" in m and "step_00000001" in m for m in messages)
    with pytest.warns(ckpt.CheckpointWarning):
        assert ckpt.newest_valid(str(tmp_path))[0].endswith("step_00000001")


def test_no_valid_checkpoint_is_one_error_listing_each(tmp_path):
    for step in (1, 2):
        _damage(os.path.join(ckpt.save(str(tmp_path), step=step, weights=_weights(step), keep=3), "optim.pt"), "append", random.Random(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckpt.CheckpointWarning)
        with pytest.raises(ckpt.NoValidCheckpointError, match="none of the 2 checkpoints") as err:
            ckpt.load_latest(str(tmp_path))
    assert "step_00000001" in str(err.value) and "step_00000002" in str(err.value) and "optim.pt" in str(err.value)
    assert ckpt.load_latest(str(tmp_path / "empty")) is None  # nothing saved yet: a fresh start


def test_a_directory_without_manifest_is_not_used(tmp_path):
    ckpt.save(str(tmp_path), step=1, weights=_weights(1.0))
    os.makedirs(tmp_path / "step_00000009")
    (tmp_path / "step_00000009" / "state.json").write_text(json.dumps({"step": 9}))
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        assert ckpt.load_latest(str(tmp_path)).step == 1
    assert "step_00000009: manifest.json: missing" in str(caught[0].message)


# -- a failed write at every point of a save ---------------------------------------------------

def _fault_points(tmp_path):
    """Count the I/O calls a save makes (file writes, directory fsyncs, renames)."""
    calls = []
    real = (ckpt._write_bytes, ckpt._fsync_dir, os.replace)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "_write_bytes", lambda p, d: (calls.append("write " + os.path.basename(p)), real[0](p, d))[1])
        mp.setattr(ckpt, "_fsync_dir", lambda p: (calls.append("fsync"), real[1](p))[1])
        mp.setattr(ckpt.os, "replace", lambda a, b: (calls.append("rename"), real[2](a, b))[1])
        ckpt.save(str(tmp_path / "count"), step=1, weights=_weights(1.0))
    return calls


def test_enospc_at_every_point_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    points = _fault_points(tmp_path)
    assert len(points) >= 7  # 5 files, 2 directory fsyncs, 1 rename
    for k, what in enumerate(points):
        d = tmp_path / f"k{k}"
        good = ckpt.save(str(d), step=1, weights=_weights(1.0))
        seen = [0]
        real = (ckpt._write_bytes, ckpt._fsync_dir, os.replace)

        def fault(i, fn):
            def wrapped(*args):
                n, seen[0] = seen[0], seen[0] + 1
                if n == k:
                    if fn is real[0]:  # half the bytes reach the disk first
                        with open(args[0], "wb") as f:
                            f.write(args[1][: len(args[1]) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return fn(*args)
            return wrapped

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ckpt, "_write_bytes", fault(0, real[0]))
            mp.setattr(ckpt, "_fsync_dir", fault(1, real[1]))
            mp.setattr(ckpt.os, "replace", fault(2, real[2]))
            with pytest.raises(ckpt.CheckpointWriteError) as err:
                ckpt.save(str(d), step=2, weights=_weights(2.0))
        msg = str(err.value)
        assert "No space left on device" in msg and f"{good} is intact" in msg, (what, msg)
        if what.startswith("write "):
            assert what.split()[1] in msg
        if k < len(points) - 1:
            assert ckpt.load_latest(str(d)).step == 1, what  # the previous checkpoint, verified
            assert [n for n in os.listdir(d) if not n.startswith(".")] == ["step_00000001"]
        else:  # the parent's fsync after the rename: the new one is in place and verifies too
            assert ckpt.load_latest(str(d)).step == 2
        assert ckpt.load(ckpt.save(str(d), step=2, weights=_weights(2.0))).step == 2  # and saving recovers


# -- SIGKILL at random points ------------------------------------------------------------------

RUNNER = os.path.join(os.path.dirname(__file__), "ckpt_kill_runner.py")


def _kill_trials(work, lines: int, timed: int, seed: int) -> dict:
    """``{"lines": figures, "timed": figures}`` of the runner: one process, one fork per trial."""
    out = subprocess.run(
        [sys.executable, RUNNER, str(work), str(lines), str(timed), str(seed)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kill_figures(tmp_path_factory):
    """Both kinds of fast trials in one runner process (its torch import is paid once)."""
    return _kill_trials(tmp_path_factory.mktemp("kills"), 12, 2, seed=0)


def _check_kill_figures(fig: dict, trials: int) -> None:
    assert fig["trials"] == fig["killed"] == trials  # every trial was really killed mid-sequence
    assert fig["unreadable_latest"] == fig["corrupt_loaded"] == fig["lost_more_than_one_step"] == 0, fig
    assert fig["resave_failed"] == 0, fig


def _check_timed_figures(fig: dict, trials: int) -> None:
    assert fig["trials"] == fig["killed"] == trials  # every saver was still saving when killed
    assert fig["unreadable_latest"] == fig["corrupt_loaded"] == fig["lost_more_than_one_step"] == 0, fig
    assert fig["unverified_visible"] == fig["stray_visible"] == 0, fig


def test_sigkill_at_random_lines_of_saves(kill_figures):
    _check_kill_figures(kill_figures["lines"], 12)


@pytest.mark.slow
def test_sigkill_at_random_lines_of_saves_many_trials(tmp_path):
    fig = _kill_trials(tmp_path, 400, 0, seed=1)["lines"]
    print("sigkill line trials:", json.dumps(fig))
    _check_kill_figures(fig, 400)


def test_sigkill_during_saves_never_leaves_a_corrupt_checkpoint(kill_figures):
    """A saver killed after a random delay (inside file writes too; tests/trainer/ckpt_kill_runner.py)."""
    _check_timed_figures(kill_figures["timed"], 2)


@pytest.mark.slow
def test_sigkill_during_saves_many_trials(tmp_path):
    fig = _kill_trials(tmp_path, 0, 40, seed=1)["timed"]
    print("sigkill timed trials:", json.dumps(fig))
    _check_timed_figures(fig, 40)
