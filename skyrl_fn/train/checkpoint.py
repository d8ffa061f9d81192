"""Atomic checkpoints: a checkpoint directory is either complete or invisible.

``save`` writes everything into a hidden temporary directory next to the target, fsyncs every
file and the directory, then ``os.replace``-s it to ``step_XXXXXXXX`` and fsyncs the parent. A
crash at any point leaves the previous checkpoints untouched and at most a hidden ``.tmp-*``
directory, which the next ``save`` removes and ``latest_checkpoint`` never returns.

Layout of one checkpoint::

    step_00000020/
        <name>.safetensors   weights of each model ("policy", "critic", ...)
        optim.pt             optimiser and scheduler states (torch.save, loaded weights_only)
        rng.pt               torch / numpy / python RNG states
        state.json           step, data state, extra (e.g. the KL coefficient)
        config.json          the run's config
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from typing import Any, Mapping

import attrs
import numpy as np
import torch

__all__ = ["Checkpoint", "save", "load", "latest_checkpoint", "list_checkpoints", "capture_rng", "restore_rng"]

_NAME = re.compile(r"^step_(\d{8})$")


@attrs.frozen(kw_only=True, eq=False)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: its directory.
        step: training steps completed when it was saved.
        weights: model name -> state dict (CPU tensors).
        optim: name -> optimiser/scheduler state (whatever was saved).
        rng: RNG states (see :func:`capture_rng`).
        data_state: the prompt stream's state (e.g. ``{"position": 80, "seed": 0}``).
        config: the run's config as a dict.
        extra: further JSON state (e.g. the KL controller's coefficient).
    """

    path: str
    step: int
    weights: Mapping[str, Mapping[str, torch.Tensor]]
    optim: Mapping[str, Any]
    rng: Mapping[str, Any]
    data_state: Mapping[str, Any]
    config: Mapping[str, Any]
    extra: Mapping[str, Any]


def capture_rng() -> dict[str, Any]:
    """The global torch, numpy and python RNG states (picklable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": _to_lists(random.getstate()),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoint directories in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, "state.json")):
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint in ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings): store independent copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def save(
    ckpt_dir: str,
    *,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    optim: Mapping[str, Any] | None = None,
    data_state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    rng: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write a checkpoint atomically; keep the newest ``keep``; return its directory.

    Args:
        ckpt_dir: parent directory (created).
        step: training steps completed (>= 0); names the directory ``step_XXXXXXXX``.
        weights: model name -> state dict, e.g. ``{"policy": model.state_dict()}``.
        optim: name -> optimiser/scheduler state dicts.
        data_state: the prompt stream state.
        config: the run config (JSON-able dict).
        rng: RNG states; captured now (:func:`capture_rng`) when None.
        extra: further JSON-able state.
        keep: number of newest checkpoints to keep (>= 1).

    Raises:
        ValueError: negative step, keep < 1, or a weights name that is not a plain identifier.
    """
    from safetensors.torch import save_file

    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    for name in weights:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"weights: expected names of letters, digits and _, got {name!r}")
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in os.listdir(ckpt_dir):  # leftovers of a crashed save
        if name.startswith(".tmp-") or name.startswith(".old-"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = os.path.join(ckpt_dir, f".tmp-step_{step:08d}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        files = []
        for name, sd in weights.items():
            path = os.path.join(tmp, f"{name}.safetensors")
            save_file(_plain_state_dict(sd), path, metadata={"step": str(step)})
            files.append(path)
        path = os.path.join(tmp, "optim.pt")
        torch.save(dict(optim or {}), path)
        files.append(path)
        path = os.path.join(tmp, "rng.pt")
        torch.save(dict(rng if rng is not None else capture_rng()), path)
        files.append(path)
        path = os.path.join(tmp, "config.json")
        _write_json(path, dict(config or {}))
        files.append(path)
        # state.json last: its presence marks a complete checkpoint even without the rename.
        path = os.path.join(tmp, "state.json")
        _write_json(path, {"step": step, "data_state": dict(data_state or {}), "extra": dict(extra or {}), "models": sorted(weights)})
        files.append(path)
        for path in files:
            _fsync_file(path)
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            old = os.path.join(ckpt_dir, f".old-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str) -> Checkpoint:
    """Read the checkpoint at ``path`` (a ``step_XXXXXXXX`` directory).

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    from safetensors.torch import load_file

    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"path: expected a checkpoint directory holding state.json, got {path!r}")
    with open(state_path) as f:
        state = json.load(f)
    weights = {name: load_file(os.path.join(path, f"{name}.safetensors")) for name in state["models"]}
    optim = torch.load(os.path.join(path, "optim.pt"), weights_only=True)
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return Checkpoint(
        path=path, step=int(state["step"]), weights=weights, optim=optim, rng=rng,
        data_state=state["data_state"], config=config, extra=state["extra"],
    )
