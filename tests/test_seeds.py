"""The SkyRL-Train documentation examples, run through the façade with only their imports changed.

Each example is kept as SkyRL-Train's documentation prints it (``SEED_*``), with its original
``skyrl_train`` import lines; ``port`` rewrites exactly those import lines (and adds the
``import numpy as np`` / ``import torch`` the snippets use without importing), so the test proves
the rest of the code runs unchanged.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, PolicyLossInput
from skyrl_fn.compat import AdvantageEstimatorRegistry, freeze, sync_registries
from skyrl_fn.compat.skyrl_train import PolicyLossRegistry  # the seed era's own loss registry

# -- verbatim from docs/algorithms/custom_algorithms.rst ----------------------------------------
SEED_ESTIMATORS = '''
from skyrl_train.utils.ppo_utils import register_advantage_estimator, AdvantageEstimatorRegistry
import torch

# Using the decorator
@register_advantage_estimator("simple_baseline")
def compute_simple_baseline_advantage(
     token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray, **kwargs
 ):
     with torch.no_grad():
         response_rewards = (token_level_rewards * response_mask).sum(dim=-1, keepdim=True)

         # Simple baseline: use the mean reward across the batch
         baseline = response_rewards.mean()
         advantages = (response_rewards - baseline) * response_mask
         returns = advantages.clone()

         return advantages, returns

# Or register directly
def another_estimator(**kwargs):
    # Implementation here
    pass

AdvantageEstimatorRegistry.register("direct_registration", another_estimator)
'''

SEED_POLICY_LOSS = '''
from skyrl_train.utils.ppo_utils import register_policy_loss, PolicyLossRegistry

@register_policy_loss("reinforce")
def compute_reinforce_policy_loss(log_probs, old_log_probs, advantages, config, loss_mask=None):
    # Your custom policy loss implementation (like REINFORCE)
    loss = (-log_probs * advantages).mean()
    # return loss and clip ratio
    return loss, 0.0
'''

SEED_RAY = '''
import ray
from skyrl_train.utils.ppo_utils import AdvantageEstimatorRegistry, sync_registries

# Register a function on the main process
def my_function(**kwargs):
    # A dummy function for demonstration
    pass
AdvantageEstimatorRegistry.register("my_function", my_function)
'''

# -- verbatim from examples/algorithms/custom_advantage_estimator/README.md ------------------------
SEED_CLASS_BASED = '''
from skyrl_train.algorithms.advantage_estimators import AdvantageEstimator

class MyCustomAdvantageEstimator(AdvantageEstimator):
    """Custom advantage estimator example."""

    def compute_advantages(
        self,
        rewards: torch.Tensor,
        values: torch.Tensor,  # Optional, may be None
        masks: torch.Tensor,
        **kwargs
    ) -> torch.Tensor:
        """
        Compute advantages for policy gradient.

        Args:
            rewards: Shape [batch, seq_len] - reward at each token
            values: Shape [batch, seq_len] - value estimates (if using critic)
            masks: Shape [batch, seq_len] - 1 for valid tokens, 0 for padding

        Returns:
            advantages: Shape [batch, seq_len] - advantage estimates
        """
        # Your custom logic here
        # Example: simple reward-to-go
        advantages = torch.zeros_like(rewards)
        running_sum = torch.zeros(rewards.shape[0], device=rewards.device)

        for t in reversed(range(rewards.shape[1])):
            running_sum = rewards[:, t] + 0.99 * running_sum * masks[:, t]
            advantages[:, t] = running_sum

        # Normalize advantages
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return advantages

from skyrl_train.algorithms.advantage_estimators import register_advantage_estimator

# Register your estimator
register_advantage_estimator("my_custom", MyCustomAdvantageEstimator)
'''

IMPORTS = {  # the rewrite rule of docs/skyrl-deviations.md
    "from skyrl_train.utils.ppo_utils import": "from skyrl_fn.compat.skyrl_train import",
    "from skyrl_train.algorithms.advantage_estimators import": "from skyrl_fn.compat.advantage_estimators import",
}


def port(seed: str, name: str) -> types.ModuleType:
    """Run ``seed`` with only its import lines changed, as a fresh (non-importable) module."""
    lines = seed.splitlines()
    for i, line in enumerate(lines):
        for old, new in IMPORTS.items():
            if line.startswith(old):
                lines[i] = line.replace(old, new)
    changed = [a for a, b in zip(seed.splitlines(), lines) if a != b]
    assert changed and all(a.startswith("from skyrl_train") for a in changed)
    module = types.ModuleType(name)
    exec(compile("import numpy as np\nimport torch\n" + "\n".join(lines), f"<seed {name}>", "exec"), module.__dict__)
    return module


@pytest.fixture(autouse=True)
def clean_registries():
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    yield
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()


def batch_kwargs():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return dict(token_level_rewards=rewards, response_mask=mask, index=np.array(["p", "p", "q", "q"]))


def as_batch(kw) -> AdvantageInput:
    return AdvantageInput(token_level_rewards=kw["token_level_rewards"], response_mask=kw["response_mask"], group_ids=kw["index"])


def test_simple_baseline_decorator_through_facade_and_table():
    seed = port(SEED_ESTIMATORS, "seed_estimators")
    assert {"simple_baseline", "direct_registration"} <= set(AdvantageEstimatorRegistry.list_available())
    kw = batch_kwargs()
    fn = AdvantageEstimatorRegistry.get("simple_baseline")
    assert fn is seed.compute_simple_baseline_advantage
    adv, ret = fn(**kw, values=None, gamma=1.0, lambd=1.0, grpo_norm_by_std=True, config=None)
    # scores 1, 2, 0, 3 -> batch mean 1.5 -> -0.5, 0.5, -1.5, 1.5 on each valid token
    want = torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.0], [-1.5, -1.5, -1.5], [1.5, 0.0, 0.0]])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, want)
    out = freeze().compute_advantages("simple_baseline", as_batch(kw))
    torch.testing.assert_close(out.advantages, want)
    torch.testing.assert_close(out.returns, want)


def test_direct_registration_is_listed_and_its_none_result_is_reported_by_name():
    port(SEED_ESTIMATORS, "seed_estimators")
    assert AdvantageEstimatorRegistry.get("direct_registration")(**batch_kwargs()) is None  # as in SkyRL
    with pytest.raises(TypeError, match="'direct_registration': expected \\(advantages, returns\\)"):
        freeze().compute_advantages("direct_registration", as_batch(batch_kwargs()))


def test_reinforce_policy_loss_through_facade_and_table():
    port(SEED_POLICY_LOSS, "seed_policy_loss")
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(2, 3, generator=g).requires_grad_()
    old, adv = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    mask = torch.ones(2, 3)
    loss, clip = PolicyLossRegistry.get("reinforce")(lp, old, adv, types.SimpleNamespace(), mask)
    torch.testing.assert_close(loss, (-lp * adv).mean())
    assert clip == 0.0
    (grad,) = torch.autograd.grad(loss, lp)
    # through the frozen table: per-token loss + token_mean gives the same loss and gradient
    table = freeze()
    out = table.policy_loss("reinforce")(PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask))
    reduced = (out.token_loss * mask).sum() / mask.sum()
    torch.testing.assert_close(reduced, loss)
    torch.testing.assert_close(torch.autograd.grad(reduced, lp)[0], grad)
    assert float(out.metrics["clip_ratio"]) == 0.0
    if ("aggregation", "token_mean") in table:
        torch.testing.assert_close(table.get("aggregation", "token_mean")(out.token_loss, mask.bool()), loss)


def reward_to_go(rewards, masks):
    """The seed's formula written out independently, then masked (the façade zeroes padding)."""
    b, t = rewards.shape
    adv = torch.zeros(b, t)
    for i in range(b):
        acc = 0.0
        for j in reversed(range(t)):
            acc = float(rewards[i, j]) + 0.99 * acc * float(masks[i, j])
            adv[i, j] = acc
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv * masks


