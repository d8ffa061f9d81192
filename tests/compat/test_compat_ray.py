"""The façade on Ray: every task and actor of the job sees the driver's registrations.

Runs in the session's one Ray instance (``ray_session``); workers cannot import ``tests/``, so this
module is shipped to them by value.
"""

from __future__ import annotations

import sys
import threading
import types

import cloudpickle
import numpy as np
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.compat import (
    AdvantageEstimatorRegistry,
    NativeFromSkyRL,
    PolicyLossRegistry,
    UnknownNameError,
    freeze,
    register_advantage_estimator,
    register_policy_loss,
    sync_registries,
)
from skyrl_fn.compat._snapshot import ACTOR_NAME, ray_role

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True)
def ray(ray_session):
    """Ray, this module shipped by value, and registries holding only the built-ins."""
    module = sys.modules[__name__]
    picklers = (cloudpickle, ray_session.cloudpickle)  # Ray pickles functions with its vendored copy
    for p in picklers:
        p.register_pickle_by_value(module)
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    yield ray_session
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    for p in picklers:
        p.unregister_pickle_by_value(module)


def batch_mean_baseline(token_level_rewards, response_mask, index, **kwargs):
    """The seed's ``simple_baseline``: each response's reward minus the batch mean."""
    scores = (token_level_rewards * response_mask).sum(dim=-1, keepdim=True)
    adv = (scores - scores.mean()) * response_mask
    return adv, adv.clone()


def doubled(**kwargs):
    rewards = kwargs["token_level_rewards"]
    return rewards * 2, rewards * 3


def skyrl_inputs():
    return dict(
        token_level_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]),
        response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
        index=np.array(["a", "a", "b"], dtype=object),
    )


def remote(ray, fn):
    return ray.remote(num_cpus=0)(fn)


def _names_in_task():
    return AdvantageEstimatorRegistry.list_available(), PolicyLossRegistry.list_available()


def _call_in_task(name, inputs):
    return AdvantageEstimatorRegistry.get(name)(**inputs)


def test_seed_ray_example_sync_then_list_and_get_in_a_task(ray):
    def my_function(**kwargs):
        return batch_mean_baseline(**kwargs)

    AdvantageEstimatorRegistry.register("my_function", my_function)
    sync_registries()
    estimators, _ = ray.get(remote(ray, _names_in_task).remote())
    assert "my_function" in estimators and set(DEFAULT_TABLE.names("advantage_estimator")) <= set(estimators)
    adv, ret = ray.get(remote(ray, _call_in_task).remote("my_function", skyrl_inputs()))
    want_adv, want_ret = batch_mean_baseline(**skyrl_inputs())
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


def test_the_worker_gets_the_function_as_registered_and_the_driver_listing(ray):
    register_advantage_estimator("first")(doubled)
    register_policy_loss("my_loss")(lambda log_probs, old_log_probs, advantages, config, loss_mask=None: (log_probs.sum(), {}))
    AdvantageEstimatorRegistry.register("second", batch_mean_baseline)
    estimators, losses = ray.get(remote(ray, _names_in_task).remote())
    assert estimators == AdvantageEstimatorRegistry.list_available()  # the same names in the same order
    assert losses == PolicyLossRegistry.list_available() and "my_loss" in losses
    adv, ret = ray.get(remote(ray, _call_in_task).remote("first", skyrl_inputs()))
    torch.testing.assert_close(ret, skyrl_inputs()["token_level_rewards"] * 3)  # doubled's own result, unwrapped


def test_registration_after_init_and_resync_reaches_new_tasks(ray):
    AdvantageEstimatorRegistry.register("before", doubled)
    sync_registries()
    assert "before" in ray.get(remote(ray, _names_in_task).remote())[0]
    AdvantageEstimatorRegistry.register("after", batch_mean_baseline)
    # Published as it is registered (SkyRL-Train's behaviour after ray.init), and again on re-sync.
    assert {"before", "after"} <= set(ray.get(remote(ray, _names_in_task).remote())[0])
    sync_registries()
    assert {"before", "after"} <= set(ray.get(remote(ray, _names_in_task).remote())[0])


class UserActor:
    """A user's own long-lived actor that looks estimators up by name, as a SkyRL trainer does."""

    def names(self):
        return AdvantageEstimatorRegistry.list_available()

    def run(self, name, inputs):
        return AdvantageEstimatorRegistry.get(name)(**inputs)

    def freeze_names(self):
        return freeze().names("advantage_estimator")


def test_a_user_actor_sees_later_registrations_and_unregistrations(ray):
    actor = ray.remote(num_cpus=0)(UserActor).remote()
    try:
        assert "late" not in ray.get(actor.names.remote())
        with pytest.raises(Exception, match="late"):
            ray.get(actor.run.remote("late", skyrl_inputs()))
        AdvantageEstimatorRegistry.register("late", doubled)  # after the actor exists
        sync_registries()
        assert "late" in ray.get(actor.names.remote())
        adv, _ = ray.get(actor.run.remote("late", skyrl_inputs()))
        torch.testing.assert_close(adv, skyrl_inputs()["token_level_rewards"] * 2)
        assert "late" in ray.get(actor.freeze_names.remote())  # freeze() in a worker starts from the snapshot
        AdvantageEstimatorRegistry.unregister("late")
        assert "late" not in ray.get(actor.names.remote())
    finally:
        ray.kill(actor)


