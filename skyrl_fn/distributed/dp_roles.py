"""The reference model, the distillation teacher and the critic of a data-parallel run, sharded
with FSDP2 over the policy's ``W`` ranks (``--trainer.workers W``) and run inside the rank actors
(``skyrl_fn.distributed.dp_rank.PolicyRank``): no separate actor sees the whole batch.

* A frozen scorer (reference, teacher): built with the same seed as the single-actor role, then
  sharded; its log-probs of the step's batch are computed by every rank on its own share of rows
  (the update's share, whole prompt groups balanced by tokens) with the full parameters gathered
  for the pass (one all-gather per FSDP module, as for sampling), then all-gathered, so every rank
  holds the whole batch's ``[B, T]``.
* The critic: its values likewise; its update runs on the rank's share with the all-reduced token
  count and a reduce-scattered SUM of the gradients (``critic_update(dp=...)``), each rank
  stepping AdamW on its own shard, so the update is that of the whole batch.

The sharding is real: each rank keeps ``1/W`` of each model's parameters (and of the critic's
optimiser state) between steps (:func:`local_bytes`). A checkpoint holds the critic as shards,
written and loaded by the rank like the policy's (``PolicyRank.write_shards``/``set_state``); the
reference model and the teacher are frozen and rebuilt from their model source, so they are not
saved.

Notation: ``W`` ranks, ``B`` sequences of the step, ``B'`` of this rank's share, ``T`` response tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from skyrl_fn.models.model import build_critic, load_model, load_tokenizer
from skyrl_fn.rollout.base import RolloutBatch
from skyrl_fn.trainer.experience import Experience
from skyrl_fn.trainer.forward import batched_log_probs, batched_values
from skyrl_fn.trainer.critic import critic_update
from skyrl_fn.trainer.learner import TrainState, make_train_state, masked_row
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.sharding import Collectives, gathered, partition_groups, shard_model
from skyrl_fn.trainer.teacher import teacher_model_config

__all__ = ["RankRoles", "share_rows", "share_forward", "local_bytes", "optimizer_bytes"]


def share_rows(rollout, world_size: int, rank: int) -> torch.Tensor:
    """``[B']`` int64 rows of ``rank``'s share: whole prompt groups balanced by their token
    counts (prompt + response, :func:`~skyrl_fn.trainer.sharding.partition_groups`), ascending.
    With fewer prompt groups than ranks (a batch transform kept few) the last ranks get none."""
    tokens = (rollout.prompt_mask.sum(-1) + rollout.response_mask.sum(-1)).long()
    per_group = torch.zeros(rollout.num_prompts, dtype=torch.long).index_add_(0, rollout.group_ids.cpu(), tokens.cpu())
    w = min(world_size, rollout.num_prompts)
    if rank >= w:
        return torch.zeros(0, dtype=torch.long)
    groups = torch.tensor(partition_groups(per_group.tolist(), w)[rank], dtype=torch.long)
    return torch.nonzero(torch.isin(rollout.group_ids.cpu(), groups)).squeeze(-1)


def share_forward(
    model: nn.Module, rollout: RolloutBatch, rows: torch.Tensor, dp: Collectives, fn: Callable[[nn.Module, RolloutBatch], torch.Tensor],
    *, keep: bool = False,
) -> torch.Tensor:
    """``fn(model, rows of rollout) -> [B', C]`` on this rank's ``rows`` with ``model``'s full
    parameters, all-gathered into the whole batch's ``[B, C]`` (on the CPU; a collective).
    ``keep``: leave the full parameters gathered (``skyrl_fn.trainer.sharding.gathered``)."""
    with gathered(model.eval(), keep=keep) as full:
        if rows.numel():
            part = fn(full, rollout.select(rows)).float()
        else:  # a rank left without a prompt group still joins the gathers
            part = torch.zeros(0, rollout.response_ids.shape[1])
    return dp.gather_rows(part, rows, rollout.batch_size)


def local_bytes(model: nn.Module) -> int:
    """Bytes of this rank's resident parameter storage of ``model`` (its FSDP2 shards)."""
    local = [getattr(p, "_local_tensor", p) for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def _frozen(model: nn.Module, device: str) -> nn.Module:
    model = model.to(device).eval()
    model.requires_grad_(False)
    return shard_model(model, device=device)


class RankRoles:
    """This rank's shards of the run's reference model, teacher and critic (each None when the
    run does not use it), built in the single-actor roles' order with their seeds."""

    def __init__(self, run: ResolvedRun, tokenizer: Any, *, device: str) -> None:
        cfg, tr = run.config, run.config.trainer
        self.run, self.device = run, device
        self.reference = _frozen(load_model(cfg.model, tokenizer, seed=tr.seed), device) if run.uses_reference else None
        self.critic: TrainState | None = None
        if run.uses_critic:
            critic = shard_model(build_critic(cfg.model, tokenizer, seed=tr.seed).to(device), device=device)
            self.critic = make_train_state(critic, lr=tr.critic_lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps)
        self.teacher = None
        if run.uses_teacher:
            te = teacher_model_config(cfg)
            self.teacher = _frozen(load_model(te, load_tokenizer(te, alphabet=run.make_task().alphabet), seed=cfg.teacher.seed), device)

    def log_probs(self, role: str, rollout: RolloutBatch, rows: torch.Tensor, dp: Collectives) -> torch.Tensor:
        """``[B, T]`` log-probs of the sampled tokens under ``role`` (``"reference"``/``"teacher"``),
        with the policy's temperature and top-p."""
        cfg = self.run.config
        model = {"reference": self.reference, "teacher": self.teacher}[role]
        if model is None:
            raise RuntimeError(f"RankRoles.log_probs: this run has no {role} model")

        def fn(m: nn.Module, share: RolloutBatch) -> torch.Tensor:
            return batched_log_probs(m, share, micro_batch_size=cfg.trainer.micro_batch_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)

        return share_forward(model, rollout, rows, dp, fn)

    def values(self, rollout: RolloutBatch, rows: torch.Tensor, dp: Collectives) -> torch.Tensor:
        """``[B, T]`` critic values of the response tokens."""
        mbs = self.run.config.trainer.micro_batch_size
        return share_forward(self.critic.model, rollout, rows, dp, lambda m, share: batched_values(m, share, micro_batch_size=mbs))

    def update_critic(self, exp: Experience | None, rows: torch.Tensor, dp: Collectives) -> dict[str, float]:
        """The critic update on this rank's ``rows`` of the whole batch's experience ``exp`` (None:
        the policy step was skipped on every rank, so no rank updates: ``{}``)."""
        if exp is None:
            return {}
        return critic_update(self.run, self.critic, exp.rows(rows), dp=dp, filler=masked_row(exp))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of this rank's parameter shards of each role it holds (``critic_optim``: its
        AdamW state)."""
        out = {}
        for name, model in (("reference", self.reference), ("teacher", self.teacher)):
            if model is not None:
                out[name] = local_bytes(model)
        if self.critic is not None:
            out["critic"] = local_bytes(self.critic.model)
            out["critic_optim"] = optimizer_bytes(self.critic.optimizer)
        return out


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's resident optimiser state (its shards)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = getattr(v, "_local_tensor", v)
                total += v.numel() * v.element_size()
    return total
