"""Batch transforms: pure functions over one step's sampled batch, ``SampleBatch -> SampleBatch``.

They run in the training loop between sampling and the update (``skyrl_fn.trainer.batch_transforms``),
before rewards become token rewards and advantages, and may drop or repeat rows (whole prompt
groups), change the outcome scores, or take tokens out of the loss. Registered in the table under
the kind ``batch_transform`` and chosen by name (``--algorithm.batch-transforms``).

Notation: ``B`` sequences, ``T`` response tokens, ``G`` samples per prompt, ``s`` the scores ``[B]``,
``L_i`` the length of response ``i``, ``L_max`` the generation budget (``max_new_tokens``).

==========================  ============================================================  =====================
name                        does                                                          source
==========================  ============================================================  =====================
``overlong_filter``         loss mask 0 on truncated responses                            DAPO §3.4 (Yu et al. 2025)
``overlong_penalty``        soft length penalty in the last ``overlong_buffer_len``       DAPO eq. 13; verl ``overlong_buffer``
``zero_variance_filter``    drop prompt groups whose scores are all equal                 DAPO §3.2 (the filter alone)
``dynamic_sampling``        the filter, plus refill from further rollouts (``filter``),   DAPO ``filter_groups``; SkyRL
                            or copies of informative groups (``replace``)                 ``dynamic_sampling``
==========================  ============================================================  =====================
"""

from __future__ import annotations

from typing import Callable, Literal

import attrs
import torch

from skyrl_fn.core._checks import as_mask, check_finite, check_floating, check_number, check_shape, check_tensor

__all__ = [
    "SampleBatch",
    "BatchPipeline",
    "group_spread",
    "overlong_filter",
    "overlong_penalty",
    "zero_variance_filter",
    "dynamic_sampling",
]


def _long(name: str):
    def convert(x):
        x = check_tensor(name, x)
        if x.dtype != torch.long:
            raise TypeError(f"{name}: expected int64, got {x.dtype}")
        return x

    return attrs.field(converter=convert)


@attrs.frozen(kw_only=True, eq=False)
class SampleBatch:
    """One step's sampled batch as the batch transforms see it (rows in sampling order).

    Attributes:
        scores: ``[B]`` floating outcome rewards, finite.
        response_mask: ``[B, T]`` bool, 1 on generated tokens (EOS included).
        loss_mask: ``[B, T]`` bool, 1 on tokens that count in the policy loss; within
            ``response_mask``.
        group_ids: ``[B]`` int64 prompt of each row (rows of one prompt form a group).
        truncated: ``[B]`` bool, True where the response hit ``max_response_length`` without EOS.
        source: ``[B]`` int64 row of the sampled batch each row comes from (a dropped row is
            gone, a repeated row appears twice).
        max_response_length: ``L_max``, the generation budget the batch was sampled with.
        sample_batches: how many sampled batches this step may draw in all (1: no refill; a
            transform that drops groups raises it to ask the loop for more, see ``dynamic_sampling``).
        seed: seed of any random choice a transform makes (the step's sampling seed).
    """

    scores: torch.Tensor = attrs.field()
    response_mask: torch.Tensor = attrs.field(converter=lambda x: as_mask("response_mask", x))
    loss_mask: torch.Tensor = attrs.field(converter=lambda x: as_mask("loss_mask", x))
    group_ids: torch.Tensor = _long("group_ids")
    truncated: torch.Tensor = attrs.field(converter=lambda x: as_mask("truncated", x))
    source: torch.Tensor = _long("source")
    max_response_length: int = attrs.field()
    sample_batches: int = 1
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        check_floating("scores", self.scores)
        if self.scores.dim() != 1:
            raise ValueError(f"scores: expected shape [B], got {tuple(self.scores.shape)}")
        b = self.scores.shape[0]
        if self.response_mask.dim() != 2:
            raise ValueError(f"response_mask: expected shape [B, T], got {tuple(self.response_mask.shape)}")
        t = self.response_mask.shape[1]
        check_shape("response_mask", self.response_mask, (b, t), "[B, T]")
        check_shape("loss_mask", self.loss_mask, (b, t), "[B, T]")
        for name in ("group_ids", "truncated", "source"):
            check_shape(name, getattr(self, name), (b,), "[B]")
        check_finite("scores", self.scores)
        if bool((self.loss_mask & ~self.response_mask).any()):
            raise ValueError("loss_mask: expected 1 only where response_mask is 1, got 1 on a padding position")
        if isinstance(self.max_response_length, bool) or not isinstance(self.max_response_length, int) or self.max_response_length < 1:
            raise ValueError(f"max_response_length: expected an int >= 1, got {self.max_response_length!r}")
        if isinstance(self.sample_batches, bool) or not isinstance(self.sample_batches, int) or self.sample_batches < 1:
            raise ValueError(f"sample_batches: expected an int >= 1, got {self.sample_batches!r}")

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.scores.shape[0]

    def lengths(self) -> torch.Tensor:
        """``[B]`` int64 response lengths ``L_i``."""
        return self.response_mask.sum(-1)

    def num_groups(self) -> int:
        """Distinct prompts in the batch."""
        return int(torch.unique(self.group_ids).numel())

    def select(self, rows: torch.Tensor) -> "SampleBatch":
        """Rows ``rows`` (``[B']`` int64 indices, repeats allowed), every per-row field together."""
        rows = rows.to(torch.long)
        return attrs.evolve(
            self, scores=self.scores[rows], response_mask=self.response_mask[rows], loss_mask=self.loss_mask[rows],
            group_ids=self.group_ids[rows], truncated=self.truncated[rows], source=self.source[rows],
        )


