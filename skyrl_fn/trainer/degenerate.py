"""Settings that train without error but cannot do what was meant: refused, or warned with the
reason. A pure function of the config and the chosen estimator's promises (the facts on its
table entry, ``skyrl_fn.core.properties``), run by the launcher's pre-flight before Ray starts.

Refused (the run would learn nothing, or fail at its first step):

* a group-centred estimator (promises ``group_local`` and ``shift_invariant``: grpo, dr_grpo,
  rloo, opo, grpo_passk, ...) with ``rollout.samples_per_prompt`` 1: no group baseline is left.
  What the estimator then does is probed (:func:`singleton_behaviour`) and named: every
  advantage 0 (rloo: nothing is learned), or each advantage the sample's own reward (grpo,
  dr_grpo, opo follow SkyRL's size-1 rule, mean 0 and std 1: REINFORCE without a baseline, not
  the algorithm asked for);
* an estimator that ``rejects_singleton_groups`` (or raises on a probe with groups of 1);
* ``algorithm.tis_cap`` <= 0 with an off-policy correction (every weight would be <= 0);
* the adaptive KL controller with ``kl_target`` or ``kl_horizon`` <= 0.

Warned (the run goes on):

* ``trainer.micro_batch_size`` set larger than the batch ``B = prompts_per_step *
  samples_per_prompt`` (its default is only a cap and is not reported);
* a KL coefficient changed from its default while its KL is off (``kl_loss_coef`` without
  ``use_kl_loss``, ``kl_coef``/``kl_ctrl``/``kl_target``/``kl_horizon`` without
  ``use_kl_in_reward``): no reference model is built and the value is unused;
* a KL that is on with a coefficient of 0 (a reference model built for nothing);
* ``tis_cap`` changed while ``off_policy_correction`` is none; an off-policy correction with the
  ``hf`` backend (it samples with the trainer's own weights, so every weight is 1);
* ``entropy_coef`` < 0 (rewards lower entropy);
* ``trainer.warmup_steps`` >= ``trainer.steps`` (the learning rate never reaches ``trainer.lr``);
* ``trainer.keep_checkpoints`` 1 (no older checkpoint to fall back to if the latest is damaged);
  ``trainer.ckpt_interval`` <= 0 (one checkpoint at the end: a crash loses the run);
* more prompts per step than the task has rows (prompts repeat within a step).
"""

from __future__ import annotations

from typing import Callable, Collection, Literal

import attrs
import torch

from skyrl_fn.core.records import AdvantageInput

__all__ = ["Finding", "degenerate_settings", "singleton_behaviour", "GROUP_CENTRED"]

#: Promises that make an estimator centre each group on its own mean (advantages 0 for G = 1).
GROUP_CENTRED = frozenset({"group_local", "shift_invariant"})


@attrs.frozen(kw_only=True)
class Finding:
    """One degenerate setting.

    Attributes:
        field: the flag to change, as on the command line (``rollout.samples_per_prompt``).
        message: ``<field>: <what was expected and found, and why>``.
        refuse: True stops the run before it starts; False is a warning.
    """

    field: str
    message: str
    refuse: bool


Singleton = Literal["zero", "raw", "raises", "other"]


def singleton_behaviour(estimator: Callable[[AdvantageInput], object]) -> Singleton:
    """What ``estimator`` does with groups of 1, probed on a fixed batch of ``B = 4`` one-sample
    groups (``T = 3``, outcome rewards in ``[0.1, 0.9]``, zero critic values and baselines):
    ``zero`` (every advantage 0), ``raw`` (each advantage proportional to the sample's own
    reward), ``raises`` (a ValueError), or ``other``."""
    b, t = 4, 3
    scores = torch.tensor([0.1, 0.7, 0.4, 0.9])
    rewards = torch.zeros(b, t)
    rewards[:, -1] = scores
    batch = AdvantageInput(
        token_level_rewards=rewards, response_mask=torch.ones(b, t, dtype=torch.bool), group_ids=torch.arange(b),
        values=torch.zeros(b, t), reward_baselines=torch.zeros(b),
    )
    try:
        adv = estimator(batch).advantages[:, 0].float()
    except ValueError:
        return "raises"
    if bool((adv == 0).all()):
        return "zero"
    ratio = adv / scores
    return "raw" if bool(torch.allclose(ratio, ratio[0].expand(b), rtol=1e-4)) and float(ratio[0]) > 0 else "other"


_SINGLETON_WHY = {
    "zero": "groups of 1 make every advantage 0, so nothing is learned",
    "raw": "groups of 1 leave no group baseline: each advantage is the sample's own reward "
           "(the size-1 rule: mean 0, std 1), i.e. REINFORCE without a baseline",
    "raises": "it rejects groups of 1",
    "other": "groups of 1 leave no group baseline",
}


def _defaults(config) -> object:
    return type(config.algorithm)()


