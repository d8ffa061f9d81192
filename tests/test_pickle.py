"""Pickling guarantees: tables (built-ins, chains, user functions: ``__main__`` functions, closures,
lambdas, partials) survive cloudpickle round-trips, as they do when shipped to Ray workers."""

from __future__ import annotations

import functools
import json
import os
import pickle
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput
from skyrl_fn.core.compose import chain
from skyrl_fn.estimators import grpo
from skyrl_fn.transforms import (
    clip_advantages,
    group_median,
    group_normalize_std,
    length_penalty,
    outcome_estimator,
    scale_rewards,
    shape_rewards,
    weighted_sum,
    whiten,
)

REPO = Path(__file__).resolve().parents[1]


def make_batch(seed: int = 0) -> AdvantageInput:
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 4
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    return AdvantageInput(
        token_level_rewards=torch.randn(b, t, generator=g),
        response_mask=torch.arange(t)[None, :] < lengths[:, None],
        group_ids=["a", "a", "b", "b", "c", "c"],
        values=torch.randn(b, t, generator=g),
        reward_baselines=torch.randn(b, generator=g),
        extras={"bonus": torch.randn(b, generator=g), "old_log_probs": -torch.rand(b, t, generator=g), "sum_pi_squared": torch.rand(b, t, generator=g)},
    )


def same_advantages(t1, t2, names, batch):
    for name in names:
        a = t1.compute_advantages(name, batch)
        b = t2.compute_advantages(name, batch)
        assert torch.equal(a.advantages, b.advantages), name
        assert torch.equal(a.returns, b.returns), name


def library_chains():
    return {
        "shaped": chain(scale_rewards(2.0), length_penalty(0.01), grpo, whiten(), clip_advantages(1.0)),
        "median": chain(outcome_estimator(baseline=group_median), group_normalize_std()),
        "multi": chain(weighted_sum({"token_level_rewards": 1.0, "bonus": 0.5}), functools.partial(grpo, norm_by_std=False)),
    }


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_default_table_round_trips(dumps):
    table = pickle.loads(dumps(DEFAULT_TABLE))
    assert table.names("advantage_estimator") == DEFAULT_TABLE.names("advantage_estimator")
    assert len(table) == len(DEFAULT_TABLE)
    same_advantages(DEFAULT_TABLE, table, DEFAULT_TABLE.names("advantage_estimator"), make_batch())


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_chains_of_library_pieces_round_trip_even_with_plain_pickle(dumps):
    table = DEFAULT_TABLE
    for name, est in library_chains().items():
        table = table.register(name, est)
    loaded = pickle.loads(dumps(table))
    same_advantages(table, loaded, list(library_chains()), make_batch(1))
    assert repr(loaded.estimator("shaped")) == repr(table.estimator("shaped"))


def test_closures_lambdas_and_partials_round_trip_with_cloudpickle():
    def make_scaled(scale):
        @torch.no_grad()
        def scaled(batch: AdvantageInput) -> AdvantageOutput:
            out = grpo(batch)
            return AdvantageOutput(advantages=scale * out.advantages, returns=out.returns)

        return scaled

    offset = 0.25
    table = (
        DEFAULT_TABLE.register("closure", make_scaled(3.0))
        .register("lambda", lambda batch: grpo(batch, epsilon=0.5), kind="advantage_estimator")
        .register("partial", functools.partial(grpo, epsilon=1e-2), kind="advantage_estimator")
        .register("chained_closure", chain(shape_rewards(lambda r, m: r + offset), make_scaled(2.0)))
    )
    loaded = cloudpickle.loads(cloudpickle.dumps(table))
    names = ["closure", "lambda", "partial", "chained_closure"]
    same_advantages(table, loaded, names, make_batch(2))
    batch = make_batch(2)
    torch.testing.assert_close(loaded.compute_advantages("closure", batch).advantages, 3.0 * grpo(batch).advantages)
    # epsilon is fixed by the partial: part of the entry's identity, not a hyperparameter.
    assert loaded.entry("advantage_estimator", "partial").hyperparameters() == {"norm_by_std": True}
    assert loaded.entry("advantage_estimator", "partial").fn.keywords == {"epsilon": 1e-2}
    # The test can fail: plain pickle cannot carry the closure.
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(table)


