"""Shared set-up for the training-piece tests: tiny, fast configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.train.config import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    RolloutConfig,
    TrainConfig,
    TrainerConfig,
)


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
    """Tiny models run fastest on one thread, and the machine is shared."""
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