@attrs.frozen(eq=False)
class BatchPipeline:
    """Batch transforms applied in order, each with its hyperparameters bound.

    Attributes:
        names: the registered names (for logs and messages).
        fns: ``fn(SampleBatch) -> SampleBatch`` each, applied left to right.
    """

    names: tuple[str, ...] = attrs.field(converter=tuple)
    fns: tuple[Callable[[SampleBatch], SampleBatch], ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        if len(self.names) != len(self.fns):
            raise ValueError(f"fns: expected one per name ({len(self.names)}), got {len(self.fns)}")

    def __call__(self, batch: SampleBatch) -> SampleBatch:
        """Apply every transform in order; each output must be a ``SampleBatch`` (named if not)."""
        for name, fn in zip(self.names, self.fns):
            out = fn(batch)
            if not isinstance(out, SampleBatch):
                raise TypeError(f"batch transform {name!r}: expected it to return a SampleBatch, got {type(out).__name__}")
            batch = out
        return batch


def group_spread(batch: SampleBatch) -> torch.Tensor:
    """``[B]`` bool: True where the row's group has scores that are not all equal (max > min).

    Exact comparison, as SkyRL 0.3.0's ``zero_variance_filter`` with ``tol=0`` and verl 0.9.1's
    ``filter_groups`` on its float32 rewards. Deviation: SkyRL's ``handle_dynamic_sampling`` tests
    ``np.std(scores) > 0`` on Python floats, which rounding makes true for some equal scores (three
    of 0.1); such a group counts as all equal here (its group-relative advantages are 0 up to that
    rounding). For integer or dyadic scores (0/1 accuracy) all agree (tested against the peers' code).
    """
    ids = batch.group_ids
    n = int(ids.max()) + 1 if ids.numel() else 0
    s = batch.scores.to(torch.float64)
    hi = torch.full((n,), -torch.inf, dtype=s.dtype).scatter_reduce(0, ids, s, "amax")
    lo = torch.full((n,), torch.inf, dtype=s.dtype).scatter_reduce(0, ids, s, "amin")
    return (hi > lo)[ids]


def overlong_filter(batch: SampleBatch) -> SampleBatch:
    """Overlong filtering: truncated responses leave the loss (their loss mask becomes 0).

    A response that reached ``max_response_length`` without an EOS has no outcome the reward can
    judge fairly, so DAPO (Yu et al. 2025, §3.4, https://arxiv.org/abs/2503.14476) masks its loss
    instead of punishing it. Its score stays and still counts in its group's baseline (as SkyRL's
    ``apply_overlong_filtering``, which zeroes the loss mask only).

    Tested equal to SkyRL 0.3.0's ``apply_overlong_filtering`` with vLLM's stop reason ``length``
    for ``truncated``. Deviation: SkyRL masks every stop reason other than ``stop`` (e.g. vLLM's
    ``abort``); the rollouts here record only truncation.

    Args:
        batch: the ``SampleBatch`` (``B`` rows).

    Returns:
        the batch with ``loss_mask[i] = 0`` for every ``truncated[i]``; nothing else changes.
    """
    return attrs.evolve(batch, loss_mask=batch.loss_mask & ~batch.truncated[:, None])


def overlong_penalty(batch: SampleBatch, *, overlong_buffer_len: int = 4, penalty_factor: float = 1.0) -> SampleBatch:
    """DAPO's soft overlong punishment: a linear length penalty added to the score in the last
    ``overlong_buffer_len`` tokens of the budget (Yu et al. 2025, eq. 13)::

        R_len(L) = 0                                 if L <= L_max - L_buf
                 = (L_max - L_buf - L) / L_buf * f   if L_max - L_buf < L <= L_max
        s'_i = s_i + R_len(L_i)

    with ``L_buf = overlong_buffer_len``, ``f = penalty_factor`` (the paper's ``f = 1``). The
    penalty reaches ``-f`` at ``L = L_max``. verl's names: ``reward.overlong_buffer.len`` and
    ``.penalty_factor`` (its ``max_resp_len`` is ``rollout.max_new_tokens`` here). Tested equal to
    verl 0.9.1's ``DAPORewardManager`` (to 1e-6: verl adds in float32) and to SkyRL 0.3.0's DAPO
    example trainer (``DAPOTrainer.postprocess_generator_output``).

    Args:
        batch: the ``SampleBatch``.
        overlong_buffer_len: ``L_buf >= 1``, in tokens. Above ``L_max`` every response is in the
            buffer (the formula as written); the launcher rejects that setting, as verl's
            ``DAPORewardManager`` does (``max_resp_len >= overlong_buffer.len``).
        penalty_factor: ``f >= 0``.

    Returns:
        the batch with shaped scores.

    Raises:
        ValueError: ``overlong_buffer_len < 1`` or a negative ``penalty_factor``.
    """
    if isinstance(overlong_buffer_len, bool) or not isinstance(overlong_buffer_len, int) or overlong_buffer_len < 1:
        raise ValueError(f"overlong_buffer_len: expected an int >= 1, got {overlong_buffer_len!r}")
    factor = check_number("penalty_factor", penalty_factor, low=0.0)
    expected = batch.max_response_length - overlong_buffer_len
    exceed = (batch.lengths() - expected).clamp(min=0).to(batch.scores.dtype)
    return attrs.evolve(batch, scores=batch.scores - exceed / overlong_buffer_len * factor)


def zero_variance_filter(batch: SampleBatch) -> SampleBatch:
    """Drop every prompt group whose scores are all equal (std 0), and do not refill.

    Such a group gives every group-relative estimator (GRPO, RLOO, ...) zero advantages, so it
    only dilutes the loss normaliser (DAPO §3.2). A group of one row is kept (SkyRL keeps groups
    when ``n_samples_per_prompt == 1``: its std is 0 by definition, not by agreement).

    Keeps the rows SkyRL 0.3.0's ``zero_variance_filter(rewards, uids, tol=0.0)`` keeps and drops
    the groups verl 0.9.1's ``filter_groups`` evicts (tested against their own code). Deviations from SkyRL's trainer option ``zero_variance_filter``: its
    default ``zero_variance_filter_tol`` is 1e-6 (equality here is exact, SkyRL's ``tol=0``); it
    judges a group by its live rows only (loss mask not all 0), where here every row counts, as
    in verl's ``filter_groups`` (a row ``overlong_filter`` masked still has its score in the
    group's baseline, so its partners' advantages are not 0); and it zeroes the dropped groups'
    loss masks instead of removing the rows (the same loss under ``token_mean``/``prompt_mean``;
    under the sequence means SkyRL still counts those rows in ``B``).

    Returns:
        the rows of the informative groups, in order (possibly none).
    """
    counts = torch.bincount(batch.group_ids)[batch.group_ids]
    keep = group_spread(batch) | (counts == 1)
    return batch.select(torch.nonzero(keep).flatten())


def dynamic_sampling(
    batch: SampleBatch,
    *,
    type: Literal["filter", "replace"] = "filter",
    max_sample_batches: int = 30,
    min_replace_ratio: float = 0.3,
) -> SampleBatch:
    """Dynamic sampling: train only on prompt groups whose scores differ.

    ``filter`` (DAPO's ``filter_groups``, Yu et al. 2025 §3.2; SkyRL ``dynamic_sampling.type=filter``):
    drop the zero-variance groups (:func:`zero_variance_filter`) and ask the loop for up to
    ``max_sample_batches`` sampled batches in all; the loop samples fresh prompts until ``P``
    informative groups are collected and keeps the first ``P``.

    ``replace`` (POLARIS; SkyRL ``dynamic_sampling.type=replace``): when more than
    ``min_replace_ratio * groups`` of the groups are informative, every zero-variance group's rows
    are replaced by the rows of an informative group (chosen without repetition while there are
    enough, seeded by ``batch.seed``; a copy keeps its source's group id, so the two form one
    group); otherwise the whole batch is dropped and the loop samples another, up to
    ``max_sample_batches``.

    When the budget runs out with fewer than ``P`` groups the loop trains on what it collected
    (the peers raise instead; ``skyrl_fn.trainer.batch_transforms``).

    Tested against SkyRL 0.3.0's own ``handle_dynamic_sampling``: ``filter`` over streams of
    sampled batches stops after the same batch and keeps the same rows in the same order;
    ``replace`` gives the same rows, scores, masks and uids for the same choice of groups and asks
    for a new batch exactly when SkyRL does. Deviations: all-equal is exact equality (see
    :func:`group_spread`); ``replace`` draws its groups from a generator seeded by ``batch.seed``
    (SkyRL: numpy's global generator, paired with the bad groups in set order), so a run is
    reproducible; the exhausted budget (above); SkyRL 0.3.0 fails when the first two batches of a
    step keep no group (its rollout metrics over no responses), where the loop here samples on.

    Args:
        batch: the ``SampleBatch``.
        type: ``filter`` or ``replace``.
        max_sample_batches: sampled batches a step may draw, >= 1 (verl: ``max_num_gen_batches``,
            where 0 means unlimited; here a number is required).
        min_replace_ratio: ``replace`` only, in [0, 1).

    Returns:
        the kept rows, with ``sample_batches`` raised to ``max_sample_batches``.
    """
    if type not in ("filter", "replace"):
        raise ValueError(f"type: expected 'filter' or 'replace', got {type!r}")
    if isinstance(max_sample_batches, bool) or not isinstance(max_sample_batches, int) or max_sample_batches < 1:
        raise ValueError(f"max_sample_batches: expected an int >= 1, got {max_sample_batches!r}")
    ratio = check_number("min_replace_ratio", min_replace_ratio, low=0.0)
    if ratio >= 1:
        raise ValueError(f"min_replace_ratio: expected in [0, 1), got {min_replace_ratio!r}")
    budget = max(batch.sample_batches, max_sample_batches)
    if type == "filter":
        return attrs.evolve(zero_variance_filter(batch), sample_batches=budget)
    return attrs.evolve(_replace(batch, ratio), sample_batches=budget)


def _replace(batch: SampleBatch, ratio: float) -> SampleBatch:
    counts = torch.bincount(batch.group_ids)
    good_row = group_spread(batch) | (counts[batch.group_ids] == 1)
    groups = torch.unique(batch.group_ids)  # sorted
    good = [int(g) for g in groups if bool(good_row[batch.group_ids == g].all())]
    bad = [int(g) for g in groups if int(g) not in set(good)]
    if not len(good) > len(groups) * ratio:
        return batch.select(torch.zeros(0, dtype=torch.long))
    gen = torch.Generator().manual_seed(int(batch.seed) % (2**63 - 1))
    if len(good) >= len(bad):
        picks = [good[i] for i in torch.randperm(len(good), generator=gen)[: len(bad)].tolist()]
    else:
        picks = [good[i] for i in torch.randint(len(good), (len(bad),), generator=gen).tolist()]
    rows = torch.arange(batch.batch_size)
    for g_bad, g_good in zip(bad, picks):
        dst = torch.nonzero(batch.group_ids == g_bad).flatten()
        src = torch.nonzero(batch.group_ids == g_good).flatten()
        n = min(len(dst), len(src))
        rows[dst[:n]] = src[:n]  # equal group sizes (G each) in a sampled batch
    return batch.select(rows)
