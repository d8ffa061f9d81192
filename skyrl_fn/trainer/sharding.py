"""Data parallelism for the trainer: the process group, FSDP2 sharding, the batch split and the
collectives the learner needs (``skyrl_fn.distributed.dp`` runs one rank per Ray actor).

Notation: ``W`` ranks, ``P`` prompts, ``G`` samples per prompt, ``B = P * G``.

One code path for CPU and CUDA: the backend is ``gloo`` on CPU and ``nccl`` on CUDA
(:func:`backend_for`); the device mesh is the ``W`` ranks of the group. Every rank holds the
step's whole rollout (the shares sampled by each rank are all-gathered, a few KB of token ids),
so everything that looks at the whole batch — group-relative advantages, batch statistics, the
metrics of the experience — is computed identically on every rank; only the forward/backward
passes of the update run on a share (:func:`partition_groups`). The normalisers of the loss
(tokens, sequences) are all-reduced (:class:`Collectives`), so each rank's loss is its part of
the whole batch's loss and the summed (not averaged: :func:`shard_model` sets the divide factor
to 1) gradients are the whole batch's gradient.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "backend_for",
    "init_process_group",
    "transformer_blocks",
    "shard_model",
    "gathered",
    "reshard",
    "full_state_dict",
    "load_full_state",
    "partition_groups",
    "Collectives",
]


def backend_for(device: str) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(*, rank: int, world_size: int, host: str, port: int, device: str, timeout_s: float) -> None:
    """Join the trainer's process group (TCP rendezvous at ``host:port``, rank 0's node; no
    torchrun). A collective that waits longer than ``timeout_s`` (a dead peer) raises."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("init_process_group: this process already belongs to a process group")
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend_for(device), init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: the children of its largest ``nn.ModuleList``
    (``model.model.layers`` of a Llama/Qwen causal LM, the backbone's layers of a critic)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"model: expected an nn.ModuleList of transformer blocks in {type(model).__name__}, found none")
    return list(max(lists, key=len))


def shard_model(model: nn.Module, *, device: str, mixed_precision: bool = False) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard`` on each transformer block, then on
    the root) over all ranks of the default group; returns it.

    Gradients are reduce-scattered as a SUM (divide factor 1): the loss is already normalised by
    the whole batch's counts; on gloo by :class:`AllReduceScatter`. ``mixed_precision`` (CUDA):
    bf16 parameters for compute, fp32 gradient reduction, fp32 master weights and optimiser state.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # reshard_after_forward=False: the parameters gathered for a forward stay until its backward
    # has run (no second all-gather; sampling inside gathered() makes no collective at all).
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=False, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor") and hasattr(m, "reshard"):  # every FSDPModule
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
            if backend_for(device) == "gloo":
                m.set_custom_reduce_scatter(AllReduceScatter())
    return model


