"""Shared test set-up: hypothesis profiles, one Ray session per test run, one torch thread per
test, and tiny fast training configs."""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# torch and this package are imported by the fixtures and helpers below, not here: pytest-xdist's
# controller loads this file before it starts the worker processes and runs no test itself, so
# an import here (~3 s of torch, transformers' config classes, the table) would delay every
# worker's start (docs/contributing.md, the fast suite's budget). The workers import them with
# the test modules anyway.

# Ray writes an auth token under ~/.ray unless this is set; tests never need auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# ci: what `make test` runs (fixed examples, so a red CI is reproducible; the kit's own default is 25
# per property); deep: what `make test-all` runs (more, fresh examples every run); thorough: by hand.
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("deep", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


#: The modules whose fast tests (not marked ``slow``) use the ``ray_session`` fixture. Under ``make test``
#: (xdist ``--dist loadscope``, ``-m "not slow"``) they run as one work unit, in one pytest-xdist process and so in
#: one Ray session: a second session costs ~8 s of CPU, and Ray tasks reuse the session's warm workers (torch
#: already imported). The unit is scheduled first, as it is the longest; the other process starts with
#: ``LONG_MODULES``, and both share what is left (the most tests first, xdist's order). A fast test that uses
#: ``ray_session`` outside these modules fails. A module whose Ray runs are all slow stays out: its fast tests
#: would only lengthen the Ray unit, the longer of the two processes (``make test-all`` has no Ray unit).
RAY_MODULES = frozenset({
    "tests/test_seeds.py",
    "tests/cli/test_async_on_ray.py",
    "tests/cli/test_fields_on_ray.py",
    "tests/cli/test_losses_on_ray.py",
    "tests/cli/test_run_plugins_on_ray.py",
    "tests/compat/test_compat_ray.py",
    "tests/compat/test_registry_facade.py",
    "tests/compat/test_skyrl_launcher.py",
    "tests/distributed/test_dp.py",
    "tests/distributed/test_ray_runner.py",
})
RAY_UNIT = "ray_session"
#: The ``RAY_MODULES`` whose fast tests run Ray tasks but train nothing, in the order they run: one
#: after another, so their tasks share the session's warm workers (torch imported). A cold worker costs
#: ~4 s of CPU, and Ray stops the idle ones while a training run's actors live.
RAY_TASK_MODULES = ("tests/compat/test_compat_ray.py", "tests/compat/test_registry_facade.py", "tests/test_seeds.py")


def pytest_collection_modifyitems(config, items):
    """Move the tests of ``RAY_TASK_MODULES`` to where the first of them is (same order in every process)."""
    tasks = [it for it in items if it.nodeid.split("::")[0] in RAY_TASK_MODULES]
    if tasks:
        first = items.index(tasks[0])
        rest = [it for it in items if it.nodeid.split("::")[0] not in RAY_TASK_MODULES]
        items[:] = rest[:first] + tasks + rest[first:]
#: Modules of few, long tests, which xdist's most-tests-first order would leave for the end: the
#: launcher's own local Ray run in a subprocess (~30 s of CPU).
LONG_MODULES = ("tests/cli/test_smoke.py",)


def pytest_runtest_setup(item):
    module = item.nodeid.split("::")[0]
    if "ray_session" in item.fixturenames and module not in RAY_MODULES and item.get_closest_marker("slow") is None:
        pytest.fail(f"{module} has a fast test that uses the ray_session fixture: add it to RAY_MODULES in tests/conftest.py", pytrace=False)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is a dev dependency; without it the tests run in one process
    LoadScopeScheduling = None


if LoadScopeScheduling is not None:

    class _LongestFirst(collections.OrderedDict):
        """The work queue: ``RAY_UNIT`` then ``LONG_MODULES`` first, the rest in xdist's order."""

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            for first in reversed((RAY_UNIT, *LONG_MODULES)):
                if first in self:
                    self.move_to_end(first, last=False)

    class _RayModulesTogether(LoadScopeScheduling):
        """``--dist loadscope`` (one work unit per module) with ``RAY_MODULES`` as one unit, first."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.workqueue = _LongestFirst()

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return RAY_UNIT if module in RAY_MODULES else super()._split_scope(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        # Only for the fast suite (make test: -m "not slow"): with the slow Ray runs included
        # (make test-all) one process would run them all one after another, so there every module
        # stays its own unit and each process starts its own Ray session.
        if config.getvalue("dist") == "loadscope" and "not slow" in (config.getoption("markexpr") or ""):
            return _RayModulesTogether(config, log)
        return None


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (ray.init costs ~3 s and ~650 MB)."""
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="skyrl_fn_ray_")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_config(run_dir: str, **groups):
    """A config small enough for a step to take well under a second (a ``TrainConfig``).

    ``groups`` maps a group name to a dict of field overrides, e.g. ``trainer={"steps": 4}``.
    """
    from skyrl_fn.models.model import ModelConfig
    from skyrl_fn.rollout.base import RolloutConfig
    from skyrl_fn.tasks.base import DataConfig
    from skyrl_fn.trainer.config import LoggingConfig, TrainConfig, TrainerConfig

    base = TrainConfig(
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        data=DataConfig(min_digits=2, max_digits=3),
        rollout=RolloutConfig(samples_per_prompt=4, max_new_tokens=5),
        trainer=TrainerConfig(steps=4, prompts_per_step=2, micro_batch_size=8, ckpt_interval=2),
        logging=LoggingConfig(run_dir=str(run_dir)),
    )
    return dataclasses.replace(
        base, **{g: dataclasses.replace(getattr(base, g), **d) for g, d in groups.items()}
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one CPU thread, and the machine is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def table():
    from skyrl_fn import DEFAULT_TABLE

    return DEFAULT_TABLE


@pytest.fixture
def make_config(tmp_path):
    """``make_config(**groups)``: :func:`tiny_config` in a fresh run directory."""
    return lambda **groups: tiny_config(tmp_path / "run", **groups)


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    """The :func:`tiny_config` function itself (for tests that pick their own run directory)."""
    return tiny_config
