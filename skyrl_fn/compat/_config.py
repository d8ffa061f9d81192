"""SkyRL 0.3.0's algorithm config (``skyrl.train.config``), the part the algorithm functions read.

Same class names, field names and defaults as SkyRL's dataclasses, so ``AlgorithmConfig(
policy_loss_type="dppo", dppo=DPPOConfig(dppo_type="binary_kl"))`` written for SkyRL builds here
unchanged. Only the algorithm section exists (no trainer, generator or placement config): the
façade runs SkyRL's algorithm functions, not its trainer.

Every field a façade function reads is honoured exactly (see each function's docstring for the
fields it reads). Two fields SkyRL itself only honours through its trainer's config validation are
translated here the same way, so they are never silently dropped: ``use_tis=True`` becomes
``off_policy_correction.tis_ratio_type="token"`` with ``token_tis_ratio_clip_high =
tis_imp_ratio_cap`` (SkyRL's ``validate_cfg``), and an unknown ``dppo.dppo_type`` raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = [
    "AlgorithmConfig",
    "KLCtrlConfig",
    "SAPOConfig",
    "ClipCovConfig",
    "KLCovConfig",
    "CISPOConfig",
    "DPPOConfig",
    "OffPolicyCorrectionConfig",
    "DynamicSamplingConfig",
]


@dataclass
class KLCtrlConfig:
    """``trainer.algorithm.kl_ctrl``: the KL-in-reward coefficient controller (``get_kl_controller``)."""

    type: str = "fixed"
    """``"fixed"`` or ``"adaptive"``."""
    kl_target: float = 0.1
    horizon: int = 10000


@dataclass
class SAPOConfig:
    """``trainer.algorithm.sapo``: gate temperatures of the ``sapo`` loss."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05


@dataclass
class DynamicSamplingConfig:
    """``trainer.algorithm.dynamic_sampling`` (read by SkyRL's trainer, not by any algorithm function)."""

    type: str | None = None
    max_sample_batches: int = 30
    min_replace_ratio: float = 0.3


@dataclass
class ClipCovConfig:
    """``trainer.algorithm.clip_cov``: the ``clip_cov`` loss (``clip_ratio`` = fraction of tokens)."""

    clip_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0


@dataclass
class KLCovConfig:
    """``trainer.algorithm.kl_cov``: the ``kl_cov`` loss."""

    kl_cov_frac: float = 0.2
    ppo_kl_coef: float = 1.0


@dataclass
class CISPOConfig:
    """``trainer.algorithm.cispo``: clip offsets of the ``cispo`` weight."""

    cispo_eps_clip_low: float = 0.0
    cispo_eps_clip_high: float = 5.0


@dataclass
class DPPOConfig:
    """``trainer.algorithm.dppo``: DPPO-Binary divergence and thresholds (arXiv:2602.04879)."""

    dppo_type: str = "binary_tv"
    """``"binary_tv"`` or ``"binary_kl"``."""
    delta_low: float = 0.2
    delta_high: float = 0.2

    def __post_init__(self) -> None:
        if self.dppo_type not in ("binary_tv", "binary_kl"):
            raise ValueError(f"dppo.dppo_type: expected 'binary_tv' or 'binary_kl', got {self.dppo_type!r}")


@dataclass
class OffPolicyCorrectionConfig:
    """``trainer.algorithm.off_policy_correction``: rollout-vs-trainer corrections applied inside
    every built-in policy loss that receives ``rollout_logprobs`` (see
    ``skyrl_fn.compat.off_policy_correction_utils``). All off by default."""

    tis_ratio_type: str | None = None
    """``None``, ``"token"`` or ``"sequence"``."""
    token_tis_ratio_clip_high: float = 2.0
    sequence_tis_ratio_clip_high: float = 5.0
    sequence_mask_metric: str | None = None
    """``None``, ``"geometric"`` or ``"product"``."""
    geo_mask_high: float = 1.01
    geo_mask_low: float = 0.99
    product_mask_high: float = 2.0
    product_mask_low: float = 0.5
    outlier_token_is_threshold_low: float | None = None
    outlier_token_is_threshold_high: float | None = None
    token_mask_is_threshold_low: float | None = None
    token_mask_is_threshold_high: float | None = None


@dataclass
class AlgorithmConfig:
    """``trainer.algorithm``: names and hyperparameters of the algorithm pieces (SkyRL 0.3.0)."""

    advantage_estimator: str = "grpo"
    kl_ctrl: KLCtrlConfig = field(default_factory=KLCtrlConfig)
    kl_estimator_type: str = "k3"
    use_kl_in_reward: bool = False
    use_kl_loss: bool = True
    kl_loss_coef: float = 0.001
    use_entropy_loss: bool = False
    entropy_loss_coef: float = 0.01
    temperature: float | None = None
    advantage_batch_normalize: bool = False
    value_head_prefix: str = "value_head"
    policy_loss_type: str = "regular"
    loss_reduction: str = "token_mean"
    """``token_mean``, ``token_mean_legacy``, ``sequence_mean``, ``seq_mean_token_sum_norm`` or
    ``prompt_mean``: applied to the advantages (``apply_loss_reduction_to_advantages_minibatch``)."""
    grpo_norm_by_std: bool = True
    zero_variance_filter: bool = False
    zero_variance_filter_tol: float = 1e-6
    lambd: float = 1.0
    gamma: float = 1.0
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.2
    clip_ratio_c: float = 3.0
    tis_imp_ratio_cap: float = -1.0
    """Deprecated (with ``use_tis``): becomes ``off_policy_correction.token_tis_ratio_clip_high``."""
    use_tis: bool = False
    """Deprecated: ``True`` sets ``off_policy_correction.tis_ratio_type = "token"``."""
    off_policy_correction: OffPolicyCorrectionConfig = field(default_factory=OffPolicyCorrectionConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    value_clip: float = 0.2
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)
    kl_cov: KLCovConfig = field(default_factory=KLCovConfig)
    cispo: CISPOConfig = field(default_factory=CISPOConfig)
    dppo: DPPOConfig = field(default_factory=DPPOConfig)
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.use_tis:  # SkyRL's validate_cfg does the same translation
            if not self.tis_imp_ratio_cap > 0:
                raise ValueError(
                    f"tis_imp_ratio_cap: expected a cap > 0 with use_tis=True, got {self.tis_imp_ratio_cap!r}"
                )
            self.off_policy_correction = dataclasses.replace(
                self.off_policy_correction, tis_ratio_type="token", token_tis_ratio_clip_high=self.tis_imp_ratio_cap
            )
