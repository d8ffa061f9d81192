"""Training on Ray: one ``ResolvedRun`` shipped into every actor, no registry synchronisation.

The driver resolves config + registrations once into a frozen :class:`ResolvedRun` (config and
``AlgorithmTable``) and passes that object to the constructor of every actor. Whatever the user
registered in the driver — even in ``__main__`` after ``ray.init`` — travels with it (cloudpickle
ships ``__main__`` and plugin modules by value), so no named actor keeps registries in sync.

Actors (fractional CPUs, sized so all of them fit a 2-core machine with room to spare):

====================  =====================================================  =====================
actor                 does                                                   when
====================  =====================================================  =====================
``PolicyTrainer``     old log-probs, experience (advantages), policy update  always
                      + sampling and task reward (hybrid layout)             ``rollout_workers=0``
``RolloutWorker``     sampling + task reward, receives the policy weights    ``rollout_workers=N``
``ReferenceModel``    reference log-probs (frozen initial policy)            KL is used
``Critic``            values, critic update                                  GAE
====================  =====================================================  =====================

One step mirrors ``skyrl_fn.train.loop.run_step`` (same seeds, same order, so the metrics match
the in-process loop; tested). With ``--ray.rollout-workers N`` (N >= 1; the vLLM path: one per
engine)::

    rollout, scores = RolloutWorker.generate(prompts)             # N workers, prompts split
    ref_lp = ReferenceModel.log_probs(rollout)   # KL only,  concurrent with
    values = Critic.values(rollout)              # GAE only, each other
    metrics, exp, weights = PolicyTrainer.update(rollout, scores, ref_lp, values)
    Critic.update(exp);  RolloutWorker.sync(weights)              # sync runs before the next generate

With the default ``--ray.rollout-workers 0`` (hybrid layout, as verl's actor-rollout worker) the
policy trainer samples with its own model: the rollout and scores stay in that actor, and no
weights travel. The driver submits a step's calls at once and waits once per step::

    rollout = PolicyTrainer.generate(prompts, share=True)         # KL or GAE: to ref/critic
    ref_lp, values = ...                                          # as above
    metrics, exp, _ = PolicyTrainer.update(None, None, ref_lp, values)
    metrics = PolicyTrainer.generate_and_update(prompts)          # neither: one call per step

Measured on the embedded default (``bench/train_step.py``, 2 cores, ~41 ms per in-process step):
the hybrid layout adds ~2-3 ms per step (1.07x); one separate worker adds ~12 ms (1.29x: weight
push, batch transfer, two processes taking turns on the same cores).

Checkpoints are written by the driver from the actors' states with the same atomic
``skyrl_fn.train.checkpoint.save`` as the in-process loop, so a dying worker never touches them.

GPU path (``--rollout.backend vllm``): the actors go into one placement group planned by
``skyrl_fn.gpu.plan_placement`` from ``--gpu.*`` (``skyrl_fn.launcher.devices.gpu_plan``), one
rollout worker per vLLM engine; with ``--gpu.no-colocate`` the weight push is an NCCL broadcast
(``PolicyTrainer.broadcast`` || ``RolloutWorker.receive_broadcast``). On CPU nothing changes.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Mapping, NoReturn, Sequence

import attrs
import torch

from skyrl_fn.gpu.sync_check import SyncTracker
from skyrl_fn.launcher.actors import Critic, PolicyTrainer, ReferenceModel, RolloutWorker, hosts_rollout
from skyrl_fn.launcher.devices import gpu_plan
from skyrl_fn.launcher.layout import concat_rollouts, split_prompts, with_rollout_workers
from skyrl_fn.train import checkpoint as ckpt
from skyrl_fn.train.config import ResolvedRun, config_to_dict

__all__ = [
    "WorkerDiedError",
    "CPU_SHARES",
    "init_ray",
    "RayTrainer",
    "train_on_ray",
    "concat_rollouts",
    "with_rollout_workers",
]

#: Fractional CPUs each actor asks for. The step is sequential on-policy RL, so actors mostly
#: take turns; the fractions only need to fit (1.5 CPUs in total with GAE and KL).
CPU_SHARES: Mapping[str, float] = {"policy": 0.5, "rollout": 0.5, "reference": 0.25, "critic": 0.25}


class WorkerDiedError(RuntimeError):
    """A Ray actor died (killed, out of memory, crashed); the message names it."""


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


class RayTrainer:
    """The actors of one run and the driver-side step.

    Args:
        run: the one ``ResolvedRun``; passed as-is to every actor.
        num_rollout_workers: overrides ``ray.rollout_workers`` (None keeps it): separate rollout
            actors, prompts split between them (with one worker the sampling is exactly the
            in-process loop's); 0 samples inside the policy trainer.
    """

    def __init__(self, run: ResolvedRun, *, num_rollout_workers: int | None = None) -> None:
        import ray

        run = with_rollout_workers(run, num_rollout_workers)
        self.run = run
        cfg = run.config
        num_rollout_workers = cfg.ray.rollout_workers
        remote = lambda cls, share: ray.remote(num_cpus=share, max_restarts=0)(cls)  # noqa: E731
        # GPU path (--rollout.backend vllm): one placement group, each actor on its planned
        # bundle with its GPU share, one rollout worker per engine. None on CPU (CPU_SHARES).
        self.plan = gpu_plan(cfg)
        self.pg = None
        self.broadcast_plan = None  # bucket plan of the NCCL weight sync (separate layout)
        if self.plan is not None:
            from skyrl_fn.gpu.placement import create_placement_group

            self.pg = create_placement_group(self.plan)
            num_rollout_workers = self.plan.num_engines

        def start(cls, role: str, index: int, share: float):
            if self.plan is None:
                return remote(cls, share).remote(run)
            from skyrl_fn.gpu.placement import actor_options

            return ray.remote(max_restarts=0)(cls).options(**actor_options(self.plan.of(role)[index], self.pg)).remote(run)

        self.names: dict[str, str] = {}
        self.hybrid = self.plan is None and hosts_rollout(run)
        self.step_index = -1  # -1: still starting (constructors running)
        self.last_checkpoint: str | None = None
        self.policy = self.reference = self.critic = None
        share = CPU_SHARES["rollout"] / max(1, num_rollout_workers)
        self.rollout = [
            self._named(start(RolloutWorker, "rollout", i, share), f"rollout worker {i} (RolloutWorker)")
            for i in range(num_rollout_workers)
        ]
        if self.plan is not None and self.plan.colocate:
            # Engines first: vLLM needs gpu_memory_utilization x total free at start-up, then
            # sleeps, so the trainer-side models load into the memory it frees.
            self.get([w.ping.remote() for w in self.rollout])
        policy_share = CPU_SHARES["policy"] + (CPU_SHARES["rollout"] if self.hybrid else 0.0)
        self.policy = self._named(start(PolicyTrainer, "policy", 0, policy_share), "policy trainer (PolicyTrainer)")
        if cfg.uses_reference:
            self.reference = self._named(start(ReferenceModel, "reference", 0, CPU_SHARES["reference"]), "reference model (ReferenceModel)")
        if cfg.uses_critic:
            self.critic = self._named(start(Critic, "critic", 0, CPU_SHARES["critic"]), "critic (Critic)")
        self.sync_timeout_s = cfg.gpu.sync_timeout_s
        self.get([a.ping.remote() for a in self.actors()])  # constructors done, or a clear error
        if self.plan is not None and not self.plan.colocate:
            self._init_broadcast()
        self.step_index = 0
        # Each step's weight sync, checked before the next generate (skyrl_fn.gpu.sync_check).
        self.syncs = SyncTracker(
            lambda ref, timeout: self.get(ref, timeout=timeout), timeout_s=self.sync_timeout_s,
            names=[self.names[w._actor_id.hex()] for w in self.rollout], passthrough=(WorkerDiedError,),
        )

    def _init_broadcast(self) -> None:
        """Form the NCCL sync group: the policy is rank 0, engine ``e``'s TP workers follow
        (``skyrl_fn.gpu.weight_sync.broadcast_ranks``); both sides start together."""
        from skyrl_fn.gpu.weight_sync import broadcast_ranks

        host, port = self.get(self.policy.sync_address.remote())
        world, offsets = broadcast_ranks(len(self.rollout), self.run.config.rollout.tensor_parallel_size)
        refs = [self.policy.init_broadcast.remote(host, port, world)]
        refs += [w.init_broadcast.remote(host, port, off, world) for w, off in zip(self.rollout, offsets)]
        self.broadcast_plan = self.get(refs, timeout=self.sync_timeout_s, what="forming the NCCL weight-sync group")[0]

    def _broadcast(self) -> None:
        """Send the policy's weights to every engine over NCCL and wait for both sides."""
        refs = [self.policy.broadcast.remote()] + [w.receive_broadcast.remote(self.broadcast_plan) for w in self.rollout]
        self.get(refs, timeout=self.sync_timeout_s, what="the NCCL weight broadcast")

    def _named(self, handle, name: str):
        self.names[handle._actor_id.hex()] = name
        return handle

    def actors(self) -> list[Any]:
        return [a for a in [self.policy, *self.rollout, self.reference, self.critic] if a is not None]

    def _which_died(self, err) -> str:
        import ray

        actor_id = getattr(err, "actor_id", None)
        if actor_id and actor_id in self.names:
            return self.names[actor_id]
        for handle in self.actors():  # fall back: ask each actor
            try:
                ray.get(handle.ping.remote(), timeout=10)
            except Exception:
                return self.names[handle._actor_id.hex()]
        return "a Ray worker"

    def get(self, refs, *, timeout: float | None = None, what: str | None = None):
        """``ray.get`` that turns a dead actor into :class:`WorkerDiedError` naming it; with
        ``timeout`` (s) and ``what``, a wait that runs out is a ``TimeoutError`` naming ``what``."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as err:
            if what is None:
                raise
            raise TimeoutError(f"{what} did not finish within {timeout:g} s (--gpu.sync-timeout-s)") from err
        except RayActorError as err:
            self._died(err)
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, RayActorError):
                self._died(cause)
            raise err.as_instanceof_cause() from None

    def _died(self, err) -> NoReturn:
        who = self._which_died(err)
        where = f"the last checkpoint is {self.last_checkpoint} (intact; rerun with --trainer.resume to continue)" if self.last_checkpoint else "no checkpoint was written yet"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        when = "while starting" if self.step_index < 0 else f"during step {self.step_index + 1}"
        raise WorkerDiedError(f"Ray worker {who} died {when}: {detail}. {where}.") from None

    # -- state -----------------------------------------------------------------------------
    def restore(self, c: ckpt.Checkpoint) -> None:
        """Load a checkpoint into every actor (policy, critic, rollout workers)."""
        import ray

        refs = [self.policy.set_state.remote(c.weights["policy"], c.optim["policy"], c.optim["policy_sched"], c.rng)]
        if self.broadcast_plan is None and self.rollout:  # hybrid: the policy trainer has them
            weights = ray.put(c.weights["policy"])
            refs += [w.sync.remote(weights) for w in self.rollout]
        if self.critic is not None:
            refs.append(self.critic.set_state.remote(c.weights["critic"], c.optim["critic"], c.optim["critic_sched"]))
        self.get(refs)
        if self.broadcast_plan is not None:
            self._broadcast()

    def save(self, step: int, data_state, kl_coef: float) -> str:
        """Gather the actors' states and write one atomic checkpoint from the driver."""
        refs = [self.policy.get_state.remote()] + ([self.critic.get_state.remote()] if self.critic is not None else [])
        states = self.get(refs)
        policy = states[0]
        weights = {"policy": policy["weights"]}
        optim = {"policy": policy["optim"], "policy_sched": policy["sched"]}
        if self.critic is not None:
            weights["critic"] = states[1]["weights"]
            optim.update(critic=states[1]["optim"], critic_sched=states[1]["sched"])
        cfg = self.run.config
        self.last_checkpoint = ckpt.save(
            cfg.ckpt_dir, step=step, weights=weights, optim=optim, data_state=attrs.asdict(data_state),
            config=config_to_dict(cfg), rng=policy["rng"], extra={"kl_coef": kl_coef}, keep=cfg.trainer.keep_checkpoints,
        )
        return self.last_checkpoint

    # -- one step --------------------------------------------------------------------------
    def step(self, step: int, examples: Sequence[Any], kl_coef: float) -> dict[str, float]:
        """One RL step on ``examples`` (see the module docstring). Returns its metrics."""
        import ray

        from skyrl_fn.train.loop import rollout_seed

        self.step_index = step
        cfg = self.run.config
        t0 = time.perf_counter()
        seed = rollout_seed(cfg.trainer.seed, step)
        if self.hybrid:
            return self._hybrid_step(step, examples, kl_coef, seed, t0)
        self.syncs.check()  # the last step's weights reached every worker, or stop here
        chunks = split_prompts(examples, len(self.rollout))
        outs = [
            w.generate.options(num_returns=3).remote(chunk, seed + i) for i, (w, chunk) in enumerate(zip(self.rollout, chunks))
        ]
        if len(outs) == 1:
            rollout, scores, gen_s = outs[0]
        else:  # few workers: concatenate on the driver
            parts = self.get([o[0] for o in outs])
            rollout = ray.put(concat_rollouts(parts, pad_id=self._pad_id()))
            scores = ray.put(torch.cat(self.get([o[1] for o in outs])))
            gen_s = outs[0][2]
        ref_lp = self.reference.log_probs.remote(rollout) if self.reference is not None else None
        values = self.critic.values.remote(rollout) if self.critic is not None else None
        metrics_ref, exp_ref, weights = self.policy.update.options(num_returns=3).remote(rollout, scores, ref_lp, values, kl_coef)
        critic_ref = self.critic.update.remote(exp_ref) if self.critic is not None else None
        # Queued now, run by each worker before its next generate (an actor runs one caller's
        # calls in order); checked before the next generate and in flush().
        if self.broadcast_plan is None:
            self.syncs.record(step, [w.sync.remote(weights) for w in self.rollout])
        else:  # engines on their own GPUs: NCCL broadcast, both sides started together
            self._broadcast()
        return self._finish(step, examples, t0, metrics_ref, critic_ref, gen_s)

    def _hybrid_step(self, step: int, examples: Sequence[Any], kl_coef: float, seed: int, t0: float) -> dict[str, float]:
        """The step of the hybrid layout: the policy trainer samples, keeps the batch, updates."""
        share = self.reference is not None or self.critic is not None
        if not share:  # one call: a task costs ~0.5 ms, 1-2 % of a step of the embedded default
            metrics_ref, gen_s = self.policy.generate_and_update.options(num_returns=2).remote(examples, seed, kl_coef)
            return self._finish(step, examples, t0, metrics_ref, None, gen_s)
        rollout, gen_s = self.policy.generate.options(num_returns=2).remote(examples, seed, share)
        ref_lp = self.reference.log_probs.remote(rollout) if self.reference is not None else None
        values = self.critic.values.remote(rollout) if self.critic is not None else None
        metrics_ref, exp_ref, _ = self.policy.update.options(num_returns=3).remote(None, None, ref_lp, values, kl_coef)
        critic_ref = self.critic.update.remote(exp_ref) if self.critic is not None else None
        return self._finish(step, examples, t0, metrics_ref, critic_ref, gen_s)

    def _finish(self, step: int, examples: Sequence[Any], t0: float, metrics_ref, critic_ref, gen_s) -> dict[str, float]:
        """Wait once for the step's metrics (policy, critic) and sampling time; add the timing."""
        from skyrl_fn.train.loop import step_timing

        got = self.get([metrics_ref, gen_s] + ([critic_ref] if critic_ref is not None else []))
        metrics = dict(got[0])
        if critic_ref is not None:
            metrics.update(got[2])
        # response_length is the mean over the B = P * G sequences, so this is the token count.
        cfg = self.run.config
        n_tokens = round(metrics.get("response_length", 0.0) * len(examples) * cfg.rollout.samples_per_prompt)
        metrics.update(step_timing(step, time.perf_counter() - t0, float(got[1]), n_tokens))
        return metrics

    def flush(self) -> None:
        """Wait for the last weight sync (raises if it failed or a rollout worker died meanwhile)."""
        self.syncs.check()

    def _pad_id(self) -> int:
        from skyrl_fn.train.model import load_tokenizer
        from skyrl_fn.train.tasks import make_task

        cfg = self.run.config
        return int(load_tokenizer(cfg.model, alphabet=make_task(cfg.data, seed=cfg.trainer.seed).alphabet).pad_token_id)

    def shutdown(self) -> None:
        import ray

        for a in self.actors():
            try:
                ray.kill(a)
            except Exception:
                pass
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None


def _window_mean(history: Sequence[Mapping[str, float]], key: str, first: bool) -> float:
    """Mean of ``key`` over the first/last 10% of ``history`` (as the in-process loop reports)."""
    if not history:
        return float("nan")
    n = max(1, len(history) // 10)
    part = history[:n] if first else history[-n:]
    return sum(h[key] for h in part) / len(part)


def train_on_ray(
    run: ResolvedRun, *, on_step: Callable[[dict[str, float]], None] | None = None, num_rollout_workers: int | None = None
):
    """Train ``run`` with Ray actors; same contract and ``Summary`` as ``skyrl_fn.train.loop.train``.

    ``num_rollout_workers`` overrides ``ray.rollout_workers`` (see :class:`RayTrainer`).

    Starts a local Ray (or joins ``ray.address``) unless Ray is already initialised, and shuts it
    down again only if it started it.

    Raises:
        WorkerDiedError: an actor died; names it and the last (intact) checkpoint.
    """
    import ray

    from skyrl_fn.train.learner import KLController
    from skyrl_fn.train.loop import Summary, seed_everything
    from skyrl_fn.train.tasks import DataState, make_task, next_prompts

    cfg = run.config
    started = init_ray(run)
    trainer = None
    try:
        seed_everything(cfg.trainer.seed)
        task = make_task(cfg.data, seed=cfg.trainer.seed)
        trainer = RayTrainer(run, num_rollout_workers=num_rollout_workers)
        data_state = DataState(seed=cfg.trainer.seed)
        kl_ctrl = KLController.from_run(run)
        start, resumed_from = 0, None
        if cfg.trainer.resume:
            path = ckpt.latest_checkpoint(cfg.ckpt_dir)
            if path is not None:
                c = ckpt.load(path)
                trainer.restore(c)
                data_state = DataState(**c.data_state)
                kl_ctrl = attrs.evolve(kl_ctrl, coef=float(c.extra.get("kl_coef", kl_ctrl.coef)))
                start = resumed_from = c.step
                trainer.last_checkpoint = path
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        interval = cfg.trainer.ckpt_interval
        for step in range(start, cfg.trainer.steps):
            examples, data_state = next_prompts(task, data_state, cfg.trainer.prompts_per_step, shuffle=cfg.data.shuffle)
            metrics = trainer.step(step, examples, kl_ctrl.coef)
            if cfg.algorithm.use_kl_in_reward:
                metrics["kl_coef"] = kl_ctrl.coef
                kl_ctrl = kl_ctrl.update(metrics.get("kl", 0.0), cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt)
            history.append(metrics)
            done = step + 1
            if (interval > 0 and done % interval == 0) or done == cfg.trainer.steps:
                trainer.save(done, data_state, kl_ctrl.coef)
            if on_step is not None:
                on_step(metrics)
        trainer.flush()
        return Summary(
            steps=max(cfg.trainer.steps, start), history=tuple(history),
            first_reward=_window_mean(history, "reward", True), last_reward=_window_mean(history, "reward", False),
            seconds=time.perf_counter() - t0, last_checkpoint=trainer.last_checkpoint, resumed_from=resumed_from,
        )
    finally:
        if trainer is not None:
            trainer.shutdown()
        if started:
            ray.shutdown()