class AllReduceScatter:
    """FSDP2's gradient reduce-scatter as an all-reduce of the flat gradient buffer, each rank
    then keeping its own slice (``FSDPModule.set_custom_reduce_scatter``; gloo, i.e. on CPU).

    gloo's ``reduce_scatter`` takes about twice the time of its ring ``all_reduce`` of the same
    buffer (measured on 2 ranks, 10.5 MB of float32 gradients: 56 vs 30 ms wall, 21 vs 12 ms of
    CPU per rank, docs/distributed.md), and the all-reduce's result holds every rank's slice.
    The sums are the same (for two ranks bit for bit: each element is ``a + b`` either way).
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        import torch.distributed as dist

        # FSDP2 frees the input (its copy of the unsharded gradients) after this call: reduced in place
        dist.all_reduce(input_tensor, op=op, group=group)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        output_tensor.copy_(input_tensor.view(world, -1)[rank])
        return None


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module, *, keep: bool = False) -> Iterator[nn.Module]:
    """The FSDP2-sharded ``model`` with its full parameters on every rank for the duration (one
    all-gather per FSDP module on entry, none when they are already gathered; reshard on exit):
    forward passes inside make no collective, so ranks may run different numbers of them
    (sampling, evaluation). ``keep``: leave the full parameters gathered on exit, for the update
    that follows (its forward passes then gather nothing; its last backward, or :func:`reshard`,
    reshards)."""
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        if not keep:
            reshard(model)


def reshard(model: nn.Module) -> None:
    """Free the gathered full parameters of the FSDP2-sharded ``model`` (a no-op when sharded)."""
    for m in _fsdp_modules(model):
        m.reshard()


def full_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict (a collective: every rank calls it). ``rank0_only``: on the CPU,
    and empty on the other ranks (for checkpoints); else every rank gets every tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def _param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in ``model.parameters()`` order (the optimiser's ids)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: Mapping[str, torch.Tensor], optim: Mapping[str, Any]) -> None:
    """Load unsharded weights and an index-keyed optimiser state (a plain
    ``optimizer.state_dict()``: a single worker's checkpoint) into ``model``/``optimizer``:
    FSDP2-sharded, every rank keeps its own shard (a collective); or plain, as
    ``load_state_dict`` would."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, dict(weights), options=opts)
    names = _param_names(model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
    osd = {"state": {names[int(i)]: s for i, s in optim["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd, options=opts)


def partition_groups(group_tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Split ``P`` prompt groups over ``W`` ranks by whole groups, balancing token counts.

    Greedy longest-processing-time: groups in descending token count (ties: lower index first)
    each go to the rank with the fewest tokens so far (ties: lower rank). Deterministic, so every
    rank computes the same split; each rank's groups come back in ascending order.

    Args:
        group_tokens: ``[P]`` tokens (prompt + response, all ``G`` rows) of each group, each > 0.
        world_size: ``W`` with ``1 <= W <= P``.

    Returns:
        ``W`` lists of group indices, none empty.
    """
    p = len(group_tokens)
    if not 1 <= world_size <= p:
        raise ValueError(f"world_size: expected 1 <= W <= P = {p} (a rank per whole prompt group), got {world_size}")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for g in sorted(range(p), key=lambda i: (-int(group_tokens[i]), i)):
        r = min(range(world_size), key=lambda k: (loads[k], len(shares[k]), k))
        loads[r] += int(group_tokens[g])
        shares[r].append(g)
    return [sorted(s) for s in shares]


class Collectives:
    """The reductions the learner needs across the ranks of the default process group (every
    rank must make the same calls in the same order)."""

    def __init__(self, device: str) -> None:
        import torch.distributed as dist

        self.device = torch.device(device)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def _reduce(self, values: Sequence[float], op: str) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t.tolist()

    def batch_counts(self, tokens: torch.Tensor | int, seqs: int, micro_batches: int) -> tuple[torch.Tensor, int, int]:
        """One all-gather: ``(sum of tokens [float32 0-dim], sum of seqs, max of micro_batches)``."""
        import torch.distributed as dist

        mine = torch.tensor([float(tokens), float(seqs), float(micro_batches)], dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        t = torch.stack(every).cpu()
        return t[:, 0].sum().to(torch.float32), int(t[:, 1].sum()), int(t[:, 2].max())

    def accumulate(self, model: nn.Module, *, last: bool) -> None:
        """Before a micro-batch's backward: reduce-scatter the gradients and reshard the
        parameters only after the step's last one (earlier ones accumulate locally), so an
        update costs one all-gather and one reduce-scatter per FSDP module, not one per micro-batch."""
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)

    def total(self, value: float) -> float:
        """``value`` summed over ranks."""
        return self._reduce([value], "sum")[0]

    def gather_rows(self, part: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The whole batch's ``[B, T]`` from every rank's ``part [B', T]`` of its ``rows [B']``
        (the shares of :func:`partition_groups`: disjoint, together every row), on the CPU. A
        rank with no rows sends a ``[0, *]`` part of any width; the others' set the width and dtype."""
        parts = [(r, p) for r, p in self.all_gather_object((rows.cpu(), part.detach().cpu())) if r.numel()]
        width, dtype = (parts[0][1].shape[-1], parts[0][1].dtype) if parts else (part.shape[-1], part.dtype)
        out = torch.zeros(batch_size, width, dtype=dtype)
        for r, p in parts:
            out[r] = p.to(dtype)
        return out

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank."""
        return bool(self._reduce([1.0 if flag else 0.0], "min")[0] > 0)

    def sum_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Key-wise sums over ranks (every rank has the same keys)."""
        keys = sorted(sums)
        return dict(zip(keys, self._reduce([sums[k] for k in keys], "sum")))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
