"""GRPO, Dr. GRPO, MaxRL, GPG, Pass@k GRPO and OPO: hand values, loop equivalence, edge cases."""

from __future__ import annotations

import functools

import pytest
import torch

import skyrl_reference as ref
from batches import random_batch
from skyrl_fn import DEFAULT_TABLE, AdvantageInput, chain, group_mean, group_normalize_std, outcome_estimator
from skyrl_fn.estimators import gpg, grpo, grpo_passk, maxrl, opo

EPS = 1e-6


def outcome_batch(scores, ids, *, lengths=None, t=3, dtype=torch.float64):
    """Each sample's score on its last valid token; ``lengths`` default to ``t``."""
    b = len(scores)
    lengths = torch.tensor(lengths if lengths is not None else [t] * b)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rewards = torch.zeros(b, t, dtype=dtype)
    rows = torch.nonzero(lengths > 0).flatten()
    rewards[rows, lengths[rows] - 1] = torch.tensor(scores, dtype=dtype)[rows]
    return AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=ids)


def per_sample(out, batch):
    """``[B]``: each row's advantage (constant over its valid tokens; 0 for an empty row)."""
    return out.advantages.sum(-1) / batch.response_mask.sum(-1).clamp(min=1)


def rows(out):
    return out.advantages[:, 0]


# -- hand-computed values ----------------------------------------------------------------------


def test_grpo_hand_values():
    out = grpo(outcome_batch([1.0, 0.0, 0.0, 1.0, 2.0], [0, 0, 0, 1, 1]))
    std0 = torch.tensor([1.0, 0.0, 0.0]).std()
    expect = torch.tensor([(2 / 3) / (std0 + EPS), (-1 / 3) / (std0 + EPS), (-1 / 3) / (std0 + EPS),
                           -0.5 / (2**-0.5 + EPS), 0.5 / (2**-0.5 + EPS)], dtype=torch.float64)
    torch.testing.assert_close(rows(out), expect)
    assert out.returns is out.advantages


def test_dr_grpo_is_grpo_without_std():
    out = DEFAULT_TABLE.compute_advantages("dr_grpo", outcome_batch([1.0, 0.0, 0.0, 5.0], [0, 0, 0, 1]))
    torch.testing.assert_close(rows(out), torch.tensor([2 / 3, -1 / 3, -1 / 3, 5.0], dtype=torch.float64))


def test_maxrl_hand_values():
    # group 0: mean 1/4 -> (s - 1/4) / (1/4 + eps); group 1 (size 1): A = s.
    out = maxrl(outcome_batch([1.0, 0.0, 0.0, 0.0, 3.0], [0, 0, 0, 0, 1]))
    d = 0.25 + EPS
    torch.testing.assert_close(rows(out), torch.tensor([0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d, 3.0], dtype=torch.float64))


def test_maxrl_all_fail_group_is_zero():
    out = maxrl(outcome_batch([0.0, 0.0, 0.0], [0, 0, 0]))
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))


def test_maxrl_zero_denominator_gives_zero_not_nan():
    # mean = -0.25 = -epsilon exactly: the peers divide by 0; we define A = 0 for that group.
    batch = outcome_batch([-0.5, 0.0, 1.0, 0.0], [0, 0, 1, 1])
    out = maxrl(batch, epsilon=0.25)
    torch.testing.assert_close(rows(out), torch.tensor([0.0, 0.0, 0.5 / 0.75, -0.5 / 0.75], dtype=torch.float64))
    assert torch.isfinite(out.advantages).all()


def test_maxrl_negative_denominator_flips_sign_like_the_peers():
    out = maxrl(outcome_batch([-1.0, -3.0], [0, 0]))
    d = -2.0 + EPS
    torch.testing.assert_close(rows(out), torch.tensor([1.0 / d, -1.0 / d], dtype=torch.float64))


def test_maxrl_half_precision_clamps_instead_of_overflowing():
    # mean 0 -> denominator epsilon -> |A| = 0.5e6 > float16 max: clamped to the finite range.
    out = maxrl(outcome_batch([-0.5, 0.5], [0, 0], dtype=torch.float16))
    big = torch.finfo(torch.float16).max
    assert torch.isfinite(out.advantages).all()
    assert rows(out).tolist() == [-big, big]


def test_gpg_hand_values():
    # 3 of 4 scores non-zero -> alpha = 4/3; group means 0.5 and 2.
    out = gpg(outcome_batch([1.0, 0.0, 1.0, 3.0], [0, 0, 1, 1]), f_norm=2.0)
    alpha = 4 / 3
    expect = torch.tensor([0.5, -0.5, -1.0, 1.0], dtype=torch.float64) * alpha / 2.0
    torch.testing.assert_close(rows(out), expect)


def test_gpg_all_zero_scores_gives_zero():
    out = gpg(outcome_batch([0.0, 0.0], [0, 1]))
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))


