"""The batch transforms against the peers' own code (skipped without ``$SKYRL_FN_PEERS``, see
``tests/peers.py``): SkyRL 0.3.0's ``zero_variance_filter``, ``handle_replace_sampling``,
``apply_overlong_filtering`` (vLLM's stop reason ``length`` is our ``truncated``) and its DAPO
example trainer's overlong penalty; verl 0.9.1's ``DAPORewardManager`` overlong buffer and its
``filter_groups`` (the v1 ``ReplayBuffer``'s classification, with ``transfer_queue``'s read
answered from the batch). Random batches from the testing kit's ``sample_batches`` (P groups of G,
tied scores, truncated responses); each deliberate deviation has a test of its own that pins it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from skyrl_fn.testing._batch import sample_batches
from skyrl_fn.transforms import SampleBatch, dynamic_sampling, overlong_filter, overlong_penalty, zero_variance_filter
from tests.peers import peer, peer_function, peer_modules, skyrl_batch_utils

EOS = 2
PEER_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def skyrl():
    with skyrl_batch_utils() as (trainer_utils, generator_utils):
        yield trainer_utils, generator_utils


def generator_output(batch: SampleBatch) -> tuple[dict, list[str]]:
    """SkyRL's ``GeneratorOutput`` and uids for ``batch``: a response ends in EOS unless truncated;
    its tokens are a function of its sampled row (``source``), so a copied row has its source's."""
    responses, masks = [], []
    for i, length in enumerate(batch.lengths().tolist()):
        ids = [3 + (int(batch.source[i]) + j) % 5 for j in range(length)]
        if not bool(batch.truncated[i]):
            ids[-1] = EOS
        responses.append(ids)
        masks.append(batch.loss_mask[i, :length].long().tolist())
    out = {
        "prompt_token_ids": [[1, int(g)] for g in batch.group_ids.tolist()], "response_ids": responses,
        "rewards": batch.scores.double().tolist(), "loss_masks": masks,
        "stop_reasons": ["length" if t else "stop" for t in batch.truncated.tolist()],
        "rollout_metrics": None, "rollout_logprobs": None,
    }
    return out, [f"p{g}" for g in batch.group_ids.tolist()]


def group_size(batch: SampleBatch) -> int:
    return int(torch.bincount(batch.group_ids).max())


# -- zero_variance_filter: SkyRL 0.3.0's zero_variance_filter --------------------------------------


@PEER_SETTINGS
@given(batch=sample_batches())
def test_zero_variance_filter_keeps_the_rows_skyrl_keeps(skyrl, batch):
    trainer_utils, _ = skyrl
    out, uids = generator_output(batch)
    kept = trainer_utils.zero_variance_filter(out["rewards"], uids, loss_masks=None, tol=0.0)
    assert zero_variance_filter(batch).source.tolist() == kept


def test_zero_variance_filter_deviations_from_skyrl(skyrl):
    trainer_utils, _ = skyrl
    # 1. SkyRL judges a group by its live rows only (loss mask not all 0): a truncated row that
    #    overlong_filter masked does not make the group informative there. Here every row counts,
    #    as in verl's filter_groups and as the group-relative baseline does (the masked row's score
    #    is in its group's mean, so its partners' advantages are not 0).
    scores, ids = [1.0, 0.0, 0.0], ["a", "a", "a"]
    assert trainer_utils.zero_variance_filter(scores, ids, loss_masks=[[0, 0], [1, 1], [1]], tol=0.0) == []
    batch = SampleBatch(
        scores=torch.tensor(scores), response_mask=torch.tensor([[1, 1], [1, 1], [1, 0]]),
        loss_mask=torch.tensor([[0, 0], [1, 1], [1, 0]]), group_ids=torch.zeros(3, dtype=torch.long),
        truncated=torch.tensor([True, False, False]), source=torch.arange(3), max_response_length=2,
    )
    assert zero_variance_filter(batch).source.tolist() == [0, 1, 2]
    # 2. SkyRL's trainer default zero_variance_filter_tol is 1e-6; here equality is exact (its tol=0).
    close = [0.5, 0.5 + 1e-7]
    assert trainer_utils.zero_variance_filter(close, ["a", "a"], tol=1e-6) == []
    assert trainer_utils.zero_variance_filter(close, ["a", "a"], tol=0.0) == [0, 1]
    near = SampleBatch(
        scores=torch.tensor(close, dtype=torch.float64), response_mask=torch.ones(2, 1), loss_mask=torch.ones(2, 1),
        group_ids=torch.zeros(2, dtype=torch.long), truncated=torch.zeros(2, dtype=torch.bool), source=torch.arange(2),
        max_response_length=1,
    )
    assert zero_variance_filter(near).source.tolist() == [0, 1]


