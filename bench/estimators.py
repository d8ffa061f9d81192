"""Benchmark the built-in advantage estimators against SkyRL-style per-group Python loops.

Run: ``.venv/bin/python bench/estimators.py [--batch 65536] [--group 8] [--tokens 256]``

Batch: ``B`` samples in groups of ``G``, ``T`` response tokens, float32, right-padded ragged masks
(lengths uniform in ``[1, T]``), a 0/1 outcome reward on each response's last token, critic
values and greedy baselines for GAE/ReMax. For every estimator: the median wall time over several
runs after a warm-up, and the achieved bandwidth (bytes of rewards + mask (+ values) read and of
advantages (+ returns, when a separate tensor) written, divided by the time). Outcome estimators
are also timed against a plain per-group Python loop written here in SkyRL-Train's dict style;
the loop runs on the whole batch (or on a slice, ``--loop-samples``, its time scaled linearly to
``B``), in rounds interleaved with fresh timings of the estimator; the ratio is the median over
the rounds. A fresh-allocation
yardstick (``torch.zeros(B, T)``, and the same on fresh and on reused huge-page mappings as the
estimators' outputs are, see ``skyrl_fn.core._alloc``) measured in the same run puts the times in context on a shared machine; on a busy machine pass
``--threads 1`` (OpenMP threads oversubscribe). The first few calls in a fresh process touch
memory the kernel has not handed out before and run several times slower: every timing follows
three warm-up calls.

The SkyRL call path (``--path compat|table|raw``, repeatable; ``--vs-verl`` adds verl 0.9.1's
vectorised estimators as the baseline): the same rewards with a float 0/1 mask and a numpy object
array of string uids (``G`` consecutive references to one uuid string per prompt), as SkyRL-Train's
trainer passes them (the string-id mapping is also timed on equal but distinct copies).
``compat`` is ``AdvantageEstimatorRegistry.get(name)(token_level_rewards=..., response_mask=...,
index=...)``, ``table`` is ``DEFAULT_TABLE.compute_advantages(name, batch)``
and ``raw`` the native function on a prebuilt ``AdvantageInput``; verl is
``compute_{grpo,rloo}_vectorized_outcome_advantage`` on the same tensors. The contenders run in
interleaved rounds (each a median of ``--repeats`` calls); a ratio is the median over rounds of
the per-round ratios. verl is imported as installed (``pip install --no-deps verl==0.9.1`` plus
the modules its ``core_algos`` imports: omegaconf, tensordict, pyvers, codetiming, orjson); nothing
of it is stubbed, and when it does not import the bench says why and stops. ``table`` and ``raw``
run on one prebuilt record, so both reuse the outcome scores it summed when it checked the rewards
(``skyrl_fn.core._rowsums``), and ``table`` differs from ``raw`` by its checks alone; ``compat`` builds
its record on every call (float mask checked and converted, uids numbered, rewards summed once)
and so pays for all of it. On a loaded machine, ``--threads 1`` gives the steadiest ratios.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict

import numpy as np
import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput
from skyrl_fn.core import _alloc
from skyrl_fn import estimators as est
from skyrl_fn.core._checks import as_group_ids
from skyrl_fn.compat import AdvantageEstimatorRegistry

from bench_machine import cpu_ticks, steal_percent

# -- SkyRL-Train-style loops (the baseline) --------------------------------------------------


def _loop_outcome(rewards: torch.Tensor, mask: torch.Tensor, index: list, per_group) -> torch.Tensor:
    """The shape of SkyRL-Train's outcome estimators: dicts of per-group lists, a Python loop over
    samples and one over groups; ``per_group(scores, lengths) -> advantages`` (lists of tensors)."""
    scores = (rewards * mask).sum(dim=-1)
    lengths = mask.sum(dim=-1)
    id2score, id2len, id2rows = defaultdict(list), defaultdict(list), defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
        id2len[index[i]].append(lengths[i])
        id2rows[index[i]].append(i)
    out = torch.zeros_like(scores)
    for idx in id2score:
        adv = per_group(id2score[idx], id2len[idx])
        for row, a in zip(id2rows[idx], adv):
            out[row] = a
    return out.unsqueeze(-1) * mask


def _grpo_group(scores, lengths, *, norm_by_std=True, eps=1e-6):
    # As SkyRL-Train's compute_grpo_outcome_advantage: torch.tensor over the list of scores.
    if len(scores) == 1:
        mean, std = torch.tensor(0.0), torch.tensor(1.0)
    else:
        mean, std = torch.mean(torch.tensor(scores)), torch.std(torch.tensor([scores]))
    return [((s - mean) / (std + eps)) if norm_by_std else (s - mean) for s in scores]


def _rloo_group(scores, lengths):
    n = len(scores)
    if n == 1:
        return [torch.tensor(0.0)]
    mean = torch.mean(torch.stack(scores))
    return [(s - mean) * n / (n - 1) for s in scores]


def _maxrl_group(scores, lengths, eps=1e-6):
    if len(scores) == 1:
        return list(scores)
    mean = torch.mean(torch.stack(scores))
    return [(s - mean) / (mean + eps) for s in scores]


def _opo_group(scores, lengths):
    if len(scores) == 1:
        return list(scores)
    s, n = torch.stack(scores), torch.stack(lengths).to(torch.float32)
    base = (n * s).sum() / n.sum()
    return [x - base for x in scores]


def _passk_group(scores, lengths, eps=1e-6):
    s = torch.stack(scores)
    top, top_idx = torch.topk(s, 2)
    adv = [torch.tensor(0.0)] * len(scores)
    adv[int(top_idx[0])] = (top[0] - top[1]) / (torch.std(s) + eps)
    return adv


def _gpg_loop(rewards, mask, index):
    scores = (rewards * mask).sum(dim=-1)
    alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
    return _loop_outcome(rewards, mask, index, lambda s, n: [alpha * a for a in _grpo_group(s, n, norm_by_std=False)])


LOOPS = {
    "grpo": lambda r, m, i: _loop_outcome(r, m, i, _grpo_group),
    "dr_grpo": lambda r, m, i: _loop_outcome(r, m, i, functools.partial(_grpo_group, norm_by_std=False)),
    "rloo": lambda r, m, i: _loop_outcome(r, m, i, _rloo_group),
    "maxrl": lambda r, m, i: _loop_outcome(r, m, i, _maxrl_group),
    "gpg": _gpg_loop,
    "opo": lambda r, m, i: _loop_outcome(r, m, i, _opo_group),
    "grpo_passk": lambda r, m, i: _loop_outcome(r, m, i, _passk_group),
}

ESTIMATORS = {
    "grpo": est.grpo,
    "dr_grpo": functools.partial(est.grpo, norm_by_std=False),
    "rloo": est.rloo,
    "maxrl": est.maxrl,
    "gpg": est.gpg,
    "opo": est.opo,
    "grpo_passk": est.grpo_passk,
    "reinforce_plus_plus_baseline": est.reinforce_plus_plus_baseline,
    "remax": est.remax,
    "reinforce++ (gamma=1)": est.reinforce_plus_plus,
    "reinforce++ (gamma=0.99)": functools.partial(est.reinforce_plus_plus, gamma=0.99),
    "gae": est.gae,
}
OUTCOME = {"grpo", "dr_grpo", "rloo", "maxrl", "gpg", "opo", "grpo_passk", "reinforce_plus_plus_baseline"}


def timings(fn, *, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def median_time(fn, *, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    return timings(fn, repeats=repeats, warmup=warmup)[0]


def _full_pass(batch: AdvantageInput) -> AdvantageInput:
    """The same record, but with nothing remembered: a record keeps the rewards' masked sums it
    computed when it checked them, and outcome estimators reuse them (``skyrl_fn.core._rowsums``); the
    estimator table times each estimator's whole pass over ``[B, T]``, so its rewards are a clone."""
    return AdvantageInput.unchecked(
        token_level_rewards=batch.token_level_rewards.clone(),
        response_mask=batch.response_mask,
        group_ids=batch.group_ids,
        values=batch.values,
        reward_baselines=batch.reward_baselines,
    )


