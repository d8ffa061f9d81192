"""A checkpoint's manifest and its verification: which checkpoint directories exist, whether one
is complete and intact, and the newest that is.

``manifest.json`` (written last by ``skyrl_fn.trainer.checkpoint.save``) holds the format, the
step, the library versions, the run's config and the size and sha256 of every other file of the
checkpoint (a sharded model's files too: ``policy/__0_0.distcp``, ``critic/__1_0.distcp``), plus
its own sha256 over the rest, so a damaged manifest is detected as well. :func:`verify` checks
every file against it and raises :class:`CheckpointCorruptError` naming the first that is missing,
truncated or altered; :func:`newest_valid` walks from the newest checkpoint back, warning
(:class:`CheckpointWarning`) about each that fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from typing import Any, Callable, Mapping

__all__ = [
    "CheckpointError", "CheckpointCorruptError", "CheckpointWriteError", "NoValidCheckpointError", "CheckpointWarning",
    "MANIFEST", "FORMAT", "SHARDED_FORMAT", "entry", "sealed", "read_manifest", "read_verified", "verify",
    "list_checkpoints", "latest_checkpoint", "newest", "newest_valid",
]

_NAME = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
#: The manifest's ``format``: 1 whole models only; 2 with a sharded model (older readers then
#: refuse it by name, not by a missing file).
FORMAT, SHARDED_FORMAT = 1, 2


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or used; the message names the directory and file."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's file is missing, truncated or altered (fails the manifest)."""

    def __init__(self, path: str, file: str, reason: str) -> None:
        super().__init__(f"checkpoint {path}: {file}: {reason}")
        self.path, self.file, self.reason = path, file, reason


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. no space left); earlier checkpoints are intact."""


class NoValidCheckpointError(CheckpointError):
    """``trainer.resume`` found checkpoints, but none passes verification."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (it failed verification) or resumed with a changed config."""


def entry(data: bytes) -> dict[str, Any]:
    """The manifest's entry of a file holding ``data``: its size and sha256."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sealed(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` plus the sha256 of its canonical JSON (so a damaged manifest is detected too)."""
    canon = json.dumps(body, sort_keys=True, default=str).encode()
    return {**body, "manifest_sha256": hashlib.sha256(canon).hexdigest()}


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoint directories (``step_XXXXXXXX``) in ``ckpt_dir``, oldest first (not verified:
    :func:`verify` and ``checkpoint.load_latest`` verify)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            found.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest checkpoint directory in ``ckpt_dir`` (not verified; see :func:`newest_valid`)."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path`` (its own checksum checked; files are not).

    Raises:
        CheckpointCorruptError: missing, unreadable or altered manifest.
    """
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointCorruptError(path, MANIFEST, "missing (the save did not finish, or the checkpoint predates manifests)")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
        body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        ok = sealed(body)["manifest_sha256"] == manifest.get("manifest_sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointCorruptError(path, MANIFEST, f"unreadable ({type(err).__name__}: {err})") from None
    if not ok:
        raise CheckpointCorruptError(path, MANIFEST, "its checksum does not match its content (altered)")
    if manifest.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointCorruptError(path, MANIFEST, f"expected format {FORMAT} or {SHARDED_FORMAT}, got {manifest.get('format')!r}")
    return manifest


def read_verified(path: str, manifest: Mapping[str, Any], name: str) -> bytes:
    """The bytes of file ``name`` of the checkpoint at ``path``, checked against ``manifest``
    (listed, present, its size, then the sha256 of the very bytes returned).

    Raises:
        CheckpointCorruptError: naming ``name`` and what is wrong with it.
    """
    listed = manifest["files"].get(name)
    if listed is None:
        raise CheckpointCorruptError(path, name, "not listed in the manifest")
    fpath = os.path.join(path, name)
    if not os.path.isfile(fpath):
        raise CheckpointCorruptError(path, name, "missing (listed in the manifest)")
    try:
        size = os.path.getsize(fpath)
        if size != listed["size"]:
            raise CheckpointCorruptError(path, name, f"expected {listed['size']} bytes, found {size} (truncated or overwritten)")
        with open(fpath, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CheckpointCorruptError(path, name, f"unreadable ({err.strerror or err})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != listed["sha256"]:
        raise CheckpointCorruptError(path, name, f"sha256 {digest[:12]}... differs from the manifest's {listed['sha256'][:12]}... (altered)")
    return data


def verify(path: str) -> dict[str, Any]:
    """Check every file of the checkpoint at ``path`` against its manifest; return the manifest.

    Raises:
        CheckpointCorruptError: naming the first file that is missing, of the wrong size or altered.
    """
    manifest = read_manifest(path)
    for name in manifest["files"]:
        read_verified(path, manifest, name)
    return manifest


def newest(ckpt_dir: str, open_one: Callable[[str], Any]) -> Any:
    """``open_one(path)`` of the newest checkpoint in ``ckpt_dir`` for which it raises no
    :class:`CheckpointCorruptError` (each newer one skipped with a :class:`CheckpointWarning`
    naming the file), or None when there is no checkpoint.

    Raises:
        NoValidCheckpointError: checkpoints exist but ``open_one`` fails on each (each listed).
    """
    failures = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            found = open_one(path)
        except CheckpointCorruptError as err:
            failures.append(str(err))
            warnings.warn(f"skipping {err}", CheckpointWarning, stacklevel=3)
            continue
        if failures:
            warnings.warn(f"using {path}, the newest checkpoint that verifies", CheckpointWarning, stacklevel=3)
        return found
    if failures:
        raise NoValidCheckpointError(
            f"trainer.resume: none of the {len(failures)} checkpoints in {ckpt_dir} verifies: " + "; ".join(failures)
        )
    return None


def newest_valid(ckpt_dir: str) -> tuple[str, dict[str, Any]] | None:
    """``(path, manifest)`` of the newest checkpoint in ``ckpt_dir`` whose files all verify
    (:func:`verify`: sizes and sha256, nothing parsed), or None when there is no checkpoint.

    Each newer one that fails is skipped with a :class:`CheckpointWarning` naming the file.

    Raises:
        NoValidCheckpointError: checkpoints exist but none verifies (each failure listed).
    """
    return newest(ckpt_dir, lambda path: (path, verify(path)))
