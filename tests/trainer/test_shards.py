"""Sharded checkpoints (``skyrl_fn.trainer.shards`` inside ``skyrl_fn.trainer.checkpoint``),
without a process group: a model's shards written by ``torch.distributed.checkpoint`` load into a
fresh model, go into a checkpoint atomically with every file in its manifest (the policy's and the
critic's, each in its own directory), and a damaged or missing shard file of either is named. (Several ranks on Ray: tests/distributed/test_dp.py.)"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer import shards


def _trained(seed: int, steps: int = 2):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(d, step, model, opt, critic=None):
    """A checkpoint of ``model`` as the policy's shards and of ``critic`` (a model and its
    optimiser, when given) as the critic's, as data-parallel ranks save them."""
    writers = {"policy": lambda where: shards.write(model, opt, where)}
    if critic is not None:
        writers["critic"] = lambda where: shards.write(*critic, where)
    return ckpt.save(
        str(d), step=step, weights={}, shards=writers,
        optim={f"{role}_sched": {"last_epoch": step} for role in writers}, config={"step": step},
    )


def test_shards_load_into_a_fresh_model_and_read_whole(tmp_path):
    model, opt = _trained(0)
    shards.write(model, opt, str(tmp_path / "s"))
    fresh, fresh_opt = _trained(1, steps=0)
    shards.load(fresh, fresh_opt, str(tmp_path / "s"))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    want, got = opt.state_dict(), fresh_opt.state_dict()
    for i, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    assert got["param_groups"][0]["weight_decay"] == 0.1
    read = shards.read_weights(str(tmp_path / "s"))
    assert set(read) == set(model.state_dict()) and all(torch.equal(read[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_with_shards_lists_every_file_and_loads(tmp_path):
    model, opt = _trained(0)
    critic = _trained(1)
    path = _save(tmp_path, 3, model, opt, critic)
    manifest = ckpt.verify(path)
    assert manifest["format"] == 2
    for role in ("policy", "critic"):
        assert {f for f in manifest["files"] if f.startswith(f"{role}/")} == {f"{role}/.metadata", f"{role}/__0_0.distcp"}
        assert all(len(manifest["files"][f"{role}/{f}"]["sha256"]) == 64 for f in (".metadata", "__0_0.distcp"))
    c = ckpt.load(path)
    assert c.shards == {role: os.path.join(path, role) for role in ("policy", "critic")} and c.weights == {}
    assert c.optim == {"policy_sched": {"last_epoch": 3}, "critic_sched": {"last_epoch": 3}}
    for role, (m, _) in (("policy", (model, opt)), ("critic", critic)):
        assert torch.equal(shards.read_weights(c.shards[role])["2.weight"], m.state_dict()["2.weight"])


@pytest.mark.parametrize("role", ["policy", "critic"])
@pytest.mark.parametrize("how", ["altered", "deleted"])
def test_a_damaged_shard_file_is_named_and_the_previous_checkpoint_used(tmp_path, how, role):
    model, opt = _trained(0)
    critic = _trained(1)
    _save(tmp_path, 1, model, opt, critic)
    path = _save(tmp_path, 2, model, opt, critic)
    shard = os.path.join(path, role, "__0_0.distcp")
    if how == "deleted":
        os.remove(shard)
    else:
        with open(shard, "r+b") as f:
            f.seek(100)
            f.write(b"\xff\x00\xff")
    reason = "missing" if how == "deleted" else "altered"
    with pytest.raises(ckpt.CheckpointCorruptError, match=rf"step_00000002: {role}/__0_0\.distcp: .*{reason}"):
        ckpt.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.load_latest(str(tmp_path)).step == 1
    assert any(f"{role}/__0_0.distcp" in str(w.message) for w in caught)


def test_shards_missing_a_rank_file_are_named_when_read(tmp_path):
    model, opt = _trained(0)
    d = tmp_path / "ckpt" / "policy"
    shards.write(model, opt, str(d))
    os.remove(d / "__0_0.distcp")
    assert shards.missing_files(str(d)) == ["__0_0.distcp"]
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"ckpt: policy/__0_0\.distcp: missing"):
        shards.load(model, opt, str(d))
    os.remove(d / shards.METADATA)
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"policy/\.metadata: missing"):
        shards.read_weights(str(d))


def test_a_failing_shard_writer_leaves_the_previous_checkpoint(tmp_path):
    model, opt = _trained(0)
    first = _save(tmp_path, 1, model, opt)

    def dies(where):
        shards.write(model, opt, where)
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError, match="rank 1 died"):
        ckpt.save(str(tmp_path), step=2, weights={}, shards={"policy": dies})
    with pytest.raises(ckpt.CheckpointWriteError, match=rf"could not write the shards of policy: .*{first} is intact"):
        ckpt.save(str(tmp_path), step=2, weights={}, shards={"policy": lambda where: None})
    assert ckpt.list_checkpoints(str(tmp_path)) == [first] and os.listdir(tmp_path) == ["step_00000001"]
    with pytest.raises(ValueError, match=r"shards: expected models not also in weights, got \['policy'\]"):
        ckpt.save(str(tmp_path), step=2, weights={"policy": model.state_dict()}, shards={"policy": lambda where: None})


def test_rng_of_each_rank_is_restored(tmp_path):
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt.capture_rng())
    for rank, seed in ((0, 1), (1, 2), (2, 1)):  # a rank not saved takes rank 0's
        ckpt.restore_rng({"ranks": states}, rank=rank)
        torch.manual_seed(seed)
        want = torch.rand(3)
        ckpt.restore_rng({"ranks": states}, rank=rank)
        assert torch.equal(torch.rand(3), want)


def test_saving_before_the_first_step_leaves_the_optimiser_as_fresh(tmp_path):
    """DCP builds the state of an optimiser that never stepped with a zero step; the shards undo
    its count, so the first real step after a save (or after resuming from that save) equals a
    step of an optimiser that was never saved."""
    def step(model, opt):
        torch.manual_seed(7)
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    saved, saved_opt = _trained(0, steps=0)
    plain, plain_opt = _trained(0, steps=0)
    shards.write(saved, saved_opt, str(tmp_path / "s"))
    resumed, resumed_opt = _trained(1, steps=0)
    shards.load(resumed, resumed_opt, str(tmp_path / "s"))
    want = step(plain, plain_opt)
    for got in (step(saved, saved_opt), step(resumed, resumed_opt)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert all(float(s["step"]) == 1 for s in saved_opt.state.values())