def test_class_based_reward_to_go_through_facade_and_table():
    seed = port(SEED_CLASS_BASED, "seed_class_based")
    kw = batch_kwargs()
    fn = AdvantageEstimatorRegistry.get("my_custom")
    assert isinstance(fn, seed.MyCustomAdvantageEstimator)
    adv, ret = fn(**kw, values=None, gamma=1.0, config=None)
    want = reward_to_go(kw["token_level_rewards"], kw["response_mask"])
    torch.testing.assert_close(adv, want)
    assert torch.equal(ret, adv)  # a class-based estimator's returns are its advantages
    out = freeze().compute_advantages("my_custom", as_batch(kw))
    torch.testing.assert_close(out.advantages, want)
    torch.testing.assert_close(out.returns, want)


@pytest.mark.ray
def test_ray_section_registered_function_reaches_a_ray_task(ray_session):
    port(SEED_RAY, "seed_ray")
    table = sync_registries()
    assert "my_function" in table.names("advantage_estimator")

    @ray_session.remote(num_cpus=0.25)
    def skyrl_entrypoint(table):
        return table.names("advantage_estimator")  # the table carried the function here

    assert "my_function" in ray_session.get(skyrl_entrypoint.remote(table))
    assert set(DEFAULT_TABLE.names("advantage_estimator")) < set(table.names("advantage_estimator"))
