"""Hypothesis strategies that generate valid records for estimators, losses and aggregations.

Notation: ``B`` rows, ``T`` tokens, ``P`` groups of ``G_p`` rows each. Every strategy draws
small batches (``B <= 12``, ``T <= 5`` by default) that hypothesis shrinks to a minimal
counterexample: fewer groups, fewer rows, shorter rows, full masks, zeros.

Speed: the tensors of a batch are decoded from one byte string per tensor (a single hypothesis
choice) instead of one choice per number, so generating and shrinking stay fast. Each byte ``b``
decodes to a value (``decode``):

- ``b < 192``: a multiple of 1/4, zigzag-coded so that ``b = 0`` is 0 (``1 -> 0.25``,
  ``2 -> -0.25``, ... up to +-24);
- ``b >= 192`` (``"wide"`` only): an entry of ``EXTREMES``: extreme but finite values (+-1e6,
  +-1e-20, ...) and off-grid ones (0.1, 1/3, ...). Sums over ``T`` tokens and squares stay finite
  in float32.

``"grid"`` values (quarter-grid only) make sums exact in float32 and float64, and a group's
scores are either exactly equal or at least 1/4 apart, so an estimator's epsilon moves a normalised
advantage by a relative ~1e-4 at most. The kit uses them (in float64) for the properties that
compare two outputs (permutation, group locality, shift/scale invariance).
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch
from hypothesis import strategies as st

from skyrl_fn.core.records import AdvantageInput, PolicyLossInput

__all__ = [
    "DTYPES",
    "EXTREMES",
    "decode",
    "advantage_inputs",
    "policy_loss_inputs",
    "token_losses",
    "LogProbPair",
    "log_prob_pairs",
    "microbatch_cuts",
]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

#: Extreme but finite, and off-grid, values mixed into "wide" draws.
EXTREMES: tuple[float, ...] = (
    1e6, -1e6, 1e-20, -1e-20, 3.0e5, -12345.678, 1e-6, 0.1, -1.0 / 3.0, 2.0 / 3.0, 1e3, -0.7, 4096.5, -1e-3,
)


def decode(b: int, values: str = "wide") -> float:
    """The value of byte ``b`` (see the module docstring)."""
    if b >= 192 and values == "wide":
        return EXTREMES[(b - 192) % len(EXTREMES)]
    b %= 192
    k = (b + 1) // 2
    return (k if b % 2 else -k) / 4.0


def _blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def _mask_row(byte: int, t: int, min_valid: int) -> list[bool]:
    """``byte < 128``: right-padded, ``byte % (t + 1)`` tokens of padding (0: full row);
    otherwise the low bits mark masked tokens (holes, as multi-turn masks have)."""
    if byte < 128:
        n = t - byte % (t + 1)
        row = [j < n for j in range(t)]
    else:
        row = [not (byte >> j) & 1 for j in range(t)]
    for j in range(t):  # honour min_valid by unmasking from the left
        if sum(row) >= min_valid:
            break
        row[j] = True
    return row


def _labels(seed: int, num_groups: int, as_str: bool) -> list:
    """Distinct group labels: ints of any sign or prompt-uid strings."""
    ints = [seed - 2**30 + 7919 * k for k in range(num_groups)]
    return [f"uid-{i & 0xFFFFFFFF:08x}" for i in ints] if as_str else ints


@st.composite
def advantage_inputs(
    draw,
    *,
    dtypes: Sequence[torch.dtype] = DTYPES,
    values: str = "wide",
    max_groups: int = 3,
    min_group_size: int = 1,
    max_group_size: int = 4,
    max_len: int = 5,
    min_valid: int = 0,
    singleton: bool = False,
    id_style: str | None = None,
    with_values: bool = True,
    with_baselines: bool = True,
) -> AdvantageInput:
    """A valid ``AdvantageInput``: groups of varied sizes (size 1 included unless
    ``min_group_size > 1``), rows of a group scattered over the batch, ragged masks (all-masked rows
    included unless ``min_valid > 0``), constant-reward groups, outcome-style rewards (one reward at
    the last valid token) or dense token rewards, finite garbage or zeros in the padding, int or
    string group ids, ``values [B, T]`` and ``reward_baselines [B]`` (so GAE and ReMax can run).

    Args:
        dtypes: floating dtypes to draw from.
        values: ``"wide"`` (extreme but finite) or ``"grid"`` (see the module docstring).
        max_groups / min_group_size / max_group_size: ``P`` and ``G_p`` ranges.
        max_len: largest ``T``.
        min_valid: least number of valid tokens per row.
        singleton: force the first group to have exactly one row.
        id_style: ``"int"``, ``"str"`` or None (either).
        with_values / with_baselines: include ``values`` / ``reward_baselines``.
    """
    if values not in ("wide", "grid"):
        raise ValueError(f"values: expected 'grid' or 'wide', got {values!r}")
    dtype = draw(st.sampled_from(list(dtypes)))
    t = draw(st.integers(1, max_len))
    p = draw(st.integers(1, max_groups))
    sizes = draw(st.lists(st.integers(min_group_size, max_group_size), min_size=p, max_size=p))
    if singleton:
        sizes[0] = 1
    as_str = draw(st.booleans()) if id_style is None else id_style == "str"
    labels = _labels(draw(st.integers(0, 2**31)), p, as_str)
    kinds = draw(st.lists(st.sampled_from(["outcome", "constant", "dense"]), min_size=p, max_size=p))
    b = sum(sizes)
    # Rows start grouped; byte pairs swap rows to scatter them (shrinks to contiguous groups).
    group_of_row = [g for g, n in enumerate(sizes) for _ in range(n)]
    swaps = draw(st.binary(max_size=8))
    for i, j in zip(swaps[0::2], swaps[1::2]):
        group_of_row[i % b], group_of_row[j % b] = group_of_row[j % b], group_of_row[i % b]

    data = draw(_blob(b * (t + 1)))
    first: dict[int, tuple[list[bool], list[float]]] = {}
    masks, rewards = [], []
    for i in range(b):
        g = group_of_row[i]
        if kinds[g] == "constant" and g in first:
            m, r = first[g]
        else:
            chunk = data[i * (t + 1): (i + 1) * (t + 1)]
            m = _mask_row(chunk[0], t, min_valid)
            r = [decode(x, values) for x in chunk[1:]]
            if kinds[g] == "outcome":
                valid = [j for j in range(t) if m[j]]
                r = [r[0] if valid and j == valid[-1] else 0.0 for j in range(t)]
            first.setdefault(g, (m, r))
        masks.append(m)
        rewards.append(r)
    garbage = decode(draw(st.integers(0, 255)), "wide")
    rewards = [[r if m else garbage for r, m in zip(rr, mm)] for rr, mm in zip(rewards, masks)]
    extra = draw(_blob(2 * b + 1))
    kw = {}
    if with_values:  # one level per row plus one slope: enough to vary GAE's deltas
        level = torch.tensor([decode(x, "grid") for x in extra[:b]], dtype=dtype)
        kw["values"] = level[:, None] + decode(extra[2 * b], "grid") * torch.arange(t, dtype=dtype)[None, :]
    if with_baselines:
        kw["reward_baselines"] = torch.tensor([decode(x, "grid") for x in extra[b: 2 * b]], dtype=dtype)
    return AdvantageInput(
        token_level_rewards=torch.tensor(rewards, dtype=dtype),
        response_mask=torch.tensor(masks, dtype=torch.bool),
        group_ids=[labels[g] for g in group_of_row],
        **kw,
    )


#: Log-ratios ``log pi - log pi_old`` for bytes >= 224: far outside any clip range.
_FAR_LOG_RATIOS = (20.0, -20.0, 5.0, -5.0, 2.5, -2.5, 0.9, -0.9)


def _log_ratio(byte: int) -> float:
    """Mostly small (multiples of 1/32 within +-3.5, 0 for byte 0), sometimes extreme."""
    if byte >= 224:
        return _FAR_LOG_RATIOS[byte % len(_FAR_LOG_RATIOS)]
    k = (byte + 1) // 2
    return (k if byte % 2 else -k) / 32.0


@st.composite
def policy_loss_inputs(
    draw,
    *,
    dtypes: Sequence[torch.dtype] = DTYPES,
    max_rows: int = 6,
    max_len: int = 5,
) -> PolicyLossInput:
    """A valid ``PolicyLossInput``: ragged loss masks (all-masked rows and an all-masked batch
    included), log-probs in ``[-24, 0]``, old log-probs at log-ratios from 0 to +-20, "wide"
    advantages (up to 1e6), optional ``ref_log_probs`` / ``rollout_log_probs``, finite garbage or
    zeros in the padding. ``log_probs`` does not require grad (the checks make a fresh leaf)."""
    dtype = draw(st.sampled_from(list(dtypes)))
    b, t = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    data = draw(_blob(b * (1 + 5 * t)))
    m = torch.tensor([_mask_row(data[i], t, 0) for i in range(b)], dtype=torch.bool)
    cols = [data[b + k * b * t: b + (k + 1) * b * t] for k in range(5)]
    grid = lambda xs, f: torch.tensor([f(x) for x in xs], dtype=dtype).reshape(b, t)  # noqa: E731
    lp = grid(cols[0], lambda x: -(x % 97) / 4.0)
    old = lp - grid(cols[1], _log_ratio)
    adv = grid(cols[2], decode)
    ref = lp - grid(cols[3], _log_ratio) if draw(st.booleans()) else None
    rollout = old - grid(cols[4], _log_ratio) if draw(st.booleans()) else None
    garbage = decode(draw(st.integers(0, 191)), "grid")
    pad = lambda x: None if x is None else torch.where(m, x, torch.full_like(x, garbage))  # noqa: E731
    return PolicyLossInput(
        log_probs=pad(lp), old_log_probs=pad(old), advantages=pad(adv), loss_mask=m, ref_log_probs=pad(ref), rollout_log_probs=pad(rollout)
    )


@st.composite
def token_losses(draw, *, dtypes: Sequence[torch.dtype] = DTYPES, max_rows: int = 6, max_len: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_loss [B, T], loss_mask [B, T] bool)`` for aggregations: "wide" values, ragged
    masks, zeros or garbage in the padding."""
    dtype = draw(st.sampled_from(list(dtypes)))
    b, t = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    data = draw(_blob(b * (t + 1)))
    mask = torch.tensor([_mask_row(data[i], t, 0) for i in range(b)], dtype=torch.bool)
    loss = torch.tensor([decode(x) for x in data[b:]], dtype=dtype).reshape(b, t)
    garbage = decode(draw(st.integers(0, 255)))
    return torch.where(mask, loss, torch.full_like(loss, garbage)), mask


