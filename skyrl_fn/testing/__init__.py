"""skyrl_fn.testing: a hypothesis invariant kit that tests any estimator, loss, aggregation or KL
estimator in one line.

::

    from skyrl_fn.testing import check_estimator, check_policy_loss

    def test_my_estimator():
        check_estimator(my_estimator)              # a native function, a SkyRL-style function
        check_estimator("grpo", table=my_table)    # or a registered name
        check_kl_estimator(my_kl)                  # fn(log_probs, ref_log_probs) -> [B, T]

Each property (``skyrl_fn.core.properties``) is a hypothesis search over generated batches
(``skyrl_fn.testing.strategies``); a failure raises ``PropertyViolation`` (an ``AssertionError``)
whose message starts with the property name, then the function, the offending positions and the
shrunk batch. By default the universal properties of the function's kind plus what its table
entry promises are checked; pass ``properties=`` to choose by hand.

Needs ``hypothesis`` (the ``dev`` extra). Example counts follow the loaded hypothesis profile
(``DEFAULT_MAX_EXAMPLES`` per property under hypothesis's own default profile) or ``settings=``.
"""

from skyrl_fn.testing._estimators import check_estimator
from skyrl_fn.testing._kl import check_kl_estimator
from skyrl_fn.testing._losses import check_aggregation, check_policy_loss, reference_token_mean
from skyrl_fn.testing._report import PropertyViolation
from skyrl_fn.testing._resolve import Target, is_skyrl_style, resolve
from skyrl_fn.testing._run import DEFAULT_MAX_EXAMPLES, kit_settings
from skyrl_fn.testing import strategies

__all__ = [
    "check_estimator",
    "check_policy_loss",
    "check_aggregation",
    "check_kl_estimator",
    "PropertyViolation",
    "DEFAULT_MAX_EXAMPLES",
    "kit_settings",
    "resolve",
    "is_skyrl_style",
    "Target",
    "reference_token_mean",
    "strategies",
]