@pytest.fixture(scope="module")
def verl_replay_buffer():
    omegaconf = peer("omegaconf")
    peer("verl.utils.skip")  # verl itself imports without transfer_queue; only the buffer module needs it
    with peer_modules({"verl.trainer.ppo.v1.replay_buffer": "verl/trainer/ppo/v1/replay_buffer.py"}, absent=("transfer_queue",)) as mods:
        yield mods["verl.trainer.ppo.v1.replay_buffer"], omegaconf.OmegaConf


def verl_filtered_groups(verl_replay_buffer, monkeypatch, batch: SampleBatch) -> set[int]:
    """The prompt groups verl 0.9.1's DAPO ``filter_groups`` (``metric: reward``) evicts: its
    ``ReplayBuffer._dapo_filtered_keys`` on finished groups whose ``rm_scores`` carry the scores."""
    rb, omegaconf = verl_replay_buffer
    buffer = rb.ReplayBuffer(
        trainer_mode="sync", trainer_config=omegaconf.create({}), max_off_policy_threshold=None, max_off_policy_strategy="drop",
        sampler_kwargs=omegaconf.create({}), refill_fn=lambda n: None, filter_groups_metric="reward",
        train_batch_size=batch.num_groups(), gen_batch_size=batch.num_groups(),
    )
    rm_scores = {}
    for i, (g, length) in enumerate(zip(batch.group_ids.tolist(), batch.lengths().tolist())):
        tokens = torch.zeros(length, dtype=torch.float32)  # verl's reward tensor: the score on the last token
        tokens[-1] = batch.scores[i]
        rm_scores[f"p{g}_{i}"] = tokens
    buffer.partitions["train"] = {key: {} for key in rm_scores}
    buffer.finished_keys["train"] = {key.split("_")[0] for key in rm_scores}

    def kv_batch_get(keys, partition_id, select_fields):
        return {"rm_scores": [rm_scores[k] for k in keys]}

    monkeypatch.setattr(rb, "tq", SimpleNamespace(kv_batch_get=kv_batch_get))
    filtered, _ = buffer._dapo_filtered_keys("train")
    return {int(u[1:]) for u in filtered}


@PEER_SETTINGS
@given(batch=sample_batches())
def test_zero_variance_filter_drops_the_groups_verls_filter_groups_evicts(verl_replay_buffer, monkeypatch, batch):
    dropped = set(batch.group_ids.tolist()) - set(zero_variance_filter(batch).group_ids.tolist())
    assert dropped == verl_filtered_groups(verl_replay_buffer, monkeypatch, batch)


def test_equal_scores_of_point_one_are_all_equal_for_verl_too(verl_replay_buffer, monkeypatch):
    # verl's metric "reward" sums float32 rm_scores: three scores of 0.1 have std 0 there, so it
    # evicts the group as we drop it (SkyRL's np.std on Python floats keeps it:
    # tests/trainer/test_batch_transforms_peers.py pins that deviation).
    batch = SampleBatch(
        scores=torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 1.0]), response_mask=torch.ones(6, 2), loss_mask=torch.ones(6, 2),
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]), truncated=torch.zeros(6, dtype=torch.bool), source=torch.arange(6),
        max_response_length=2,
    )
    assert verl_filtered_groups(verl_replay_buffer, monkeypatch, batch) == {0}
    assert zero_variance_filter(batch).group_ids.tolist() == [1, 1, 1]


