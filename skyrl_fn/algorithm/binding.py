"""Names bound once: registered names + hyperparameters -> an :class:`Algorithm` of callables.

A training run names its pieces (``grpo``, ``regular``, ``token_mean``, ``k3``) and gives each
its own hyperparameters. :func:`bind_algorithm` looks every name up in the table once, checks each
hyperparameter against the signature of the function it is for (a key the function does not take
is an error naming it; a key left out keeps the function's own default), and returns a frozen
:class:`Algorithm` holding callables with their hyperparameters bound. Workers receive that value
and never look a name up again. What the run must build (a critic, a reference model) is read
from the entries' ``requires`` (``skyrl_fn.core.requires``), which ``chain`` carries over, never from a
list of names.

:func:`compute_policy_loss` is the by-name convenience over ``policy_objective`` for code outside
a training run.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import attrs
import torch

from skyrl_fn.core._frozen import FrozenDict
from skyrl_fn.losses.aggregation import aggregation_name
from skyrl_fn.ops.compile import compile_loss
from skyrl_fn.losses.objective import policy_objective
from skyrl_fn.losses.off_policy import OffPolicyCorrection
from skyrl_fn.core.records import AdvantageInput, AdvantageOutput, PolicyLossInput, ReducedLoss
from skyrl_fn.core.requires import fields_needed
from skyrl_fn.core.table import AlgorithmTable, Entry, unknown_name_message

__all__ = [
    "SUPPLIED",
    "Algorithm",
    "CheckedEstimator",
    "entry_hyperparameters",
    "bind",
    "bind_algorithm",
    "compute_policy_loss",
]

#: Keywords a kind's functions receive from their caller (the objective, the trainer), not from the user.
SUPPLIED: Mapping[str, frozenset[str]] = {
    "aggregation": frozenset({"global_tokens", "global_seqs", "max_seq_len", "group_ids", "group_tokens", "global_groups"}),
    "task": frozenset({"seed"}),
    "rollout_backend": frozenset({"seed", "colocated"}),
}


def entry_hyperparameters(entry: Entry) -> Mapping[str, Any] | None:
    """Name -> default of the hyperparameters a user may set for ``entry`` (the supplied
    normalisers of an aggregation excluded); None when the function takes ``**kwargs``."""
    accepted = entry.hyperparameters()
    if accepted is None:
        return None
    supplied = SUPPLIED.get(entry.kind, frozenset())
    return {k: v for k, v in accepted.items() if k not in supplied}


@attrs.frozen(eq=False)
class CheckedEstimator:
    """An advantage estimator with its hyperparameters bound whose output is checked against its
    input after every call (shape, dtype, finite, zero off the mask; ``AdvantageOutput.check_against``),
    so a custom estimator that leaks into padding fails naming itself.

    Attributes:
        name: the registered name (used in errors).
        fn: ``fn(batch: AdvantageInput) -> AdvantageOutput``.
    """

    name: str
    fn: Callable[[AdvantageInput], AdvantageOutput]

    def __call__(self, batch: AdvantageInput) -> AdvantageOutput:
        """Run the estimator on ``batch`` ``[B, T]`` and check its output."""
        if not isinstance(batch, AdvantageInput):
            raise TypeError(f"batch: expected an AdvantageInput, got {type(batch).__name__}")
        out = self.fn(batch)
        if not isinstance(out, AdvantageOutput):
            raise TypeError(f"advantage estimator {self.name!r}: expected it to return an AdvantageOutput, got {type(out).__name__}")
        return out.check_against(batch, name=f"advantage estimator {self.name!r}")


@attrs.frozen(eq=False)
class ShareWeighted:
    """An aggregation that takes none of the global normalisers, made exact for per-sequence
    means under micro-batching: its value is weighted by the micro-batch's share of sequences,
    ``fn(l, m) * B_micro / global_seqs``."""

    fn: Callable[..., torch.Tensor]

    def __call__(self, token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None) -> torch.Tensor:
        out = self.fn(token_loss, loss_mask)
        return out if global_seqs is None else out * (token_loss.shape[0] / global_seqs)


def _accepts_any(fn: Callable, names: frozenset[str]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return any(n in params for n in names) or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _takes_kwargs(fn: Callable) -> bool:
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def bind(table: AlgorithmTable, kind: str, name: str, hyper: Mapping[str, Any] | None = None) -> Callable:
    """The function registered as ``name`` with ``hyper`` bound (``functools.partial``).

    Only the keys in ``hyper`` are passed; every other hyperparameter keeps the function's own
    default. An advantage estimator comes back as a :class:`CheckedEstimator`; an aggregation that
    takes no global normaliser as a :class:`ShareWeighted`.

    Raises:
        UnknownNameError: ``name`` is not registered under ``kind`` (lists the closest name).
        ValueError: a key of ``hyper`` the function does not take (named, with what it takes).
    """
    entry = table.entry(kind, name)
    hyper = dict(hyper or {})
    accepted = entry_hyperparameters(entry)
    what = f"{kind.replace('_', ' ')} {name!r}"
    for key in hyper:
        if key in SUPPLIED.get(kind, ()):
            raise ValueError(f"{what}: {key!r} is supplied by the objective (the whole batch's count), not a hyperparameter")
        if accepted is not None and key not in accepted:
            takes = ", ".join(sorted(accepted)) or "none"
            raise ValueError(f"{what}: {unknown_name_message('hyperparameter', key, accepted)} (it takes: {takes})")
    fn = functools.partial(entry.fn, **hyper) if hyper else entry.fn
    if kind == "advantage_estimator":
        return CheckedEstimator(name, fn)
    if kind == "aggregation" and not _accepts_any(entry.fn, SUPPLIED["aggregation"]):
        return ShareWeighted(fn)
    return fn


@attrs.frozen(kw_only=True, eq=False)
class Algorithm:
    """The algorithm of a run with every name bound: what workers receive instead of names.

    Attributes:
        names: kind -> the registered name (for messages and logs).
        hyper: kind -> the hyperparameters bound (only those set; the rest are the functions'
            own defaults).
        estimator: ``fn(AdvantageInput) -> AdvantageOutput`` (checked output).
        policy_loss: ``fn(PolicyLossInput) -> PolicyLossOutput``.
        aggregation: ``fn(token_loss, mask, *, global_tokens, global_seqs, max_seq_len) -> []``.
        kl_estimator: ``fn(log_probs, ref_log_probs) -> [B, T]`` (KL loss, penalty and metric).
        kl_loss_coef: weight of the KL loss term; 0 when there is none.
        kl_in_reward: subtract ``kl_coef * KL`` from the token rewards.
        correction: ``fn(batch: PolicyLossInput) -> OffPolicyCorrection`` (bound, or a chain of
            ``skyrl_fn.losses.compose_corrections``) or None.
        entropy_coef: weight of the entropy bonus (0: none, and no entropy is computed).
        needs_critic: the estimator reads critic values (an entry's ``requires``).
        needs_reference: a KL term is used or the policy loss reads ``ref_log_probs``.
        fields: piece label -> the per-sample ``extras`` keys it reads as bound
            (``skyrl_fn.core.requires.fields_needed``); the run checks them against what it produces.
        aggregation_takes_groups: the aggregation takes each row's prompt (``group_ids``:
            ``prompt_mean``), so the learner passes the step's prompt totals.
        microbatch_invariant: the policy loss and the aggregation both promise
            ``microbatch_invariant`` (their sum over micro-batches does not depend on which rows
            share one), so the learner may cut micro-batches from the rows in any order
            (``skyrl_fn.trainer.micro_batches``); False for ``token_mean_legacy`` and the
            covariance-selecting losses, which keep the row order.
    """

    names: Mapping[str, str] = attrs.field(converter=FrozenDict)
    hyper: Mapping[str, Mapping[str, Any]] = attrs.field(
        factory=dict, converter=lambda m: FrozenDict({k: FrozenDict(v) for k, v in m.items()})
    )
    estimator: Callable[[AdvantageInput], AdvantageOutput]
    policy_loss: Callable
    aggregation: Callable[..., torch.Tensor]
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kl_loss_coef: float = 0.0
    kl_in_reward: bool = False
    correction: Callable[..., OffPolicyCorrection] | None = None
    entropy_coef: float = 0.0
    needs_critic: bool = False
    needs_reference: bool = False
    fields: Mapping[str, frozenset[str]] = attrs.field(factory=dict, converter=FrozenDict)
    aggregation_takes_groups: bool = False
    microbatch_invariant: bool = False

    def objective(self) -> Callable[..., ReducedLoss]:
        """``policy_objective`` with this algorithm's pieces bound: ``fn(batch, *, global_tokens,
        global_seqs, max_seq_len, entropy=None) -> ReducedLoss``."""
        return functools.partial(
            policy_objective, loss=self.policy_loss, aggregation=self.aggregation, correction=self.correction,
            kl_estimator=self.kl_estimator, kl_loss_coef=self.kl_loss_coef, entropy_coef=self.entropy_coef,
        )


_KINDS = ("advantage_estimator", "policy_loss", "aggregation", "kl_estimator")


def bind_algorithm(
    table: AlgorithmTable,
    names: Mapping[str, str],
    hyper: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    use_kl_loss: bool = False,
    kl_loss_coef: float = 0.0,
    kl_in_reward: bool = False,
    correction: Callable[..., OffPolicyCorrection] | None = None,
    entropy_coef: float = 0.0,
) -> Algorithm:
    """Bind every piece of a run once.

    Args:
        table: where the names are registered.
        names: kind -> name for ``advantage_estimator``, ``policy_loss``, ``aggregation`` and
            ``kl_estimator``.
        hyper: kind -> that function's hyperparameters (only the ones to set).
        use_kl_loss: add ``kl_loss_coef * KL`` to the policy objective.
        kl_loss_coef: its weight.
        kl_in_reward: the KL penalty on the rewards is used (needs the reference model).
        correction: the bound off-policy correction, or None.
        entropy_coef: weight of the entropy bonus.

    Raises:
        UnknownNameError: an unknown name (all are looked up before any hyperparameter is checked).
        ValueError: a missing kind, or a hyperparameter a function does not take.
    """
    missing = [k for k in _KINDS if k not in names]
    if missing:
        raise ValueError(f"names: expected a name for each of {list(_KINDS)}, got none for {missing}")
    hyper = dict(hyper or {})
    unknown = sorted(set(hyper) - set(_KINDS))
    if unknown:
        raise ValueError(f"hyper: expected kinds from {list(_KINDS)}, got {unknown}")
    entries = {k: table.entry(k, names[k]) for k in _KINDS}  # a typo fails before anything else
    loss_hyper = entries["policy_loss"].hyperparameters() or {}
    if "loss_reduction" in loss_hyper and "loss_reduction" not in (hyper.get("policy_loss") or {}):
        # A loss that reduces itself (SkyRL-style) is told the run's aggregation, in its own words.
        hyper["policy_loss"] = {**(hyper.get("policy_loss") or {}), "loss_reduction": names["aggregation"]}
    bound = {k: bind(table, k, names[k], hyper.get(k)) for k in _KINDS}
    return Algorithm(
        names={k: names[k] for k in _KINDS}, hyper={k: dict(hyper.get(k) or {}) for k in _KINDS},
        estimator=bound["advantage_estimator"], policy_loss=bound["policy_loss"], aggregation=bound["aggregation"],
        kl_estimator=bound["kl_estimator"], kl_loss_coef=float(kl_loss_coef) if use_kl_loss else 0.0,
        kl_in_reward=kl_in_reward, correction=correction, entropy_coef=float(entropy_coef),
        needs_critic="values" in entries["advantage_estimator"].requires,
        needs_reference=use_kl_loss or kl_in_reward or "ref_log_probs" in entries["policy_loss"].requires,
        fields={
            f"algorithm.{k} {names[k]!r}": fields_needed(entries[k].fn, hyper.get(k))
            for k in ("advantage_estimator", "policy_loss")
        },
        aggregation_takes_groups=_accepts_any(entries["aggregation"].fn, frozenset({"group_ids"}))
        and not _takes_kwargs(entries["aggregation"].fn),
        microbatch_invariant=all("microbatch_invariant" in entries[k].promises for k in ("policy_loss", "aggregation")),
    )


def _given(correction: OffPolicyCorrection, batch: PolicyLossInput) -> OffPolicyCorrection:
    return correction


def compute_policy_loss(
    table: AlgorithmTable,
    name: str,
    batch: PolicyLossInput,
    *,
    hyper: Mapping[str, Any] | None = None,
    aggregation: str = "token_mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    max_seq_len: int | None = None,
    correction: OffPolicyCorrection | None = None,
    kl_loss_coef: float = 0.0,
    kl_estimator: str = "k3",
    compile: bool | str = False,
) -> ReducedLoss:
    """Policy loss ``name`` of ``table`` on ``batch``, through ``policy_objective``::

        loss = agg(l * correction.weights, mask) + kl_loss_coef * agg(KL_est(log_probs, ref_log_probs), mask)

    For micro-batching pass ``global_tokens`` / ``global_seqs`` (totals over all micro-batches
    and data-parallel ranks of the optimiser step) and a fixed ``max_seq_len``.

    Args:
        table: the ``AlgorithmTable`` the names are looked up in.
        name: registered policy loss name.
        batch: the ``PolicyLossInput``.
        hyper: the loss's hyperparameters (unknown names raise ValueError).
        aggregation: registered aggregation name (SkyRL's ``sequence_mean`` and verl's hyphenated
            names accepted).
        global_tokens, global_seqs, max_seq_len: the normalisers.
        correction: an ``OffPolicyCorrection`` from ``off_policy_correction``.
        kl_loss_coef: weight of the KL-to-reference term; 0 disables it.
        kl_estimator: registered ``kl_estimator`` name for that term.
        compile: run the objective through ``compile_loss``; a string names the backend.

    Returns:
        ``ReducedLoss`` with the loss's metrics, ``pg_loss`` and, with a KL term, ``kl_loss``.

    Raises:
        UnknownNameError: unknown loss, aggregation or KL estimator name.
        ValueError: unknown hyperparameter; ``kl_loss_coef != 0`` without ``ref_log_probs``.
        TypeError: ``batch`` is not a ``PolicyLossInput``.
    """
    names = {"policy_loss": name, "aggregation": aggregation_name(aggregation), "kl_estimator": kl_estimator}
    fns = {k: bind(table, k, n, hyper if k == "policy_loss" else None) for k, n in names.items()}
    if isinstance(kl_loss_coef, bool) or not isinstance(kl_loss_coef, (int, float)):
        raise TypeError(f"kl_loss_coef: expected a number, got {type(kl_loss_coef).__name__}")
    if correction is not None and not isinstance(correction, OffPolicyCorrection):
        raise TypeError(f"correction: expected an OffPolicyCorrection, got {type(correction).__name__}")
    objective = functools.partial(
        policy_objective, loss=fns["policy_loss"], aggregation=fns["aggregation"], kl_estimator=fns["kl_estimator"],
        kl_loss_coef=kl_loss_coef, correction=None if correction is None else functools.partial(_given, correction),
    )
    if compile:
        objective = compile_loss(objective) if compile is True else compile_loss(objective, backend=str(compile))
    return objective(batch, global_tokens=global_tokens, global_seqs=global_seqs, max_seq_len=max_seq_len)
