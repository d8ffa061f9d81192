"""The SkyRL-Train-compatible façade: SkyRL code runs with only its import line changed.

Replace::

    from skyrl_train.utils.ppo_utils import register_advantage_estimator, AdvantageEstimatorRegistry
    from skyrl_train.algorithms.advantage_estimators import AdvantageEstimator

with ``from skyrl_fn.compat import ...`` (same names). What differs underneath:

- Built-ins come from ``DEFAULT_TABLE``: ``AdvantageEstimatorRegistry.get("grpo")`` is the native
  estimator called with SkyRL's keywords (``token_level_rewards``, ``response_mask``, ``index``,
  ``values``, ``gamma``, ``lambd``, ``epsilon``, ``grpo_norm_by_std`` / ``norm_adv_by_std_in_grpo``;
  other keywords such as ``config`` are ignored), returning ``(advantages, returns)``.
  ``PolicyLossRegistry.get(name)`` reads hyperparameters from a SkyRL config (``CONFIG_FIELDS``)
  and reduces as ``config.loss_reduction`` says (``LOSS_REDUCTIONS``).
- The registries are the library's only mutable global state. ``freeze()`` turns them plus the
  built-ins into one immutable ``AlgorithmTable``; pass that to Ray tasks.
- On Ray, a driver publishes ``freeze()`` as an immutable snapshot (on ``sync_registries()`` and
  whenever it registers or unregisters while Ray is up), and every task and actor of the job looks
  up names it does not know in the latest snapshot; workers never write it
  (``skyrl_fn.compat._snapshot``). ``sync_registries()`` also checks that every registration
  pickles, and returns ``freeze()``.
"""

from skyrl_fn.compat._advantages import HYPER_ALIASES, AdvantageEstimator, NativeFromSkyRL, SkyRLCallable
from skyrl_fn.compat._calls import LossConfig
from skyrl_fn.compat._losses import (
    CONFIG_FIELDS,
    LOSS_REDUCTIONS,
    NativeFromSkyRLLoss,
    SkyRLPolicyLoss,
    config_from_hyperparameters,
)
from skyrl_fn.compat._registry import (
    AdvantageEstimatorRegistry,
    BaseFunctionRegistry,
    PolicyLossRegistry,
    PolicyLossType,
    compute_advantages_and_returns,
    freeze,
    register_advantage_estimator,
    register_policy_loss,
    repopulate_all_registries,
    sync_registries,
)
from skyrl_fn.table import UnknownNameError

__all__ = [
    # SkyRL-Train's names
    "AdvantageEstimator",
    "AdvantageEstimatorRegistry",
    "BaseFunctionRegistry",
    "PolicyLossRegistry",
    "PolicyLossType",
    "register_advantage_estimator",
    "register_policy_loss",
    "sync_registries",
    "repopulate_all_registries",
    "compute_advantages_and_returns",
    # the bridge to the native design
    "freeze",
    "SkyRLCallable",
    "SkyRLPolicyLoss",
    "NativeFromSkyRL",
    "NativeFromSkyRLLoss",
    "LossConfig",
    "config_from_hyperparameters",
    "HYPER_ALIASES",
    "CONFIG_FIELDS",
    "LOSS_REDUCTIONS",
    "UnknownNameError",
]