def make_batch(b: int, g: int, t: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = torch.randint(0, 2, (b,), generator=gen).float()
    return dict(
        token_level_rewards=rewards,
        response_mask=mask,
        group_ids=torch.arange(b) // g,
        values=torch.randn(b, t, generator=gen) * mask,
        reward_baselines=torch.rand(b, generator=gen),
    )


# -- the SkyRL call path, against verl's vectorised estimators --------------------------------


def skyrl_index(b: int, g: int, seed: int = 0) -> np.ndarray:
    """``[B]`` numpy object array of uuid strings, ``G`` consecutive references to one string
    object each (SkyRL's ``uids``, a list comprehension repeating each prompt's uid)."""
    rng = random.Random(seed)
    uids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(-(-b // g))]
    return np.array([uids[i // g] for i in range(b)], dtype=object)


def load_verl():
    """verl's ``core_algos`` module as installed, or exit saying why (nothing is stubbed)."""
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as err:
        sys.exit(
            f"--vs-verl: could not import verl.trainer.ppo.core_algos ({err}). Install it outside the "
            f"project's dependencies: pip install --no-deps verl==0.9.1 omegaconf tensordict pyvers "
            f"codetiming orjson"
        )


def interleaved(fns: dict, *, rounds: int, repeats: int) -> dict:
    """name -> per-round median seconds; every round runs every function (after a warm-up)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(median_time(fn, repeats=repeats, warmup=0))
    return out


def ratio(times: dict, name: str, base: str) -> float:
    """Median over rounds of ``times[name] / times[base]``."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def skyrl_path(args, b: int, g: int, t: int) -> None:
    """Time the paths SkyRL users take, and print them against verl / the raw function."""
    fields = make_batch(b, g, t)
    rewards, float_mask = fields["token_level_rewards"], fields["response_mask"].float()
    index = skyrl_index(b, g)
    # table/raw get their own copy of the rewards: the sums a record remembers are keyed by the
    # rewards tensor (skyrl_fn.core._facts), and compat's record, made on every call with its own
    # converted mask, would otherwise replace the prebuilt record's and make raw re-sum each call.
    batch = AdvantageInput(token_level_rewards=rewards.clone(), response_mask=fields["response_mask"], group_ids=index)
    paths = args.path or ["compat", "table", "raw"]
    verl = load_verl() if args.vs_verl else None
    verl_fns = {} if verl is None else {
        "grpo": verl.compute_grpo_vectorized_outcome_advantage,
        "rloo": verl.compute_rloo_vectorized_outcome_advantage,
    }
    print(f"SkyRL call path: float 0/1 mask, numpy object array of {b // g} uuid strings x {g}; "
          f"{args.rounds} interleaved rounds of median-of-{args.repeats}")
    rows = []
    before = cpu_ticks()
    for name in ("grpo", "rloo"):
        fns = {}
        if "compat" in paths:
            skyrl = AdvantageEstimatorRegistry.get(name)
            fns["compat"] = lambda f=skyrl: f(token_level_rewards=rewards, response_mask=float_mask, index=index)
        if "table" in paths:
            fns["table"] = lambda n=name: DEFAULT_TABLE.compute_advantages(n, batch)
        fns["raw"] = lambda fn=DEFAULT_TABLE.estimator(name): fn(batch)  # the baseline of every path
        if name in verl_fns:
            fns["verl"] = lambda fn=verl_fns[name]: fn(rewards, float_mask, index)
            if "compat" in fns:  # same numbers? (verl sums unmasked rewards: equal here, 0 off the mask)
                ours, theirs = fns["compat"]()[0], fns["verl"]()[0]
                diff = (ours - theirs).abs().max().item()
                print(f"  {name}: compat vs verl on the same tensors: max |diff| = {diff:.3g}"
                      f"{' (bit-identical)' if torch.equal(ours, theirs) else ''}")
        rows.append((name, interleaved(fns, rounds=args.rounds, repeats=args.repeats)))
    print(f"  hypervisor steal during these rounds: {steal_percent(before, cpu_ticks()):.1f}% of the machine's CPU time (/proc/stat; ~0 on a quiet host)")
    print(f"  {'estimator':10s} {'path':7s} {'median ms':>9s}  ratio")
    verdicts = []
    for name, times in rows:
        for path, secs in times.items():
            line = f"  {name:10s} {path:7s} {statistics.median(secs) * 1e3:9.1f}"
            if path == "compat":
                line += f"  {ratio(times, 'compat', 'raw'):.2f}x raw"
            if path in ("compat", "raw") and "verl" in times:
                r = ratio(times, path, "verl")
                line += f"  {r:.2f}x verl"
                if path == "compat":
                    line += f" (goal <= 0.50: {'met' if r <= 0.5 else 'MISSED'})"
                    verdicts.append(f"{name} compat/verl {r:.2f} {'met' if r <= 0.5 else 'missed'}")
            if path == "table":
                r = ratio(times, "table", "raw")
                line += f"  {r:.2f}x raw (goal <= 1.25: {'met' if r <= 1.25 else 'MISSED'})"
                verdicts.append(f"{name} table/raw {r:.2f} {'met' if r <= 1.25 else 'missed'}")
            print(line)
    # -- string uids -> AdvantageInput (the "string-id mapping") -----------------------
    mask = fields["response_mask"]
    dense = torch.arange(b) // g
    # The same uids as G equal but distinct string objects per prompt (e.g. decoded row by row):
    # the numbering then finds runs by equality, not identity.
    copies = np.array([(u + ".")[:-1] for u in index.tolist()], dtype=object)
    ids = interleaved({
        "record, string uids": lambda: AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=index),
        "record, int64 ids": lambda: AdvantageInput(token_level_rewards=rewards, response_mask=mask, group_ids=dense),
        "as_group_ids alone": lambda: as_group_ids("group_ids", index, b),
        "as_group_ids, equal copies": lambda: as_group_ids("group_ids", copies, b),
        "record, string uids, float mask": lambda: AdvantageInput(token_level_rewards=rewards, response_mask=float_mask, group_ids=index),
    }, rounds=args.rounds, repeats=args.repeats)
    for label, secs in ids.items():
        print(f"  AdvantageInput: {label:32s} {statistics.median(secs) * 1e3:6.1f} ms")
    # The goal is the mapping of string uids to dense ids. The record's construction also sums the
    # rewards over the mask (its finiteness check, whose sums the estimators then reuse), so it is
    # printed beside, not judged: that pass moved there from the estimator.
    mapping = statistics.median(ids["as_group_ids alone"]) * 1e3
    record = statistics.median(ids["record, string uids"]) * 1e3
    copies_ms = statistics.median(ids["as_group_ids, equal copies"]) * 1e3
    verdicts.append(f"string-id mapping of {b} uids {mapping:.1f} ms {'met' if mapping <= 10 else 'missed'} (goal <= 10 ms; "
                    f"{copies_ms:.1f} ms from equal copies; the whole record {record:.1f} ms, rewards' masked sums included)")
    print("goals: " + "; ".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--loop-samples", type=int, default=0, help="run the loop baseline on a slice of this many samples (0: all of B)")
    parser.add_argument("--loop-rounds", type=int, default=5, help="rounds of (estimator, loop) for the ratio")
    parser.add_argument("--no-norm-only", action="store_true", help="skip the T=1 (group math only) rows")
    parser.add_argument("--outcome-only", action="store_true", help="time only the outcome estimators")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--path", action="append", choices=("compat", "table", "raw"),
                        help="time the SkyRL call path this way, against raw (repeatable; default with --vs-verl: all three)")
    parser.add_argument("--vs-verl", action="store_true", help="time verl 0.9.1's vectorised grpo/rloo on the same tensors")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for the SkyRL call path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b, g, t = args.batch, args.group, args.tokens
    if args.path or args.vs_verl:
        print(f"B={b} (groups of {g}), T={t}, float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"load average {os.getloadavg()[0]:.1f}")
        skyrl_path(args, b, g, t)
        return
    fields = make_batch(b, g, t)
    print(f"B={b} (groups of {g}), T={t}, float32, right-padded ragged masks, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")

    # -- yardsticks measured in the same run: the floor any estimator returning a fresh [B, T]
    # float32 tensor pays (allocation + page faults), and one read + write pass ----------------
    r = fields["token_level_rewards"]
    zeros_sec = median_time(lambda: torch.zeros(b, t), repeats=args.repeats)
    cache = os.environ.get("SKYRL_FN_HUGE_PAGES_CACHE_MB")
    os.environ["SKYRL_FN_HUGE_PAGES_CACHE_MB"] = "0"  # fresh mappings: no reuse of freed ones
    huge_sec = median_time(lambda: _alloc.empty((b, t), torch.float32).zero_(), repeats=args.repeats)
    if cache is None:
        del os.environ["SKYRL_FN_HUGE_PAGES_CACHE_MB"]
    else:
        os.environ["SKYRL_FN_HUGE_PAGES_CACHE_MB"] = cache
    reused_sec = median_time(lambda: _alloc.empty((b, t), torch.float32).zero_(), repeats=args.repeats)
    clone_sec = median_time(lambda: r.clone(), repeats=args.repeats)
    print(f"yardsticks: torch.zeros(B, T) {zeros_sec * 1e3:.1f} ms, the same on fresh huge pages "
          f"{huge_sec * 1e3:.1f} ms, on a reused mapping {reused_sec * 1e3:.1f} ms, rewards.clone() "
          f"{clone_sec * 1e3:.1f} ms")

    # -- record construction (validation), timed on its own ------------------------------------
    t_rec = median_time(lambda: AdvantageInput(**fields), repeats=args.repeats)
    str_ids = [f"uid-{i // g}" for i in range(b)]
    t_rec_str = median_time(lambda: AdvantageInput(**{**fields, "group_ids": str_ids}), repeats=3)
    print(f"AdvantageInput construction: {t_rec * 1e3:.1f} ms (int64 tensor ids), "
          f"{t_rec_str * 1e3:.1f} ms (string uids)")
    batch = _full_pass(AdvantageInput(**fields))

    bt = b * t
    rows = []
    for name, fn in ESTIMATORS.items():
        if args.outcome_only and name not in OUTCOME:
            continue
        fast = name in OUTCOME or name in ("remax", "reinforce_plus_plus_baseline")
        med, best = timings(lambda: fn(batch), repeats=args.repeats if fast else 3)
        out = fn(batch)
        read = bt * (4 + 1) + (bt * 4 if name == "gae" else 0)
        written = bt * 4 * (1 if out.returns is out.advantages else 2)
        rows.append([name, med, best, (read + written) / med / 1e9, None])

    # -- loop baselines (on a slice, scaled linearly to B, when --loop-samples asks), interleaved
    # with fresh timings of the estimator so that drift in the machine's speed hits both alike ---
    n = min(args.loop_samples or b, b) // g * g
    rl, ml = fields["token_level_rewards"][:n], fields["response_mask"][:n].float()
    index = [int(i) for i in fields["group_ids"][:n]]
    loop_secs = {}
    for row in rows:
        if row[0] in LOOPS:
            fn, loops, ratios = ESTIMATORS[row[0]], [], []
            for _ in range(args.loop_rounds):
                est_sec = median_time(lambda: fn(batch), repeats=5)
                loops.append(median_time(lambda: LOOPS[row[0]](rl, ml, index), repeats=1, warmup=0) * (b / n))
                ratios.append(loops[-1] / est_sec)
            loop_secs[row[0]] = statistics.median(loops)
            row[4] = statistics.median(ratios)
    print(f"(loop baseline: SkyRL-style dict loop on {n} samples, scaled x{b / n:g} to B; x vs loop = median "
          f"over {args.loop_rounds} rounds of (one loop run / the estimator's median of 5 just before it); "
          f"grpo's loop {loop_secs.get('grpo', float('nan')) * 1e3:.0f} ms = "
          f"{loop_secs.get('grpo', float('nan')) / b * 1e6:.1f} us per sample)")
    # -- the group normalisation alone: the same B at T = 1, where [B, T] traffic is negligible ----
    norm_rows = []
    if not args.no_norm_only:
        f1 = make_batch(b, g, 1)
        b1 = _full_pass(AdvantageInput(**{k: v for k, v in f1.items() if k in ("token_level_rewards", "response_mask", "group_ids")}))
        r1, m1 = f1["token_level_rewards"], f1["response_mask"].float()
        idx1 = [int(i) for i in f1["group_ids"]]
        for name in ("grpo", "rloo"):
            est_sec = median_time(lambda: ESTIMATORS[name](b1), repeats=args.repeats)
            loop_sec = median_time(lambda: LOOPS[name](r1, m1, idx1), repeats=1, warmup=0)
            norm_rows.append((name, est_sec, loop_sec))

    print(f"{'estimator':30s} {'median ms':>9s} {'min ms':>7s} {'GB/s':>5s} {'x zeros':>7s} {'x vs loop':>9s}")
    for name, med, best, gbs, ratio in rows:
        speed = f"{ratio:9.0f}" if ratio is not None else f"{'':>9s}"
        print(f"{name:30s} {med * 1e3:9.1f} {best * 1e3:7.1f} {gbs:5.1f} {med / zeros_sec:7.1f} {speed}")
    for name, est_sec, loop_sec in norm_rows:
        print(f"{name + ' at T=1 (group math only)':30s} {est_sec * 1e3:9.2f} {'':>7s} {'':>5s} {'':>7s} "
              f"{loop_sec / est_sec:9.0f}")
    slow = [name for name, med, *_ in rows if name in OUTCOME and med > 0.020]
    weak = [name for name, *_, ratio in rows if name in ("grpo", "rloo") and ratio < 100]
    print(f"goal <=20 ms for outcome estimators: {'met' if not slow else 'missed by ' + ', '.join(slow)}; "
          f"goal >=100x vs loop for grpo/rloo: {'met' if not weak else 'missed by ' + ', '.join(weak)}")


if __name__ == "__main__":
    main()
