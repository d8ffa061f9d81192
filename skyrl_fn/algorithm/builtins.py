"""``DEFAULT_TABLE``: every built-in, from the one explicit literal ``BUILTINS`` below.

Each row: ``(kind, name, function, promises)``. ``promises`` are the invariants (see
``skyrl_fn.core.properties``) the testing kit checks for that entry on top of the universal ones.
Importing this module builds the table once (no registration anywhere else).
"""

from __future__ import annotations

import functools

from skyrl_fn import estimators as est
from skyrl_fn import losses as ls
from skyrl_fn.core.table import AlgorithmTable

__all__ = ["BUILTINS", "DEFAULT_TABLE"]

_GROUP_NORM = frozenset({"permutation_equivariant", "group_local", "shift_invariant", "scale_invariant"})
_GROUP_CENTRED = frozenset({"permutation_equivariant", "group_local", "shift_invariant"})
# Policy losses whose per-token loss of a row depends only on that row (micro-batch exact).
_LOSS_LOCAL = frozenset({"masked_grad_zero", "microbatch_invariant", "zero_grad_at_ratio_one_zero_adv"})
# Token selection by batch-wide covariance: a row's loss depends on the rest of the batch.
_LOSS_COUPLED = frozenset({"masked_grad_zero", "zero_grad_at_ratio_one_zero_adv"})
_PER_GROUP = frozenset({"permutation_equivariant", "group_local"})
# Whitened (or scaled) over the whole batch: one group's rewards move every output, so not group_local.
_BATCH_COUPLED = frozenset({"permutation_equivariant"})
# Whitened over the batch's tokens: invariant to one positive scale of every reward of the batch.
_BATCH_WHITENED = frozenset({"permutation_equivariant", "batch_scale_invariant"})
_BATCH_WHITENED_CENTRED = _BATCH_WHITENED | {"shift_invariant"}
# KL estimates that are >= 0 for every input (k1 = log-ratio can be negative).
_KL_NON_NEGATIVE = frozenset({"non_negative"})
# Each row's output depends on that row alone (the raw forms of reinforce++ and gae).
_PER_SAMPLE = frozenset({"permutation_equivariant", "group_local"})

BUILTINS = (
    # -- advantage estimators -------------------------------------------------------------
    ("advantage_estimator", "grpo", est.grpo, _GROUP_NORM),
    ("advantage_estimator", "dr_grpo", functools.partial(est.grpo, norm_by_std=False), _GROUP_CENTRED),
    ("advantage_estimator", "rloo", est.rloo, _GROUP_CENTRED),
    ("advantage_estimator", "maxrl", est.maxrl, _PER_GROUP),
    ("advantage_estimator", "gpg", est.gpg, _BATCH_COUPLED),
    ("advantage_estimator", "grpo_passk", est.grpo_passk, _GROUP_NORM | {"rejects_singleton_groups"}),
    ("advantage_estimator", "opo", est.opo, _GROUP_CENTRED),
    # reinforce++ and gae are chains: the raw estimator, then whiten() (skyrl_fn.core.compose). grpo,
    # dr_grpo, rloo and reinforce_plus_plus_baseline are chains in maths too (outcome_estimator with
    # group_mean / leave_one_out, then group_normalize_std / whiten; tests prove each equal) but stay
    # fused: one pass over per-sample scores instead of [B, T] passes per piece.
    ("advantage_estimator", "reinforce++", est.reinforce_plus_plus, _BATCH_WHITENED),
    ("advantage_estimator", "reinforce++_raw", est.reinforce_plus_plus_raw, _PER_SAMPLE),
    ("advantage_estimator", "reinforce_plus_plus_baseline", est.reinforce_plus_plus_baseline, _BATCH_WHITENED_CENTRED),
    ("advantage_estimator", "remax", est.remax, _PER_GROUP),
    ("advantage_estimator", "gae", est.gae, _BATCH_COUPLED),
    ("advantage_estimator", "gae_raw", est.gae_raw, _PER_SAMPLE),
    # -- policy losses (skyrl_fn.losses) ---------------------------------------------------
    ("policy_loss", "regular", ls.regular, _LOSS_LOCAL),
    ("policy_loss", "dual_clip", ls.dual_clip, _LOSS_LOCAL),
    ("policy_loss", "gspo", ls.gspo, _LOSS_LOCAL),
    ("policy_loss", "cispo", ls.cispo, _LOSS_LOCAL),
    ("policy_loss", "sapo", ls.sapo, _LOSS_LOCAL),
    ("policy_loss", "clip_cov", ls.clip_cov, _LOSS_COUPLED),
    ("policy_loss", "kl_cov", ls.kl_cov, _LOSS_COUPLED),
    ("policy_loss", "gpg", ls.gpg, _LOSS_LOCAL),
    ("policy_loss", "geo_mean", ls.geo_mean, _LOSS_LOCAL),
    ("policy_loss", "reinforce", ls.reinforce, _LOSS_LOCAL),
    ("policy_loss", "cross_entropy", ls.cross_entropy, frozenset({"masked_grad_zero", "microbatch_invariant"})),
    ("policy_loss", "rollout_is", ls.rollout_is, _LOSS_LOCAL),
    ("policy_loss", "dppo", ls.dppo, _LOSS_LOCAL),
    ("policy_loss", "importance_sampling", ls.importance_sampling, _LOSS_LOCAL),
    # -- loss aggregation -----------------------------------------------------------------
    ("aggregation", "token_mean", ls.token_mean, frozenset()),
    ("aggregation", "token_sum", ls.token_sum, frozenset()),
    ("aggregation", "seq_mean_token_sum", ls.seq_mean_token_sum, frozenset()),
    ("aggregation", "seq_mean_token_mean", ls.seq_mean_token_mean, frozenset()),
    ("aggregation", "seq_mean_token_sum_norm", ls.seq_mean_token_sum_norm, frozenset()),
    ("aggregation", "sequence_mean", ls.seq_mean_token_mean, frozenset()),  # SkyRL's name
    # -- KL estimators --------------------------------------------------------------------
    ("kl_estimator", "k1", ls.k1, frozenset()),
    ("kl_estimator", "abs", ls.kl_abs, _KL_NON_NEGATIVE),
    ("kl_estimator", "k2", ls.k2, _KL_NON_NEGATIVE),
    ("kl_estimator", "mse", ls.k2, _KL_NON_NEGATIVE),  # verl's name for k2
    ("kl_estimator", "k3", ls.k3, _KL_NON_NEGATIVE),
    ("kl_estimator", "k1+", ls.k1_plus, frozenset()),
    ("kl_estimator", "abs+", ls.kl_abs_plus, _KL_NON_NEGATIVE),
    ("kl_estimator", "k2+", ls.k2_plus, _KL_NON_NEGATIVE),
    ("kl_estimator", "k3+", ls.k3_plus, _KL_NON_NEGATIVE),
)


def _build_default() -> AlgorithmTable:
    table = AlgorithmTable()
    for kind, name, fn, promises in BUILTINS:
        table = table.register(name, fn, kind=kind, promises=promises)
    return table


#: Every built-in, registered from ``BUILTINS``. Defined here, above the estimators and losses,
#: so the table module (below them) never imports them.
DEFAULT_TABLE: AlgorithmTable = _build_default()