DEFINE = textwrap.dedent(
    """
    import functools, sys
    import attrs, cloudpickle, torch
    from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, chain, clip_advantages, outcome_estimator, shape_rewards

    @torch.no_grad()
    def best_of_group(batch: AdvantageInput, *, bonus: float = 1.0) -> AdvantageOutput:
        '''Defined in __main__: +bonus on every token of rows holding their group's best score.'''
        s = torch.where(batch.response_mask, batch.token_level_rewards, 0).sum(-1)
        best = torch.zeros(batch.num_groups).scatter_reduce(0, batch.group_ids, s, "amax", include_self=False)
        adv = torch.where(batch.response_mask, bonus * (s == best[batch.group_ids]).float()[:, None], 0)
        return AdvantageOutput(advantages=adv, returns=adv)

    def square(rewards, mask):
        return rewards * rewards

    def make_baseline(c):
        def constant(scores, group_ids, num_groups):
            return torch.full_like(scores, c)
        return constant

    table = (
        DEFAULT_TABLE.register("best_of_group", best_of_group)
        .register("squared_best", chain(shape_rewards(square), best_of_group, clip_advantages(0.5)))
        .register("constant_baseline", chain(outcome_estimator(baseline=make_baseline(1.5))))
        .register("lam", lambda batch: best_of_group(batch, bonus=-2.0), kind="advantage_estimator")
        .register("part", functools.partial(best_of_group, bonus=4.0), kind="advantage_estimator")
    )
    with open(sys.argv[1], "wb") as f:
        f.write(cloudpickle.dumps(table))
    """
)

LOAD = textwrap.dedent(
    """
    import json, pickle, sys
    import torch
    from skyrl_fn import AdvantageInput

    with open(sys.argv[1], "rb") as f:
        table = pickle.loads(f.read())  # cloudpickle output loads with plain pickle
    batch = AdvantageInput(
        token_level_rewards=torch.tensor([[1.0, 2.0], [0.0, 1.0], [-3.0, 0.0], [0.5, 0.0]]),
        response_mask=torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]]),
        group_ids=[0, 0, 1, 1],
    )
    names = ["best_of_group", "squared_best", "constant_baseline", "lam", "part", "grpo"]
    out = {n: table.compute_advantages(n, batch).advantages.tolist() for n in names}
    out["bonus"] = table.compute_advantages("best_of_group", batch, bonus=2.0).advantages.tolist()
    print(json.dumps(out))
    """
)


def test_main_module_functions_survive_a_trip_to_a_fresh_process(tmp_path, monkeypatch):
    """Define an estimator in ``__main__``, pickle the table in one process, load and run it in
    another that never sees the defining script (as a Ray worker would). The defining script runs
    as ``__main__`` in this process (``runpy``, as ``python define.py`` runs it, without a second
    interpreter start-up); the loader is a fresh interpreter."""
    define, load, blob = tmp_path / "define.py", tmp_path / "load.py", tmp_path / "table.pkl"
    define.write_text(DEFINE)
    load.write_text(LOAD)
    monkeypatch.setattr(sys, "argv", [str(define), str(blob)])
    defined = runpy.run_path(str(define), run_name="__main__")
    assert defined["best_of_group"].__module__ == "__main__"  # so cloudpickle ships it by value
    define.unlink()  # the loader must not be able to import it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert blob.stat().st_size > 0 and b"best_of_group" in blob.read_bytes()
    done = subprocess.run([sys.executable, str(load), str(blob)], check=True, cwd=tmp_path, env=env, timeout=120,
                          capture_output=True, text=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["best_of_group"] == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    assert out["bonus"] == [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]]
    # squared: scores 5, 1 | 9, 0.25 -> rows 0 and 2 are best; clipped to 0.5.
    assert out["squared_best"] == [[0.5, 0.5], [0.0, 0.0], [0.5, 0.0], [0.0, 0.0]]
    assert out["constant_baseline"] == [[1.5, 1.5], [-0.5, -0.5], [-4.5, 0.0], [-1.0, 0.0]]
    assert out["lam"] == [[-2.0, -2.0], [0.0, 0.0], [0.0, 0.0], [-2.0, 0.0]]
    assert out["part"] == [[4.0, 4.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0]]
    assert len(out["grpo"]) == 4
