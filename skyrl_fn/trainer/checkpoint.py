"""Atomic, verified checkpoints: a checkpoint directory is either complete and intact or not used.

``save`` writes everything into a hidden temporary directory next to the target, each file with
its size and sha256 recorded, then ``manifest.json`` (written last), fsyncs every file and the
directory, ``os.replace``-s it to ``step_XXXXXXXX``, fsyncs the parent, reads it back
(:func:`verify`) and only then prunes older checkpoints. A crash at any point leaves the previous
checkpoints untouched and at most a hidden ``.tmp-*`` directory, which the next ``save`` removes.
A failed write (e.g. ENOSPC) raises :class:`CheckpointWriteError` naming the file and the intact
previous checkpoint.

:func:`load` verifies every file against the manifest (size, then sha256 of the very bytes it
parses) and raises :class:`CheckpointCorruptError` naming the file. :func:`load_latest` walks
from the newest checkpoint back, warning (:class:`CheckpointWarning`) about each one that fails,
and returns the newest that verifies; if there are checkpoints but none verifies it raises
:class:`NoValidCheckpointError`. The manifest, its verification and the listing of checkpoints
are :mod:`skyrl_fn.trainer.manifest` (its names are importable from here too).

Layout of one checkpoint::

    step_00000020/
        <name>.safetensors   weights of each model ("policy", "critic", ...)
        <name>/              or: a sharded model's weights and optimiser state, one file per rank
                             (data-parallel ranks write their own: "policy/", "critic/";
                             skyrl_fn.trainer.shards)
        optim.pt             optimiser and scheduler states (torch.save, loaded weights_only)
        rng.pt               torch / numpy / python RNG states (of each rank: ``{"ranks": [...]}``)
        in_flight.pt         asynchronous training only: the batches sampled ahead (tensors,
                             lists and plain values; skyrl_fn.trainer.async_loop)
        state.json           step, data state, extra (e.g. the KL coefficient), model names
                             (``models``; the sharded ones also in ``sharded``)
        manifest.json        format, step, library versions, the run's config, and the size and
                             sha256 of every file above (shards too: ``critic/__0_0.distcp``);
                             its own sha256 over the rest
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import uuid
from typing import Any, Callable, Mapping

import attrs
import numpy as np
import torch

from skyrl_fn.trainer.manifest import (
    FORMAT, MANIFEST, SHARDED_FORMAT, CheckpointCorruptError, CheckpointError, CheckpointWarning, CheckpointWriteError,
    NoValidCheckpointError, entry, latest_checkpoint, list_checkpoints, newest, newest_valid, read_manifest,
    read_verified, sealed, verify,
)

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointCorruptError", "CheckpointWriteError", "NoValidCheckpointError",
    "CheckpointWarning", "MANIFEST", "save", "load", "load_latest", "newest_valid", "verify", "read_manifest",
    "latest_checkpoint", "list_checkpoints", "capture_rng", "restore_rng",
]


@attrs.frozen(kw_only=True, eq=False)
class Checkpoint:
    """A loaded, verified checkpoint.

    Attributes:
        path: its directory.
        step: training steps completed when it was saved.
        weights: model name -> state dict (CPU tensors).
        optim: name -> optimiser/scheduler state (whatever was saved).
        rng: RNG states (see :func:`capture_rng`).
        data_state: the prompt stream's state (e.g. ``{"position": 80, "seed": 0}``).
        config: the run's config as a dict.
        extra: further JSON state (e.g. the KL controller's coefficient).
        versions: library versions that wrote it (``skyrl_fn``, ``torch``).
        in_flight: the samples in flight of an asynchronous run (``in_flight.pt``), or None.
        shards: model name -> directory of its shards (verified; load them with
            ``skyrl_fn.trainer.shards``), for the models saved sharded; their optimiser state is
            there too, not in ``optim``.
    """

    path: str
    step: int
    weights: Mapping[str, Mapping[str, torch.Tensor]]
    optim: Mapping[str, Any]
    rng: Mapping[str, Any]
    data_state: Mapping[str, Any]
    config: Mapping[str, Any]
    extra: Mapping[str, Any]
    versions: Mapping[str, str] = attrs.field(factory=dict)
    in_flight: Any = None
    shards: Mapping[str, str] = attrs.field(factory=dict)


def capture_rng() -> dict[str, Any]:
    """The global torch, numpy and python RNG states (picklable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": _to_lists(random.getstate()),
    }


def restore_rng(state: Mapping[str, Any], *, rank: int = 0) -> None:
    """Restore what :func:`capture_rng` returned, or rank ``rank``'s of ``{"ranks": [...]}`` (the
    states of a data-parallel run's ranks); a rank beyond those saved takes rank 0's (as at the
    start of a run, where every rank is seeded alike)."""
    if "ranks" in state:
        ranks = state["ranks"]
        state = ranks[rank] if rank < len(ranks) else ranks[0]
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the one place checkpoint bytes reach the disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_bytes(sd: Mapping[str, torch.Tensor], step: int) -> bytes:
    from safetensors.torch import save

    # safetensors refuses tensors that share storage (tied embeddings): store independent copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    return save(plain, metadata={"step": str(step)})


def _listed(tmp: str, name: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file a shard writer left in ``tmp/name`` (fsynced with its directory)."""
    files = {}
    for root, _, names in os.walk(os.path.join(tmp, name)):
        for f in sorted(names):
            with open(os.path.join(root, f), "rb") as fh:
                data = fh.read()
            files[os.path.relpath(os.path.join(root, f), tmp).replace(os.sep, "/")] = entry(data)
        _fsync_dir(root)
    if not files:
        raise OSError(f"the writer of {name} left no file")
    return files


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("skyrl_fn")
    except PackageNotFoundError:  # running from a source tree that is not installed
        ours = "unknown"
    return {"skyrl_fn": ours, "torch": torch.__version__.split("+")[0]}


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
    in_flight: Any = None,
    shards: Mapping[str, Callable[[str], None]] | None = None,
) -> str:
    """Write a checkpoint atomically with its manifest; keep the newest ``keep``; return its directory.

    Args:
        ckpt_dir: parent directory (created).
        step: training steps completed (>= 0); names the directory ``step_XXXXXXXX``.
        weights: model name -> state dict, e.g. ``{"policy": model.state_dict()}``.
        optim: name -> optimiser/scheduler state dicts.
        data_state: the prompt stream state.
        config: the run config (JSON-able dict), stored in the manifest.
        rng: RNG states; captured now (:func:`capture_rng`) when None.
        extra: further JSON-able state.
        in_flight: samples in flight (asynchronous training), written to ``in_flight.pt`` when
            not None; only tensors, containers and plain values (it is loaded weights_only).
        keep: number of newest checkpoints to keep (>= 1); older ones are pruned only after the
            new one has been read back and verified (:func:`verify`).
        shards: model name -> writer of a sharded model: ``write(directory)`` fills the empty
            ``directory`` (``<name>/`` of the temporary checkpoint) with the model's weights and
            optimiser state, e.g. every data-parallel rank its own file
            (``skyrl_fn.trainer.shards.write``); every file it leaves is listed in the manifest.

    Raises:
        ValueError: negative step, keep < 1, a model name that is not a plain identifier, or in
            both ``weights`` and ``shards``.
        CheckpointWriteError: an OS error while writing (e.g. no space left on device); names the
            file and the previous checkpoint, which is left intact.
    """
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    shards = dict(shards or {})
    for name in [*weights, *shards]:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"weights: expected names of letters, digits and _, got {name!r}")
    if set(weights) & set(shards):
        raise ValueError(f"shards: expected models not also in weights, got {sorted(set(weights) & set(shards))}")
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    previous = latest_checkpoint(ckpt_dir)
    doing = f"create {ckpt_dir}"
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of a crashed save
            if name.startswith(".tmp-") or name.startswith(".old-"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        tmp = os.path.join(ckpt_dir, f".tmp-step_{step:08d}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            files = {}
            for name, write in shards.items():
                doing = f"write the shards of {name}"
                os.makedirs(os.path.join(tmp, name))
                write(os.path.join(tmp, name))
                files.update(_listed(tmp, name))
            contents = {f"{name}.safetensors": _safetensors_bytes(sd, step) for name, sd in weights.items()}
            contents["optim.pt"] = _torch_bytes(dict(optim or {}))
            contents["rng.pt"] = _torch_bytes(dict(rng if rng is not None else capture_rng()))
            if in_flight is not None:
                contents["in_flight.pt"] = _torch_bytes(in_flight)
            contents["state.json"] = _json_bytes({
                "step": step, "data_state": dict(data_state or {}), "extra": dict(extra or {}),
                "models": sorted([*weights, *shards]), "sharded": sorted(shards),
            })
            for name, data in contents.items():
                doing = f"write {name}"
                _write_bytes(os.path.join(tmp, name), data)
                files[name] = entry(data)
            # The manifest last: a directory without one was never finished.
            doing = f"write {MANIFEST}"
            manifest = sealed({
                "format": SHARDED_FORMAT if shards else FORMAT, "step": step, "versions": _versions(), "config": dict(config or {}), "files": files,
            })
            _write_bytes(os.path.join(tmp, MANIFEST), _json_bytes(manifest))
            _fsync_dir(tmp)
            doing = f"move {os.path.basename(tmp)} into place"
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
    except OSError as err:
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"checkpoint {final}: could not {doing}: "
            f"{err.strerror or err} ({type(err).__name__}); {kept}"
        ) from err
    verify(final)  # read back (sizes, sha256) what was written before anything older goes
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        # Renamed away first, so an interrupted prune never leaves a half-deleted step_ directory.
        gone = os.path.join(ckpt_dir, f".old-{os.path.basename(old)}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(old, gone)
        except OSError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
    return final


def load(path: str) -> Checkpoint:
    """Read and verify the checkpoint at ``path`` (a ``step_XXXXXXXX`` directory).

    Every file is read once; its size and sha256 are checked against the manifest before it is
    parsed.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        CheckpointCorruptError: a file is missing, truncated, altered or unparsable (named).
    """
    from safetensors.torch import load as load_safetensors

    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: expected a checkpoint directory, got {path!r}")
    manifest = read_manifest(path)

    def parse(name: str, how: Callable[[bytes], Any]) -> Any:
        data = read_verified(path, manifest, name)
        try:
            return how(data)
        except Exception as err:  # verified bytes that still do not parse: a bad writer
            raise CheckpointCorruptError(path, name, f"does not parse ({type(err).__name__}: {err})") from None

    state = parse("state.json", json.loads)
    sharded = state.get("sharded", [])
    weights = {name: parse(f"{name}.safetensors", load_safetensors) for name in state["models"] if name not in sharded}
    for name in sharded:  # verified here; the workers read them (skyrl_fn.trainer.shards)
        listed = [f for f in manifest["files"] if f.startswith(f"{name}/")]
        if not listed:
            raise CheckpointCorruptError(path, f"{name}/", "no shard files listed in the manifest")
        for f in listed:
            read_verified(path, manifest, f)
    optim = parse("optim.pt", lambda b: torch.load(io.BytesIO(b), weights_only=True))
    rng = parse("rng.pt", lambda b: torch.load(io.BytesIO(b), weights_only=True))
    in_flight = parse("in_flight.pt", lambda b: torch.load(io.BytesIO(b), weights_only=True)) if "in_flight.pt" in manifest["files"] else None
    return Checkpoint(
        path=path, step=int(state["step"]), weights=weights, optim=optim, rng=rng,
        data_state=state["data_state"], config=manifest["config"], extra=state["extra"],
        versions=manifest.get("versions", {}), in_flight=in_flight,
        shards={name: os.path.join(path, name) for name in sharded},
    )


def load_latest(ckpt_dir: str) -> Checkpoint | None:
    """The newest checkpoint in ``ckpt_dir`` that verifies and parses (:func:`load`), or None
    when there is no checkpoint at all.

    Each newer one that fails is skipped with a :class:`CheckpointWarning` naming the file and
    the reason, then the next older one is tried.

    Raises:
        NoValidCheckpointError: checkpoints exist but none verifies (each failure listed).
    """
    return newest(ckpt_dir, load)
