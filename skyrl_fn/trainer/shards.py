"""A model's weights and optimiser state as shards on disk, written and read with
``torch.distributed.checkpoint`` (DCP).

Data-parallel ranks (``--trainer.workers W``, FSDP2) each hold a slice of every parameter and
AdamW moment. :func:`write` has every rank write its own slices (``get_state_dict``: DTensors),
so no rank and no driver ever holds the whole state; :func:`load` has every process read what
*its* model needs, whatever ``W`` wrote it: DCP reshards (2 ranks to 1, 1 to 3, ...), and a plain
unsharded model (one worker, no process group) loads the same directory whole.
:func:`read_weights` gives the full weights without a model (inspection, export, tests).

Layout of one directory (DCP's ``FileSystemWriter``, one file per rank)::

    policy/
        .metadata        every tensor's global shape and dtype, and which file holds which chunk
        __0_0.distcp     rank 0's slices of the weights ("model.*") and optimiser state ("optim.*")
        __1_0.distcp     rank 1's
        ...

The directory is written inside a checkpoint's temporary directory, so it becomes visible
atomically with the rest of the checkpoint (``skyrl_fn.trainer.checkpoint.save``), and its files
are listed with their sha256 in the checkpoint's manifest. Every rank writes to the same path: on
a multi-node cluster ``trainer.ckpt_dir`` must be a filesystem every node shares.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch
from torch import nn

from skyrl_fn.trainer.manifest import CheckpointCorruptError

__all__ = ["METADATA", "write", "missing_files", "load", "read_weights"]

#: DCP's metadata file: written last, by rank 0, once every rank has written its file.
METADATA = ".metadata"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes a single process: that is the intent
    (one worker saving or loading whole), not news to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """DCP's ``get_state_dict(model, optimizer)``, without its side effect on an optimiser that has
    not stepped yet.

    DCP creates such an optimiser's state by running one step at learning rate 0 on zero gradients
    (``torch.distributed.checkpoint.state_dict._init_optim_state``). The weights and AdamW's
    moments stay as they were, but the step count becomes 1, so the first real step would use
    step 2's bias corrections (an update ~0.74x a fresh one's) and a run that saved before its
    first update (a skipped first step) would diverge from one that did not. The counts are set
    back to 0: zero moments at step 0 is exactly the state a fresh AdamW creates."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    fresh = not optimizer.state
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if fresh:
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0
        model_sd, optim_sd = get_state_dict(model, optimizer)
    return model_sd, optim_sd


def write(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Write this process's shards of ``model`` and ``optimizer`` into ``directory`` (every file
    fsynced). On a sharded model a collective: every rank calls it with the same ``directory``."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = _state_dicts(model, optimizer)
    writer = dcp.FileSystemWriter(directory, single_file_per_rank=True, sync_files=True)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)


def missing_files(directory: str) -> list[str]:
    """Files of the shard ``directory`` that are absent: ``.metadata`` (the write did not finish),
    or the rank files its metadata names. Empty when complete."""
    import torch.distributed.checkpoint as dcp

    if not os.path.isfile(os.path.join(directory, METADATA)):
        return [METADATA]
    metadata = dcp.FileSystemReader(directory).read_metadata()
    named = sorted({item.relative_path for item in metadata.storage_data.values()})
    return [name for name in named if not os.path.isfile(os.path.join(directory, name))]


def _check_complete(directory: str) -> None:
    missing = missing_files(directory)
    if missing:
        path, name = os.path.split(os.path.normpath(directory))
        raise CheckpointCorruptError(path, f"{name}/{missing[0]}", f"missing (the shards of {name!r} need {missing})")


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load the shards in ``directory`` (written by :func:`write` at any number of ranks) into
    ``model`` and ``optimizer``: a sharded model takes its own slices (a collective: every rank
    calls it), an unsharded one the whole state.

    Raises:
        CheckpointCorruptError: a file of ``directory`` is missing (named).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    _check_complete(directory)
    model_sd, optim_sd = _state_dicts(model, optimizer)  # the slices (and moments) this process holds
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights in ``directory``, on the CPU, without a model or a process
    group: parameter name -> tensor, as ``model.state_dict()`` of an unsharded model.

    Raises:
        CheckpointCorruptError: a file of ``directory`` is missing (named).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_complete(directory)
    reader = dcp.FileSystemReader(directory)
    metadata = reader.read_metadata()
    weights = {
        key[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    state = {"model": weights}
    with _quiet():
        dcp.load(state, storage_reader=reader)
    return state["model"]
