"""Policy losses, loss aggregation, KL, value loss, entropy and off-policy corrections.

Policy losses: ``fn(batch: PolicyLossInput, **hyper) -> PolicyLossOutput`` (per-token loss [B, T]).
Aggregations: ``fn(token_loss [B, T], loss_mask [B, T], *, global_tokens, global_seqs, max_seq_len)
-> []``. KL estimators: ``fn(log_probs [B, T], ref_log_probs [B, T]) -> [B, T]``. The built-ins are
registered in ``skyrl_fn.DEFAULT_TABLE`` (nothing here reads it); ``policy_objective`` runs a bound
loss + correction + aggregation (+ KL and entropy terms) as one pure function. (``compile_loss``
and the memory-light log-probs of an LM head are ops, a layer above: ``skyrl_fn.ops.compile``,
``skyrl_fn.ops.logprobs``.)
"""

from skyrl_fn.losses.aggregation import (
    AGGREGATIONS,
    SKYRL_REDUCTIONS,
    aggregate,
    aggregation_name,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
    token_sum,
)
from skyrl_fn.losses.cov import clip_cov, kl_cov
from skyrl_fn.losses.kl import (
    KL_ESTIMATORS,
    KLController,
    k1,
    k1_plus,
    k2,
    k2_plus,
    k3,
    k3_plus,
    kl_abs,
    kl_abs_plus,
    kl_controller,
    kl_penalty_rewards,
    kl_token_loss,
)
from skyrl_fn.losses.objective import SUMMED_METRICS, policy_objective
from skyrl_fn.losses.off_policy import (
    OffPolicyCorrection,
    icepop_mask,
    mismatch_metrics,
    off_policy_correction,
    sequence_keep,
    sequence_mask,
    tis_weights,
)
from skyrl_fn.losses.reduction_weights import REDUCTIONS, reduction_weights
from skyrl_fn.losses.pg import cispo, cross_entropy, gpg, importance_sampling, reinforce, rollout_is
from skyrl_fn.losses.ppo import dppo, dppo_mask, dual_clip, geo_mean, gspo, regular, sapo
from skyrl_fn.losses.value import entropy_from_logits, value_loss

#: ``reduce`` is ``aggregate``: token_loss [B, T] -> scalar by aggregation name.
reduce = aggregate

__all__ = [
    # policy losses
    "regular", "dual_clip", "gspo", "cispo", "sapo", "clip_cov", "kl_cov", "gpg", "geo_mean",
    "reinforce", "cross_entropy", "rollout_is", "dppo", "dppo_mask", "importance_sampling",
    # aggregation
    "token_mean", "token_sum", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm",
    "AGGREGATIONS", "SKYRL_REDUCTIONS", "aggregation_name", "aggregate", "reduce",
    # the objective
    "policy_objective", "SUMMED_METRICS",
    # KL
    "k1", "kl_abs", "k2", "k3", "k1_plus", "kl_abs_plus", "k2_plus", "k3_plus", "KL_ESTIMATORS",
    "kl_token_loss", "kl_penalty_rewards", "KLController", "kl_controller",
    # value, entropy
    "value_loss", "entropy_from_logits",
    # off-policy
    "OffPolicyCorrection", "tis_weights", "icepop_mask", "sequence_keep", "sequence_mask", "mismatch_metrics",
    "off_policy_correction",
    # reduction weights (SkyRL 0.3.0: the reduction applied to the advantages)
    "REDUCTIONS", "reduction_weights",
]