def test_hidden_and_shadowed_builtins_look_the_same_in_workers(ray):
    extra = next(n for n in DEFAULT_TABLE.names("advantage_estimator") if n not in AdvantageEstimatorRegistry._skyrl_defaults)
    AdvantageEstimatorRegistry.unregister("rloo")  # SkyRL lets you unregister a default
    AdvantageEstimatorRegistry.register(extra, doubled)  # shadows a skyrl_fn-only built-in
    estimators, _ = ray.get(remote(ray, _names_in_task).remote())
    assert "rloo" not in estimators and extra in estimators
    with pytest.raises(Exception, match="rloo"):
        ray.get(remote(ray, _call_in_task).remote("rloo", skyrl_inputs()))
    _, ret = ray.get(remote(ray, _call_in_task).remote(extra, skyrl_inputs()))
    torch.testing.assert_close(ret, skyrl_inputs()["token_level_rewards"] * 3)  # the user's, not the built-in
    # Built-ins still run in workers, as SkyRL-style callables over the snapshot's table.
    adv, _ = ray.get(remote(ray, _call_in_task).remote("grpo", skyrl_inputs()))
    torch.testing.assert_close(adv, AdvantageEstimatorRegistry.get("grpo")(**skyrl_inputs())[0])


def _register_in_task():
    AdvantageEstimatorRegistry.register("worker_only", doubled)
    try:
        return "worker_only" in AdvantageEstimatorRegistry.list_available(), ray_role()
    finally:  # Ray reuses worker processes: leave this one as it was
        AdvantageEstimatorRegistry.unregister("worker_only")


def test_workers_never_write_the_snapshot(ray):
    AdvantageEstimatorRegistry.register("from_driver", doubled)
    seen_there, role = ray.get(remote(ray, _register_in_task).remote())
    assert seen_there and role == "worker"
    assert "worker_only" not in AdvantageEstimatorRegistry.list_available()
    # The published snapshot holds the driver's registrations only (the worker's stays in its process).
    _, payload = ray.get(ray.get_actor(ACTOR_NAME).latest.remote(0))
    names = cloudpickle.loads(payload).names["advantage_estimator"]
    assert "from_driver" in names and "worker_only" not in names


def test_registrations_made_before_ray_reach_workers_at_the_next_driver_lookup(ray, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # as before ray.init(): nothing is published
        AdvantageEstimatorRegistry.register("early", doubled)
        assert ray_role() == "none"
    assert "early" in AdvantageEstimatorRegistry.list_available()  # a driver lookup publishes
    assert "early" in ray.get(remote(ray, _names_in_task).remote())[0]


def test_an_unpicklable_registration_is_refused_on_a_ray_driver(ray):
    lock = threading.Lock()

    def holds_a_lock(**kwargs):
        with lock:
            return None

    with pytest.raises(TypeError, match="advantage estimator 'locked' .*holds_a_lock.*cloudpickle"):
        AdvantageEstimatorRegistry.register("locked", holds_a_lock)
    assert "locked" not in AdvantageEstimatorRegistry.list_available()
    AdvantageEstimatorRegistry.register("locked", doubled)  # the name is free again


def _unknown_in_task():
    try:
        AdvantageEstimatorRegistry.get("simple_baselin")
    except UnknownNameError as e:
        return str(e)
    return ""


def test_unknown_names_in_a_worker_list_the_driver_names(ray):
    AdvantageEstimatorRegistry.register("simple_baseline", batch_mean_baseline)
    message = ray.get(remote(ray, _unknown_in_task).remote())
    assert "did you mean 'simple_baseline'" in message and "grpo" in message


def test_the_snapshot_is_the_frozen_table(ray):
    AdvantageEstimatorRegistry.register("mine", doubled)
    table = ray.get(remote(ray, freeze).remote())
    assert isinstance(table.estimator("mine"), NativeFromSkyRL)
    assert table.names("advantage_estimator") == freeze().names("advantage_estimator")
    assert ray.get_actor(ACTOR_NAME) is not None  # one holder per job, in the job's namespace


def test_a_snapshot_workers_cannot_unpickle_is_a_clear_error(ray, monkeypatch):
    ghost = types.ModuleType("skyrl_fn_test_ghost")  # importable in the driver only
    exec("def est(token_level_rewards, response_mask, index, **kwargs):\n    return token_level_rewards, token_level_rewards", ghost.__dict__)
    monkeypatch.setitem(sys.modules, ghost.__name__, ghost)
    AdvantageEstimatorRegistry.register("ghost", ghost.est)  # cloudpickle pickles it by reference
    with pytest.raises(Exception, match="expected them to unpickle in this Ray worker.*skyrl_fn_test_ghost.*register_pickle_by_value"):
        ray.get(remote(ray, _names_in_task).remote())
