"""The skyrl_train seed era of SkyRL's API (``skyrl_train.utils.ppo_utils``, early 2026).

Replace ``from skyrl_train.<any module> import X`` with ``from skyrl_fn.compat.skyrl_train
import X``. What differs from SkyRL 0.3.0 (``skyrl_fn.compat``): policy losses reduce inside, by
``config.loss_reduction`` (``reduce_loss(loss, loss_mask, loss_reduction, max_seq_len)``), and
return ``(loss, clip_ratio float)``; ``regular`` / ``dual_clip`` read ``use_tis`` /
``tis_imp_ratio_cap``; the policy-loss registry is this era's own (``SeedPolicyLossRegistry``),
so the launcher knows a registered loss already reduces. Estimators, their registry, the KL
helpers and ``sync_registries`` are shared with ``skyrl_fn.compat``.
"""

from skyrl_fn.compat._estimators import (
    AdvantageEstimator,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_rloo_outcome_advantage,
)
from skyrl_fn.compat._functional import (
    AdaptiveKLController,
    FixedKLController,
    compute_approx_kl,
    get_kl_controller,
    masked_mean,
)
from skyrl_fn.compat._policy_losses import PolicyLossType
from skyrl_fn.compat._api import compute_advantages_and_returns, register_advantage_estimator
from skyrl_fn.compat._api import register_seed_policy_loss as register_policy_loss
from skyrl_fn.compat._registry import AdvantageEstimatorRegistry, BaseFunctionRegistry, repopulate_all_registries, sync_registries
from skyrl_fn.compat._registry import SeedPolicyLossRegistry as PolicyLossRegistry
from skyrl_fn.compat._seed_losses import (
    compute_policy_loss_cispo,
    compute_policy_loss_clip_cov,
    compute_policy_loss_kl_cov,
    gspo_policy_loss,
    ppo_policy_loss,
    reduce_loss,
    sapo_policy_loss,
)

__all__ = [
    "AdvantageEstimator", "AdvantageEstimatorRegistry", "BaseFunctionRegistry", "PolicyLossRegistry",
    "PolicyLossType", "register_advantage_estimator", "register_policy_loss", "sync_registries",
    "repopulate_all_registries", "compute_advantages_and_returns",
    "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage", "compute_gae_advantage_return",
    "ppo_policy_loss", "sapo_policy_loss", "gspo_policy_loss", "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov",
    "reduce_loss", "masked_mean", "compute_approx_kl", "FixedKLController", "AdaptiveKLController",
    "get_kl_controller",
]