def degenerate_settings(
    config, *, estimator_promises: Collection[str] = (), singleton: Singleton | None = None, task_size: int | None = None
) -> tuple[Finding, ...]:
    """The degenerate settings of ``config`` (see the module docstring), refusals first.

    Args:
        config: a ``TrainConfig``.
        estimator_promises: the ``promises`` of the chosen advantage estimator's table entry.
        singleton: the estimator's :func:`singleton_behaviour` (None: not probed).
        task_size: number of distinct prompts of the task (None: endless).

    Returns:
        the findings, refusals before warnings (empty when nothing is degenerate).
    """
    alg, tr, ro = config.algorithm, config.trainer, config.rollout
    default = _defaults(config)
    promises = frozenset(estimator_promises)
    out: list[Finding] = []

    def add(field: str, text: str, refuse: bool) -> None:
        out.append(Finding(field=field, message=f"{field}: {text}", refuse=refuse))

    g, p = ro.samples_per_prompt, tr.prompts_per_step
    est = alg.advantage_estimator
    if "rejects_singleton_groups" in promises:
        singleton = "raises"
    if g == 1 and (GROUP_CENTRED <= promises or singleton in ("zero", "raises")):
        why = _SINGLETON_WHY[singleton or "other"]
        add("rollout.samples_per_prompt", f"expected >= 2 with algorithm.advantage_estimator {est!r} (a group "
            f"baseline), got 1 ({why})", True)
    correction = getattr(alg, "off_policy_correction", "none")
    if correction != "none" and alg.tis_cap <= 0:
        add("algorithm.tis_cap", f"expected > 0 with off_policy_correction {correction!r}, got {alg.tis_cap} (every importance weight would be <= 0)", True)
    if alg.use_kl_in_reward and alg.kl_ctrl == "adaptive":
        for name in ("kl_target", "kl_horizon"):
            if getattr(alg, name) <= 0:
                add(f"algorithm.{name}", f"expected > 0 for the adaptive KL controller, got {getattr(alg, name)}", True)

    b = p * g
    if tr.micro_batch_size > b and tr.micro_batch_size != type(tr)().micro_batch_size:  # the default is a cap
        add("trainer.micro_batch_size", f"{tr.micro_batch_size} is larger than the batch (B = trainer.prompts_per_step {p} "
            f"x rollout.samples_per_prompt {g} = {b}): each step runs one micro-batch of {b}", False)
    if not alg.use_kl_loss and alg.kl_loss_coef != default.kl_loss_coef:
        add("algorithm.kl_loss_coef", f"{alg.kl_loss_coef} has no effect without algorithm.use_kl_loss (no reference model, no KL loss)", False)
    if not alg.use_kl_in_reward:
        for name in ("kl_coef", "kl_ctrl", "kl_target", "kl_horizon"):
            if getattr(alg, name) != getattr(default, name):
                add(f"algorithm.{name}", f"{getattr(alg, name)!r} has no effect without algorithm.use_kl_in_reward (no KL penalty in the reward)", False)
    if alg.use_kl_loss and alg.kl_loss_coef == 0:
        add("algorithm.kl_loss_coef", "0 with algorithm.use_kl_loss: a reference model is built and its KL computed for nothing", False)
    if alg.use_kl_in_reward and alg.kl_coef == 0 and alg.kl_ctrl == "fixed":
        add("algorithm.kl_coef", "0 with algorithm.use_kl_in_reward and a fixed controller: a reference model is built for nothing", False)
    if correction == "none" and alg.tis_cap != default.tis_cap:
        add("algorithm.tis_cap", f"{alg.tis_cap} has no effect with algorithm.off_policy_correction 'none'", False)
    if correction != "none" and ro.backend == "hf":
        add("algorithm.off_policy_correction", f"{correction!r} has no effect with rollout.backend 'hf' "
            "(it samples with the trainer's own weights, so every importance weight is 1)", False)
    if alg.entropy_coef < 0:
        add("algorithm.entropy_coef", f"{alg.entropy_coef} < 0 rewards lower entropy (pushes toward collapse); expected >= 0", False)
    if tr.warmup_steps >= tr.steps > 0 and tr.warmup_steps > 0:
        add("trainer.warmup_steps", f"{tr.warmup_steps} >= trainer.steps {tr.steps}: the learning rate never reaches trainer.lr", False)
    if tr.keep_checkpoints == 1:
        add("trainer.keep_checkpoints", "1 leaves no older checkpoint to fall back to if the latest is damaged", False)
    if tr.ckpt_interval <= 0 and tr.steps > 1:
        add("trainer.ckpt_interval", f"{tr.ckpt_interval} saves only at the end: a crash loses the whole run", False)
    if task_size is not None and p > task_size:
        add("trainer.prompts_per_step", f"{p} is more than the task's {task_size} prompts: prompts repeat within a step", False)
    return tuple(sorted(out, key=lambda f: not f.refuse))
