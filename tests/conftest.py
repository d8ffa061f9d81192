"""Shared test set-up: hypothesis profiles, one Ray session per test run, one torch thread per
test, and tiny fast training configs."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.trainer.config import LoggingConfig, TrainConfig, TrainerConfig
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.rollout.base import RolloutConfig
from skyrl_fn.tasks.base import DataConfig

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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (ray.init costs ~3 s and ~650 MB)."""
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="skyrl_fn_ray_")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_config(run_dir: str, **groups) -> TrainConfig:
    """A config small enough for a step to take well under a second.

    ``groups`` maps a group name to a dict of field overrides, e.g. ``trainer={"steps": 4}``.
    """
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
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def table():
    return DEFAULT_TABLE


@pytest.fixture
def make_config(tmp_path):
    """``make_config(**groups)``: :func:`tiny_config` in a fresh run directory."""
    return lambda **groups: tiny_config(tmp_path / "run", **groups)


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    """The :func:`tiny_config` function itself (for tests that pick their own run directory)."""
    return tiny_config