@attrs.frozen(kw_only=True, eq=False)
class LogProbPair:
    """What a KL estimator reads: ``log_probs [B, T]`` and ``ref_log_probs [B, T]`` (same dtype).

    Attributes:
        log_probs: log-probs of the sampled tokens under the trained policy.
        ref_log_probs: the same tokens' log-probs under the reference policy.
    """

    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)``."""
        return tuple(self.log_probs.shape)  # type: ignore[return-value]


@st.composite
def log_prob_pairs(draw, *, dtypes: Sequence[torch.dtype] = DTYPES, max_rows: int = 6, max_len: int = 5) -> LogProbPair:
    """A ``LogProbPair`` for KL estimators: log-probs in ``[-24, 0]``, reference log-probs at
    log-ratios from 0 to +-20 (mostly small multiples of 1/32, sometimes far), some tokens equal."""
    dtype = draw(st.sampled_from(list(dtypes)))
    b, t = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    data = draw(_blob(2 * b * t))
    grid = lambda xs, f: torch.tensor([f(x) for x in xs], dtype=dtype).reshape(b, t)  # noqa: E731
    lp = grid(data[: b * t], lambda x: -(x % 97) / 4.0)
    return LogProbPair(log_probs=lp, ref_log_probs=lp - grid(data[b * t:], _log_ratio))


@st.composite
def microbatch_cuts(draw, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges splitting ``batch_size`` rows into micro-batches
    (at least two when ``batch_size >= 2``)."""
    if batch_size < 2:
        return [(0, batch_size)]
    cuts = sorted(draw(st.sets(st.integers(1, batch_size - 1), min_size=1, max_size=batch_size - 1)))
    bounds = [0, *cuts, batch_size]
    return list(zip(bounds[:-1], bounds[1:]))
