"""Ray placement of trainer and rollout engines on GPUs: bundle plans as pure functions.

Notation: ``N`` GPUs for the run, ``tp`` the engines' tensor-parallel size, ``E`` rollout engines,
``W`` trainer workers (policy actors: one at ``--trainer.workers 1``, ``W`` data-parallel ranks
otherwise, ``skyrl_fn.distributed.dp``).

Two layouts (one placement group of single-GPU bundles ``{"GPU": 1, "CPU": c}`` in both):

* **colocated** (``colocate=True``): every model shares every GPU. ``E = N // tp`` engines, engine
  ``e`` spans bundles ``[e*tp, (e+1)*tp)``; trainer worker ``w`` sits on bundle ``w`` (so ``W <= N``:
  with ``tp = 1`` one engine per rank, beside it). Ray needs
  fractional ``num_gpus`` that sum to <= 1 per bundle (:data:`COLOCATED_SHARES`); the real memory
  split is vLLM's ``gpu_memory_utilization`` plus sleep/wake: the engine sleeps (frees its KV
  cache, offloads weights) while the trainer runs and wakes for the next rollout.
* **separate** (``colocate=False``): bundles ``[0, T)`` hold the trainer side (policy, reference,
  critic share them), bundles ``[T, N)`` hold ``E = (N - T) // tp`` engines, which then never
  sleep and receive weights by NCCL broadcast (``skyrl_fn.rollout.weight_sync``).

A ``tp > 1`` engine runs vLLM's Ray executor inside the placement group: its own actor takes no
GPU, and vLLM places one worker per bundle listed in ``VLLM_RAY_BUNDLE_INDICES``, each asking
``VLLM_RAY_PER_WORKER_GPUS`` (both read by vLLM from the environment).

Everything here is pure except :func:`create_placement_group` and :func:`actor_options`, which
import Ray inside the function.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

# Defined with the other config groups (TrainConfig.gpu, flags --gpu.*) so the config imports
# without this package; re-exported here, where it is used.
from skyrl_fn.trainer.config import GPUPlacementConfig

__all__ = [
    "GPUPlacementConfig",
    "ActorSlot",
    "PlacementPlan",
    "COLOCATED_SHARES",
    "SEPARATE_SHARES",
    "plan_placement",
    "create_placement_group",
    "actor_options",
]

#: GPU fraction per actor on a shared GPU (Ray bookkeeping only; sums to 1).
COLOCATED_SHARES: Mapping[str, float] = {"policy": 0.4, "reference": 0.2, "critic": 0.2, "rollout": 0.2}
#: GPU fraction per actor on a trainer-side GPU when engines have their own GPUs.
SEPARATE_SHARES: Mapping[str, float] = {"policy": 0.6, "reference": 0.2, "critic": 0.2}


@attrs.frozen(kw_only=True)
class ActorSlot:
    """Where one actor runs.

    Attributes:
        role: ``policy``, ``reference``, ``teacher``, ``critic`` or ``rollout``.
        index: worker / engine index within the role.
        bundle: placement-group bundle the actor is scheduled on.
        num_gpus: Ray ``num_gpus`` of the actor itself (0 for a ``tp > 1`` engine driver).
        num_cpus: Ray ``num_cpus`` of the actor.
        engine_bundles: rollout only: the bundles of the engine's ``tp`` GPUs.
        env: environment variables for the actor (vLLM's Ray-executor settings for ``tp > 1``).
    """

    role: str
    index: int
    bundle: int
    num_gpus: float
    num_cpus: float
    engine_bundles: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=dict)


@attrs.frozen(kw_only=True)
class PlacementPlan:
    """Bundles of one placement group and the actors on them.

    Attributes:
        bundles: ``N`` resource dicts, ``{"GPU": 1.0, "CPU": c}``.
        strategy: Ray placement strategy (``PACK``: fill a node before the next).
        colocate: the layout.
        slots: every actor's :class:`ActorSlot`.
    """

    bundles: tuple[Mapping[str, float], ...] = attrs.field(converter=tuple)
    strategy: str
    colocate: bool
    slots: tuple[ActorSlot, ...] = attrs.field(converter=tuple)

    def of(self, role: str) -> tuple[ActorSlot, ...]:
        """The slots of ``role`` in index order."""
        return tuple(s for s in self.slots if s.role == role)

    @property
    def num_engines(self) -> int:
        return len(self.of("rollout"))

    def gpu_load(self) -> tuple[float, ...]:
        """``[N]`` Ray GPU fraction requested on each bundle (actors and engine workers)."""
        load = [0.0] * len(self.bundles)
        for s in self.slots:
            load[s.bundle] += s.num_gpus
            if s.role == "rollout" and s.num_gpus == 0:
                per = float(s.env["VLLM_RAY_PER_WORKER_GPUS"])
                for b in s.engine_bundles:
                    load[b] += per
        return tuple(load)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def _engine_slot(index: int, bundles: tuple[int, ...], share: float, cpus: float) -> ActorSlot:
    if len(bundles) == 1:
        return ActorSlot(role="rollout", index=index, bundle=bundles[0], num_gpus=share, num_cpus=cpus, engine_bundles=bundles)
    env = {"VLLM_RAY_PER_WORKER_GPUS": repr(share), "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles))}
    return ActorSlot(role="rollout", index=index, bundle=bundles[0], num_gpus=0.0, num_cpus=cpus, engine_bundles=bundles, env=env)


def plan_placement(
    gpu: GPUPlacementConfig,
    *,
    tensor_parallel_size: int = 1,
    uses_reference: bool = False,
    uses_critic: bool = False,
    uses_teacher: bool = False,
    trainer_workers: int = 1,
) -> PlacementPlan:
    """The placement of a run (see the module docstring for the two layouts).

    Args:
        gpu: GPU count and layout.
        tensor_parallel_size: ``tp`` of each vLLM engine (``rollout.tensor_parallel_size``).
        uses_reference: a reference model is placed (``TrainConfig.uses_reference``).
        uses_critic: a critic is placed (``TrainConfig.uses_critic``).
        uses_teacher: a distillation teacher is placed (``ResolvedRun.uses_teacher``); the
            reference's GPU share is split between the frozen scorers the run uses (reference,
            teacher).
        trainer_workers: ``W``, policy actors to place, one bundle each (``--trainer.workers``).
            With ``W > 1`` the ranks hold the reference model and the critic themselves, sharded
            (``skyrl_fn.distributed.dp_roles``): each rank's slot takes their GPU shares too and
            they get no slots of their own.

    Returns:
        A :class:`PlacementPlan` whose per-bundle GPU load is <= 1 everywhere.

    Raises:
        ValueError: the GPUs cannot hold the layout (e.g. ``N`` not a multiple of ``tp`` when
            colocated, fewer than ``tp`` GPUs left for engines, more trainer workers than GPUs).
    """
    n = _positive_int("gpu.num_gpus", gpu.num_gpus)
    tp = _positive_int("rollout.tensor_parallel_size", tensor_parallel_size)
    w = _positive_int("trainer.workers", trainer_workers)
    if not gpu.cpus_per_bundle > 0:
        raise ValueError(f"gpu.cpus_per_bundle: expected > 0, got {gpu.cpus_per_bundle!r}")
    cpus = float(gpu.cpus_per_bundle)
    bundles = tuple({"GPU": 1.0, "CPU": cpus} for _ in range(n))
    # CPUs: the trainer side and the engines split each bundle's CPUs.
    cpu_share = cpus / 4
    slots: list[ActorSlot] = []
    if gpu.colocate:
        if n % tp:
            raise ValueError(f"gpu.num_gpus: expected a multiple of rollout.tensor_parallel_size={tp} when colocated, got {n}")
        if w > n:
            raise ValueError(f"trainer.workers: expected <= gpu.num_gpus={n} (one GPU bundle per rank), got {w}")
        shares, trainer_bundles = COLOCATED_SHARES, list(range(w))
        engine_groups = [tuple(range(e * tp, (e + 1) * tp)) for e in range(n // tp)]
        engine_share = COLOCATED_SHARES["rollout"]
    else:
        t = _positive_int("gpu.trainer_gpus", gpu.trainer_gpus)
        if n - t < tp:
            raise ValueError(
                f"gpu.trainer_gpus: expected <= gpu.num_gpus - tensor_parallel_size = {n} - {tp} "
                f"(engines need their own GPUs when not colocated), got {t}"
            )
        if w > t:
            raise ValueError(f"trainer.workers: expected <= gpu.trainer_gpus={t} (one GPU bundle per rank), got {w}")
        shares, trainer_bundles = SEPARATE_SHARES, list(range(w))
        engine_groups = [tuple(range(t + e * tp, t + (e + 1) * tp)) for e in range((n - t) // tp)]
        engine_share = 1.0
    # W > 1: every rank holds its shards of the reference, teacher and critic (their shares join
    # its own); W = 1: one actor each next to the policy actor (RayWorkers' layout).
    frozen = [role for role, used in (("reference", uses_reference), ("teacher", uses_teacher)) if used]
    role_share = {role: shares["reference"] / len(frozen) for role in frozen}
    if uses_critic:
        role_share["critic"] = shares["critic"]
    roles = list(role_share)
    rank_share = shares["policy"] + (sum(role_share.values()) if w > 1 else 0.0)
    for i, b in enumerate(trainer_bundles):
        slots.append(ActorSlot(role="policy", index=i, bundle=b, num_gpus=rank_share, num_cpus=cpu_share))
    for role in roles if w == 1 else ():
        slots.append(ActorSlot(role=role, index=0, bundle=0, num_gpus=role_share[role], num_cpus=cpu_share))
    for e, group in enumerate(engine_groups):
        slots.append(_engine_slot(e, group, engine_share, cpu_share))
    return PlacementPlan(bundles=bundles, strategy="PACK", colocate=gpu.colocate, slots=slots)


def create_placement_group(plan: PlacementPlan, *, timeout_s: float = 300.0):
    """Reserve ``plan.bundles`` on the Ray cluster and wait until they are placed.

    Raises:
        TimeoutError: the cluster cannot hold the bundles (e.g. fewer GPUs than ``N``).
    """
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group([dict(b) for b in plan.bundles], strategy=plan.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise TimeoutError(
            f"placement group: expected {len(plan.bundles)} bundles {dict(plan.bundles[0])} to be placed within "
            f"{timeout_s:.0f} s, got none; cluster resources: {ray.cluster_resources()}"
        )
    return pg


def actor_options(slot: ActorSlot, placement_group=None) -> dict[str, Any]:
    """Keyword arguments of ``ActorClass.options(...)`` for ``slot`` (inside ``placement_group``).

    Child tasks are captured, so a ``tp > 1`` engine's vLLM Ray workers land in the same group.
    """
    opts: dict[str, Any] = {"num_gpus": slot.num_gpus, "num_cpus": slot.num_cpus}
    if slot.env:
        opts["runtime_env"] = {"env_vars": dict(slot.env)}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=slot.bundle,
            placement_group_capture_child_tasks=True,
        )
    return opts
