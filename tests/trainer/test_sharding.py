"""Data-parallel pieces that need no process group: the batch split, per-prompt sampling seeds,
inverse-CDF sampling, and the config checks of ``trainer.workers``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.models.model import ModelConfig, build_tiny_model, build_tokenizer
from skyrl_fn.rollout.base import HFBackend, RolloutConfig
from skyrl_fn.rollout.sampling import inverse_cdf_sample
from skyrl_fn.trainer.sharding import backend_for, partition_groups


@given(st.lists(st.integers(1, 500), min_size=1, max_size=40), st.data())
def test_partition_groups_covers_every_group_once_balanced_and_deterministic(tokens, data):
    w = data.draw(st.integers(1, len(tokens)))
    shares = partition_groups(tokens, w)
    assert len(shares) == w and all(shares) and all(s == sorted(s) for s in shares)
    assert sorted(g for s in shares for g in s) == list(range(len(tokens)))
    loads = [sum(tokens[g] for g in s) for s in shares]
    # Greedy LPT: the most loaded rank exceeds the least loaded by at most one group.
    assert max(loads) - min(loads) <= max(tokens)
    assert partition_groups(tokens, w) == shares


def test_partition_groups_rejects_more_ranks_than_groups():
    with pytest.raises(ValueError, match=r"world_size: expected 1 <= W <= P = 2"):
        partition_groups([3, 4], 3)


def test_backend_follows_the_device():
    assert backend_for("cpu") == "gloo" and backend_for("cuda:1") == "nccl"


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30), st.floats(0.0, 0.999999))
def test_inverse_cdf_never_draws_a_zero_probability_token(weights, u):
    probs = torch.tensor(weights)
    if float(probs.sum()) == 0:
        probs[0] = 1.0
    k = int(inverse_cdf_sample(probs[None], torch.tensor([u]))[0])
    assert probs[k] > 0
    cdf = probs.cumsum(0) / probs.sum()
    assert k == 0 or cdf[k - 1] <= u + 1e-6  # the first token whose cumulative mass passes u


def test_inverse_cdf_matches_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(20000, 1)
    draws = inverse_cdf_sample(probs, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert torch.allclose(freq, probs[0], atol=0.015) and freq[1] == 0


def test_a_prompt_samples_the_same_responses_in_any_share_of_the_batch():
    """Per-prompt seeds: sampling prompts 2..3 of a step (first_prompt=2) gives the rows that
    sampling all four prompts gives them (what lets W ranks sample what one worker would)."""
    tok = build_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64), tok, seed=0).eval()
    backend = HFBackend(model, tok, RolloutConfig(samples_per_prompt=3, max_new_tokens=6))
    prompts = ["n:74>", "n:3>", "c:12345>", "n:9>"]
    whole = backend.generate(prompts, seed=11)
    part = backend.generate(prompts[2:], seed=11, first_prompt=2)
    assert whole.responses[6:] == part.responses
    t = part.response_ids.shape[1]
    assert torch.equal(whole.response_ids[6:, :t], part.response_ids)
    assert torch.allclose(whole.rollout_log_probs[6:, :t], part.rollout_log_probs, atol=1e-5)
    # A different step seed gives different samples.
    assert backend.generate(prompts, seed=12).responses != whole.responses


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--trainer.workers", "0"), r"trainer.workers: expected an int >= 1, got 0"),
        (("--trainer.workers", "3"), r"trainer.workers: expected <= trainer.prompts_per_step = 2"),
        (("--trainer.workers", "2", "--ray.no-use-ray"), r"trainer.workers: 2 data-parallel ranks need ray.use_ray"),
        # vLLM: one GPU per rank (the default gpu.num_gpus and gpu.trainer_gpus are 1)
        (("--trainer.workers", "2", "--rollout.backend", "vllm"), r"trainer.workers: 2 data-parallel ranks need one GPU each .* gpu.num_gpus >= 2 \(got 1\)"),
        (
            ("--trainer.workers", "2", "--rollout.backend", "vllm", "--gpu.no-colocate", "--gpu.num-gpus", "4"),
            r"trainer.workers: 2 data-parallel ranks need one trainer GPU each .* gpu.trainer_gpus >= 2 \(got 1\)",
        ),
        # asynchronous training at W > 1 needs separate rollout workers, as at W = 1
        (("--trainer.workers", "2", "--trainer.max-staleness", "1"), r"trainer.max_staleness: expected 0 with the hybrid layout"),
        (("--trainer.dist-timeout-s", "0"), r"trainer.dist_timeout_s: expected > 0"),
    ],
)
def test_bad_workers_settings_fail_before_any_model_loads(extra, message):
    argv = ["--trainer.prompts-per-step", "2", *extra]
    with pytest.raises(ValueError, match=message):
        resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)



@pytest.mark.parametrize(
    "extra",
    [
        ("--algorithm.loss-reduction", "prompt_mean"),
        ("--algorithm.batch-transforms", "overlong_filter", "dynamic_sampling"),
        ("--teacher.model", "tiny"),
        ("--algorithm.advantage-estimator", "gae", "--algorithm.use-kl-loss"),
        ("--ray.rollout-workers", "2"),
        ("--ray.rollout-workers", "1", "--trainer.max-staleness", "1"),
    ],
)
def test_data_parallel_runs_what_one_worker_runs(extra):
    """prompt_mean, batch transforms, a teacher, a critic, a reference, separate rollout workers
    and asynchronous training resolve at W=2 (their
    W-invariance is tests/distributed/test_dp.py's)."""
    run = resolve_names(parse_config(["--trainer.prompts-per-step", "2", "--trainer.workers", "2", *extra], DEFAULT_TABLE), DEFAULT_TABLE)
    assert run.config.trainer.workers == 2

def test_gather_rows_joins_the_shares_and_skips_a_rank_without_rows():
    """``Collectives.gather_rows`` on what an all-gather returns: the shares land on their rows,
    and a rank left without a prompt group may send an empty part of another width (its
    ``fn`` never ran)."""
    from skyrl_fn.trainer.sharding import Collectives

    parts = [
        (torch.tensor([0, 3]), torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])),
        (torch.tensor([1, 2]), torch.tensor([[9.0, 9.5, 9.0, 9.5], [0.5, 0.25, 0.5, 0.25]])),
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)),
    ]
    dp = Collectives.__new__(Collectives)  # no process group: the all-gather is given
    dp.all_gather_object = lambda mine: parts
    out = dp.gather_rows(parts[2][1], parts[2][0], 4)
    assert torch.equal(out, torch.stack([parts[0][1][0], parts[1][1][0], parts[1][1][1], parts[0][1][1]]))