def test_gpg_alpha_is_batch_wide_so_not_group_local():
    a = gpg(outcome_batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1]))
    b = gpg(outcome_batch([1.0, 0.0, 1.0, 2.0], [0, 0, 1, 1]))  # only group 1 changed
    assert not torch.equal(rows(a)[:2], rows(b)[:2])
    assert "group_local" not in DEFAULT_TABLE.entry("advantage_estimator", "gpg").promises


@pytest.mark.parametrize("f_norm", [0.0, -1.0])
def test_gpg_rejects_non_positive_f_norm(f_norm):
    with pytest.raises(ValueError, match="f_norm"):
        gpg(outcome_batch([1.0, 0.0], [0, 0]), f_norm=f_norm)


def test_grpo_passk_hand_values():
    # group 0: best 3 at row 1, second 1 -> (3 - 1) / (std + eps); group 1: best 5 at row 3.
    out = grpo_passk(outcome_batch([1.0, 3.0, 0.0, 5.0, 4.0], [0, 0, 0, 1, 1]))
    std0, std1 = torch.tensor([1.0, 3.0, 0.0]).std(), torch.tensor([5.0, 4.0]).std()
    expect = torch.tensor([0.0, 2.0 / (std0 + EPS), 0.0, 1.0 / (std1 + EPS), 0.0], dtype=torch.float64)
    torch.testing.assert_close(rows(out), expect)
    out = grpo_passk(outcome_batch([1.0, 3.0, 0.0, 5.0, 4.0], [0, 0, 0, 1, 1]), norm_by_std=False)
    torch.testing.assert_close(rows(out), torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0], dtype=torch.float64))


def test_grpo_passk_tied_best_gives_zero_to_everyone():
    out = grpo_passk(outcome_batch([1.0, 1.0, 0.0], [0, 0, 0]))
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))


@pytest.mark.parametrize("best_row", [0, 1, 2, 3])
def test_grpo_passk_advantage_lands_on_the_best_row(best_row):
    scores = [0.0, 0.5, 0.25, 0.0]
    scores[best_row] = 2.0
    out = grpo_passk(outcome_batch(scores, [0, 0, 0, 0]), norm_by_std=False)
    assert torch.nonzero(rows(out)).flatten().tolist() == [best_row]
    assert rows(out)[best_row] == 2.0 - sorted(scores)[-2]


@pytest.mark.parametrize("ids", [[0, 0, 1], ["a", "b", "b"], [7]])
def test_grpo_passk_rejects_groups_of_one_naming_the_group(ids):
    batch = outcome_batch([1.0] * len(ids), ids)
    with pytest.raises(ValueError, match=r"at least 2 samples.*group \d+ \(dense group id; row \d+\)"):
        grpo_passk(batch)


def test_opo_hand_values():
    # group 0: lengths 1, 3 -> b = (1*2 + 3*0) / 4 = 0.5; group 1 (size 1): b = 0.
    batch = outcome_batch([2.0, 0.0, 4.0], [0, 0, 1], lengths=[1, 3, 2])
    out = opo(batch)
    torch.testing.assert_close(per_sample(out, batch), torch.tensor([1.5, -0.5, 4.0], dtype=torch.float64))
    assert out.advantages[0, 1:].eq(0).all()


def test_opo_zero_length_group_gives_zeros_not_nan():
    out = opo(outcome_batch([0.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], lengths=[0, 0, 2, 2]))
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[:2].eq(0).all()
    torch.testing.assert_close(rows(out)[2:], torch.tensor([0.5, -0.5], dtype=torch.float64))


# -- equivalence with the peers' loops -----------------------------------------------------------

