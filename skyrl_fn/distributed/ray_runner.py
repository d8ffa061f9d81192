"""Training on Ray: the one training loop (``skyrl_fn.trainer.loop.train``) over ``RayWorkers``.

The driver resolves config + registrations once into a frozen ``ResolvedRun`` (config, table and
the bound ``Algorithm``) and passes that object to the constructor of every actor. Whatever the
user registered in the driver — even in ``__main__`` after ``ray.init`` — travels with it
(cloudpickle ships ``__main__`` and plugin modules by value), so no named actor keeps registries
in sync.

Actors (fractional CPUs, sized so all of them fit a 2-core machine with room to spare; the
layouts are described in ``skyrl_fn.distributed.ray_workers``):

====================  =====================================================  =====================
actor                 does                                                   when
====================  =====================================================  =====================
``PolicyTrainer``     old log-probs, experience (advantages), policy update  always
                      + sampling and task reward (hybrid layout)             ``rollout_workers=0``
``RolloutWorker``     sampling + task reward, receives the policy weights    ``rollout_workers=N``
``ReferenceModel``    reference log-probs (frozen initial policy)            KL is used
``Critic``            values, critic update                                  a critic estimator
====================  =====================================================  =====================

Each actor is the in-process role worker (``skyrl_fn.trainer.workers``) plus what Ray needs, so a
step runs the same code in the same order with the same seeds as in-process: the metrics match
(tested for GRPO, PPO with GAE and KL, and a chained estimator, in both layouts).

Measured on the embedded default (``bench/train_step.py``, 2 cores): see that script for the
ratio of a Ray step to an in-process one (goal <= 1.10 in the default layout).

Checkpoints are written by the driver from the actors' states with the same atomic
``skyrl_fn.trainer.checkpoint.save`` as the in-process loop, so a dying worker never touches them.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable

from skyrl_fn.distributed.layout import concat_rollouts, with_rollout_workers
from skyrl_fn.distributed.ray_workers import CPU_SHARES, RayWorkers, WorkerDiedError
from skyrl_fn.trainer.config import ResolvedRun
from skyrl_fn.trainer.loop import Summary, train

__all__ = [
    "WorkerDiedError",
    "CPU_SHARES",
    "RayWorkers",
    "init_ray",
    "train_on_ray",
    "concat_rollouts",
    "with_rollout_workers",
]


def init_ray(run: ResolvedRun) -> bool:
    """Start a local Ray (or join ``ray.address``) unless one is running; True if started here.

    Local Ray: ``RAY_AUTH_MODE=disabled``, session files in a fresh temp dir, no dashboard,
    ``ray.num_cpus`` CPUs (default: all of this machine's).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return False
    cfg = run.config.ray
    if cfg.address:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True)
    else:
        tmp = tempfile.mkdtemp(prefix="skyrl_fn_ray_")
        ray.init(
            num_cpus=cfg.num_cpus if cfg.num_cpus is not None else os.cpu_count(),
            include_dashboard=False, _temp_dir=tmp, log_to_driver=True,
        )
    return True


def train_on_ray(
    run: ResolvedRun, *, on_step: Callable[[dict[str, float]], None] | None = None, num_rollout_workers: int | None = None
) -> Summary:
    """``skyrl_fn.trainer.loop.train(run, workers=RayWorkers)``: same contract and ``Summary``.

    ``num_rollout_workers`` overrides ``ray.rollout_workers``. Starts a local Ray (or joins
    ``ray.address``) unless Ray is already initialised, and shuts it down again only if it
    started it.

    Raises:
        WorkerDiedError: an actor died; names it and the last (intact) checkpoint.
    """
    import ray

    started = init_ray(run)
    try:
        return train(run, on_step=on_step, workers=functools.partial(RayWorkers, num_rollout_workers=num_rollout_workers))
    finally:
        if started:
            ray.shutdown()
