"""SkyRL drop-in façade: SkyRL code runs with only its import lines changed.

Two eras of SkyRL's API, each exact:

- SkyRL 0.3.0 (``skyrl.*``): ``from skyrl.<any module> import X`` becomes
  ``from skyrl_fn.compat import X``; ``off_policy_correction_utils`` is also
  ``skyrl_fn.compat.off_policy_correction_utils``. Policy losses return ``(masked-sum loss,
  metrics dict)`` and the reduction is applied to the advantages
  (``apply_loss_reduction_to_advantages_minibatch``); ``AdvantageEstimator`` is the ``StrEnum``.
- the skyrl_train seed era (``skyrl_train.*``): ``from skyrl_train.<any module> import X`` becomes
  ``from skyrl_fn.compat.skyrl_train import X``. Losses reduce inside and return ``(loss,
  clip_ratio float)``. The seed's class-based estimator base is
  ``skyrl_fn.compat.advantage_estimators.AdvantageEstimator``.

Underneath, every function calls the native pure functions (``skyrl_fn.estimators``,
``skyrl_fn.losses``); registrations become one frozen ``AlgorithmTable`` through ``freeze()``,
which the launcher and Ray workers receive. docs/skyrl-deviations.md lists every deliberate
difference from SkyRL.

On Ray, a driver publishes ``freeze()`` as an immutable snapshot (on ``sync_registries()`` and
whenever it registers or unregisters while Ray is up), and every task and actor of the job looks
up names it does not know in the latest snapshot; workers never write it
(``skyrl_fn.compat._snapshot``). ``sync_registries()`` also checks that every registration
pickles, and returns ``freeze()``. The registries are mutable global state, as in SkyRL; the rest
of the library passes the frozen table.
"""

from skyrl_fn.compat._advantages import HYPER_ALIASES, NativeFromSkyRL, SkyRLCallable
from skyrl_fn.compat._calls import LossConfig
from skyrl_fn.compat._config import (
    AlgorithmConfig,
    CISPOConfig,
    ClipCovConfig,
    DPPOConfig,
    DynamicSamplingConfig,
    KLCovConfig,
    KLCtrlConfig,
    OffPolicyCorrectionConfig,
    SAPOConfig,
)
from skyrl_fn.compat._estimators import (
    AdvantageEstimator,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_maxrl_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_rloo_outcome_advantage,
)
from skyrl_fn.compat._functional import (
    AdaptiveKLController,
    FixedKLController,
    apply_loss_reduction_to_advantages_minibatch,
    compute_approx_kl,
    get_kl_controller,
    masked_mean,
    reduce_loss,
)
from skyrl_fn.compat._losses import (
    CONFIG_FIELDS,
    LOSS_REDUCTIONS,
    NativeFromSkyRLLoss,
    SkyRLPolicyLoss,
    SkyRLSumPolicyLoss,
    config_from_hyperparameters,
)
from skyrl_fn.compat._policy_losses import (
    LOSSES_WITH_OLD_LOGPROBS,
    LOSSES_WITHOUT_OLD_LOGPROBS,
    PolicyLossType,
    compute_policy_loss_cispo,
    compute_policy_loss_clip_cov,
    compute_policy_loss_kl_cov,
    cross_entropy_loss,
    dppo_policy_loss,
    gspo_policy_loss,
    importance_sampling_loss,
    ppo_policy_loss,
    rollout_is_policy_loss,
    sapo_policy_loss,
)
from skyrl_fn.compat._api import compute_advantages_and_returns, register_advantage_estimator, register_policy_loss
from skyrl_fn.compat._registry import (
    AdvantageEstimatorRegistry,
    BaseFunctionRegistry,
    PolicyLossRegistry,
    freeze,
    repopulate_all_registries,
    sync_registries,
)
from skyrl_fn.compat._trainer_metrics import (
    MEAN_LOSS_METRICS,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY,
    MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY,
    compute_minibatch_rollout_logprob_diff_metrics,
    finalize_minibatch_rollout_logprob_diff_std,
    reduce_metrics,
)
from skyrl_fn.compat.off_policy_correction_utils import (
    apply_off_policy_correction,
    compute_off_policy_correction,
    compute_outlier_token_mask,
    compute_sequence_mask,
    compute_tis_ratio,
    compute_token_mask,
    off_policy_correction_enabled,
)
from skyrl_fn.core.table import UnknownNameError

__all__ = [
    # registries (ppo_utils)
    "AdvantageEstimator", "AdvantageEstimatorRegistry", "BaseFunctionRegistry", "PolicyLossRegistry",
    "PolicyLossType", "register_advantage_estimator", "register_policy_loss", "sync_registries",
    "repopulate_all_registries", "compute_advantages_and_returns",
    # estimators (ppo_utils)
    "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage", "compute_maxrl_advantage",
    "compute_reinforce_plus_plus_outcome_advantage", "compute_gae_advantage_return",
    # policy losses (ppo_utils)
    "ppo_policy_loss", "sapo_policy_loss", "gspo_policy_loss", "compute_policy_loss_cispo",
    "rollout_is_policy_loss", "dppo_policy_loss", "compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov",
    "cross_entropy_loss", "importance_sampling_loss", "LOSSES_WITHOUT_OLD_LOGPROBS", "LOSSES_WITH_OLD_LOGPROBS",
    # reduction, KL (ppo_utils, torch_utils)
    "masked_mean", "reduce_loss", "apply_loss_reduction_to_advantages_minibatch", "compute_approx_kl",
    "FixedKLController", "AdaptiveKLController", "get_kl_controller",
    # off_policy_correction_utils
    "off_policy_correction_enabled", "compute_tis_ratio", "compute_outlier_token_mask", "compute_token_mask",
    "compute_sequence_mask", "compute_off_policy_correction", "apply_off_policy_correction",
    # config (skyrl.train.config)
    "AlgorithmConfig", "KLCtrlConfig", "SAPOConfig", "ClipCovConfig", "KLCovConfig", "CISPOConfig",
    "DPPOConfig", "OffPolicyCorrectionConfig", "DynamicSamplingConfig",
    # trainer metrics (worker_utils, trainer_utils)
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_PREFIX", "MINIBATCH_ROLLOUT_LOGPROB_DIFF_MEAN_KEY",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_SQ_MEAN_KEY", "MINIBATCH_ROLLOUT_LOGPROB_DIFF_MAX_KEY",
    "MINIBATCH_ROLLOUT_LOGPROB_DIFF_MIN_KEY", "MINIBATCH_ROLLOUT_LOGPROB_DIFF_STD_KEY", "MEAN_LOSS_METRICS",
    "compute_minibatch_rollout_logprob_diff_metrics", "reduce_metrics", "finalize_minibatch_rollout_logprob_diff_std",
    # the bridge to the native design
    "freeze", "SkyRLCallable", "SkyRLPolicyLoss", "SkyRLSumPolicyLoss", "NativeFromSkyRL", "NativeFromSkyRLLoss",
    "LossConfig", "config_from_hyperparameters", "HYPER_ALIASES", "CONFIG_FIELDS", "LOSS_REDUCTIONS",
    "UnknownNameError",
]