CASES = {
    "grpo": (grpo, ref.grpo, {}),
    "dr_grpo": (functools.partial(grpo, norm_by_std=False), functools.partial(ref.grpo, norm_by_std=False), {}),
    "maxrl": (maxrl, ref.maxrl, {}),
    "gpg": (functools.partial(gpg, f_norm=0.7), functools.partial(ref.gpg, f_norm=0.7), {}),
    "grpo_passk": (grpo_passk, ref.grpo_passk, {"min_group": 2}),
    "grpo_passk_nostd": (
        functools.partial(grpo_passk, norm_by_std=False),
        functools.partial(ref.grpo_passk, norm_by_std=False),
        {"min_group": 2},
    ),
    "opo": (opo, ref.opo, {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_peer_loop(name, dtype):
    ours, theirs, kw = CASES[name]
    for seed in range(40):
        batch, rewards, mask, index = random_batch(
            seed, dtype=dtype, gaps=seed % 3 == 0, outcome_only=seed % 2 == 0, string_ids=seed % 5 == 0, **kw
        )
        out = ours(batch)
        adv, _ = theirs(rewards.clone(), mask, index)
        if name == "maxrl":  # the peers overflow where our clamp/zero rule applies; not drawn here
            assert torch.isfinite(adv).all()
        if name == "opo":  # verl gives NaN for a group of empty rows (0 / 0); we give 0 (documented)
            nan_rows = torch.isnan(adv).any(-1)
            assert mask[nan_rows].eq(0).all()
            adv = torch.where(nan_rows[:, None], 0.0, adv).to(adv.dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        if name == "gpg" and dtype == torch.float64:  # verl's alpha = B / int tensor is float32
            tol = dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.advantages, adv * mask, **tol, msg=lambda m: f"{name} seed {seed}: {m}")
        assert out.returns is out.advantages


@pytest.mark.parametrize("name", sorted(CASES))
def test_large_batch_matches_peer_loop(name):
    ours, theirs, kw = CASES[name]
    batch, rewards, mask, index = random_batch(123, b=300, t=40, dtype=torch.float32, max_group=8, **kw)
    torch.testing.assert_close(ours(batch).advantages, theirs(rewards.clone(), mask, index)[0] * mask, rtol=1e-5, atol=1e-5)


# -- edge cases shared by every group-relative estimator -----------------------------------------

ALL = {"grpo": grpo, "maxrl": maxrl, "gpg": gpg, "grpo_passk": grpo_passk, "opo": opo}


@pytest.mark.parametrize("name", sorted(ALL))
def test_constant_group_gives_zero(name):
    out = ALL[name](outcome_batch([0.7, 0.7, 0.7, 0.7], [0, 0, 0, 0]))
    torch.testing.assert_close(out.advantages, torch.zeros_like(out.advantages))


@pytest.mark.parametrize("name", ["grpo", "maxrl", "gpg", "opo"])
def test_size_one_groups(name):
    out = ALL[name](outcome_batch([2.0, -1.0], ["p", "q"]))
    expect = {"grpo": torch.tensor([2.0, -1.0]) / (1 + EPS), "maxrl": torch.tensor([2.0, -1.0]),
              "gpg": torch.tensor([2.0, -1.0]), "opo": torch.tensor([2.0, -1.0])}[name]
    torch.testing.assert_close(rows(out), expect.double())


@pytest.mark.parametrize("name", sorted(ALL))
def test_all_masked_rows_are_zero_and_rest_finite(name):
    batch = outcome_batch([1.0, 0.0, 0.0, 2.0, 1.0], [0, 0, 0, 1, 1], lengths=[3, 0, 2, 0, 1])
    out = ALL[name](batch)
    assert out.advantages[1].eq(0).all() and out.advantages[3].eq(0).all()
    assert torch.isfinite(out.advantages).all()
    out.check_against(batch, name=name)


@pytest.mark.parametrize("name", ["grpo", "maxrl", "gpg", "opo"])
def test_single_sample_batch(name):
    out = ALL[name](outcome_batch([3.0], [0], t=1))
    assert out.advantages.shape == (1, 1) and torch.isfinite(out.advantages).all()


@pytest.mark.parametrize("name", sorted(ALL))
def test_string_ids_equal_int_ids(name):
    scores, ints = [1.0, 0.0, 2.0, 5.0, 4.0, 0.5], [3, 3, 3, 1, 1, 1]
    a = ALL[name](outcome_batch(scores, ints))
    b = ALL[name](outcome_batch(scores, [f"prompt-{i}" for i in ints]))
    assert torch.equal(a.advantages, b.advantages)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(name, dtype):
    batch, rewards, mask, index = random_batch(5, b=40, t=6, dtype=dtype, min_group=2)
    out = ALL[name](batch)
    assert out.advantages.dtype == dtype
    up = AdvantageInput(token_level_rewards=rewards.float(), response_mask=batch.response_mask, group_ids=index)
    torch.testing.assert_close(out.advantages, ALL[name](up).advantages.to(dtype))


@pytest.mark.parametrize("name", sorted(ALL))
def test_inputs_are_not_mutated(name):
    batch, rewards, _, _ = random_batch(9, b=30, t=5, min_group=2)
    before = batch.token_level_rewards.clone(), batch.response_mask.clone(), batch.group_ids.clone()
    ALL[name](batch)
    assert torch.equal(batch.token_level_rewards, before[0])
    assert torch.equal(batch.response_mask, before[1]) and torch.equal(batch.group_ids, before[2])


# -- the named group estimators are chains of outcome_estimator and group_normalize_std ------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("epsilon", [1e-6, 0.1])
def test_grpo_equals_its_chain_form(dtype, epsilon):
    # Registered as the fused function (one pass over the scores); the chain is the same maths.
    chained = chain(outcome_estimator(baseline=group_mean), group_normalize_std(epsilon=epsilon))
    dr_chained = chain(outcome_estimator(baseline=group_mean))
    for seed in range(12):  # groups of 1..5 samples (size-1 groups included), ragged or gappy masks
        batch, _, _, _ = random_batch(seed, b=4 + 5 * seed, t=1 + seed % 6, dtype=dtype, gaps=seed % 3 == 0)
        want = DEFAULT_TABLE.compute_advantages("grpo", batch, epsilon=epsilon)
        got = chained(batch)
        torch.testing.assert_close(got.advantages, want.advantages, rtol=0, atol=0)
        dr = DEFAULT_TABLE.compute_advantages("dr_grpo", batch)
        assert torch.equal(dr_chained(batch).advantages, dr.advantages)