# -- dynamic_sampling(type="replace"): SkyRL 0.3.0's handle_replace_sampling -----------------------


@PEER_SETTINGS
@given(batch=sample_batches(max_groups=6), ratio=st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_replace_matches_skyrl_given_the_same_choice_of_groups(skyrl, monkeypatch, batch, ratio):
    # SkyRL draws the replacement groups from numpy's global generator (and pairs them with the
    # bad groups in set order); ours from a generator seeded by the step. With SkyRL's draw made to
    # return our choice, every row, score, loss mask and uid must agree, and SkyRL must ask for a
    # new batch exactly when ours drops this one.
    trainer_utils, _ = skyrl
    ours = dynamic_sampling(batch, type="replace", min_replace_ratio=ratio)
    out, uids = generator_output(batch)
    g = group_size(batch)
    chosen: dict[str, str] = {}
    if ours.batch_size:
        for row in range(batch.batch_size):
            if int(ours.group_ids[row]) != int(batch.group_ids[row]):
                chosen[uids[row]] = f"p{int(ours.group_ids[row])}"

    def our_choice(good_uids, bad_uids):
        return np.array([chosen[u] for u in bad_uids], dtype=object)

    monkeypatch.setattr(trainer_utils, "get_bad_sample_replacements", our_choice)
    got, got_uids, keep_sampling = trainer_utils.handle_replace_sampling(
        out, list(uids), {"n_samples_per_prompt": g, "min_replace_ratio": ratio},
    )
    assert keep_sampling == (ours.batch_size == 0)
    if ours.batch_size:
        assert got_uids == [f"p{x}" for x in ours.group_ids.tolist()]
        assert got["rewards"] == ours.scores.double().tolist()
        want = generator_output(ours)[0]
        assert got["response_ids"] == want["response_ids"] and got["loss_masks"] == want["loss_masks"]


@PEER_SETTINGS
@given(batch=sample_batches(max_groups=6))
def test_replace_draws_groups_as_skyrl_does(skyrl, batch):
    # the draw itself: without repetition while there are enough informative groups (SkyRL:
    # a permutation), with repetition otherwise (SkyRL: randint); only informative groups.
    trainer_utils, _ = skyrl
    ours = dynamic_sampling(batch, type="replace", min_replace_ratio=0.0)
    assume(ours.batch_size)  # no informative group: nothing drawn, nothing to compare
    moved = {int(b): int(o) for b, o in zip(batch.group_ids.tolist(), ours.group_ids.tolist()) if b != o}
    out, uids = generator_output(batch)
    g = group_size(batch)
    np.random.seed(batch.seed % 2**32)
    _, skyrl_uids, _ = trainer_utils.handle_replace_sampling(out, list(uids), {"n_samples_per_prompt": g, "min_replace_ratio": 0.0})
    theirs = {int(u[1:]): int(v[1:]) for u, v in zip(uids, skyrl_uids) if u != v}
    assert moved.keys() == theirs.keys()  # the same groups are replaced
    informative = set(batch.group_ids.tolist()) - set(moved)
    for picks in (moved, theirs):
        assert set(picks.values()) <= informative
        if len(informative) >= len(picks):
            assert len(set(picks.values())) == len(picks)


# -- overlong_filter: SkyRL 0.3.0's apply_overlong_filtering --------------------------------------


@PEER_SETTINGS
@given(batch=sample_batches())
def test_overlong_filter_masks_what_skyrl_masks(skyrl, batch):
    _, generator_utils = skyrl
    out, _ = generator_output(batch)
    theirs = generator_utils.apply_overlong_filtering(out["loss_masks"], out["stop_reasons"])
    mine = overlong_filter(batch)
    assert [mine.loss_mask[i, :n].long().tolist() for i, n in enumerate(batch.lengths().tolist())] == theirs


# -- overlong_penalty: verl 0.9.1's DAPORewardManager (reward.overlong_buffer) ---------------------


class _Tokenizer:
    eos_token = "</s>"

    def decode(self, ids, skip_special_tokens=True):
        return ""


@pytest.fixture(scope="module")
def verl_dapo():
    dapo = peer("verl.workers.reward_manager.dapo")
    verl = peer("verl")
    omegaconf = peer("omegaconf")
    return dapo.DAPORewardManager, verl.DataProto, omegaconf.OmegaConf


@PEER_SETTINGS
@given(batch=sample_batches(), buf=st.integers(1, 6), factor=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
def test_overlong_penalty_matches_verls_dapo_reward_manager(verl_dapo, batch, buf, factor):
    manager_cls, data_proto, omegaconf = verl_dapo
    assume(buf <= batch.max_response_length)  # verl asserts max_resp_len >= overlong_buffer.len; the launcher refuses it too
    b, prompt_len = batch.batch_size, 2
    data = data_proto.from_dict(
        tensors={
            "prompts": torch.ones(b, prompt_len, dtype=torch.long),
            "responses": torch.where(batch.response_mask, 5, 0),
            "attention_mask": torch.cat([torch.ones(b, prompt_len, dtype=torch.long), batch.response_mask.long()], dim=1),
        },
        non_tensors={
            "reward_model": np.array([{"ground_truth": s} for s in batch.scores.tolist()], dtype=object),
            "data_source": np.array(["x"] * b, dtype=object),
        },
    )
    cfg = omegaconf.create({"enable": True, "len": buf, "penalty_factor": factor, "log": False})
    manager = manager_cls(
        tokenizer=_Tokenizer(), num_examine=0, compute_score=lambda data_source, solution_str, ground_truth, extra_info: ground_truth,
        max_resp_len=batch.max_response_length, overlong_buffer_cfg=cfg,
    )
    rewards = manager(data)  # [B, T], the shaped score on each response's last token
    theirs = rewards.gather(1, (batch.lengths() - 1)[:, None]).squeeze(1)
    ours = overlong_penalty(batch, overlong_buffer_len=buf, penalty_factor=factor).scores
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=1e-6)


def test_verl_refuses_a_buffer_longer_than_the_budget(verl_dapo):
    # Our launcher's rule (--algorithm.transform.overlong-penalty.overlong-buffer-len <= max-new-tokens) is verl's.
    manager_cls, _, omegaconf = verl_dapo
    cfg = omegaconf.create({"enable": True, "len": 5, "penalty_factor": 1.0, "log": False})
    with pytest.raises(AssertionError, match="max_resp_len must be larger than overlong_buffer.len"):
        manager_cls(tokenizer=_Tokenizer(), num_examine=0, max_resp_len=4, overlong_buffer_cfg=cfg)


class _TrainerBase:
    """Stands in for SkyRL's ``RayPPOTrainer`` under its DAPO example trainer: the base method the
    example calls after shaping the rewards hands them back."""

    def postprocess_generator_output(self, generator_output, uids):
        return generator_output, uids


@pytest.fixture(scope="module")
def skyrl_dapo_trainer():
    return peer_function(
        "examples/train/algorithms/dapo/main_dapo.py", "DAPOTrainer",
        {"RayPPOTrainer": _TrainerBase, "torch": torch, "GeneratorOutput": dict, "List": List, "Tuple": Tuple},
    )


@PEER_SETTINGS
@given(batch=sample_batches(), buf=st.integers(1, 6), factor=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
def test_overlong_penalty_matches_skyrls_dapo_example_trainer(skyrl_dapo_trainer, batch, buf, factor):
    trainer = object.__new__(skyrl_dapo_trainer)
    trainer.cfg = SimpleNamespace(
        trainer=SimpleNamespace(algorithm=SimpleNamespace(overlong_buffer_len=buf, overlong_buffer_penalty_factor=factor)),
        generator=SimpleNamespace(sampling_params=SimpleNamespace(max_generate_length=batch.max_response_length)),
    )
    out, uids = generator_output(batch)
    shaped, _ = trainer.postprocess_generator_output(out, uids)
    ours = overlong_penalty(batch, overlong_buffer_len=buf, penalty_factor=factor).scores
    torch.testing.assert_close(ours.double(), torch.tensor(shaped["rewards"], dtype=torch.float64), rtol=0, atol=1e-6)
