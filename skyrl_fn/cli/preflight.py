"""Checks run on the driver after names resolve and before Ray starts or a model loads.

Each finds a user mistake that would otherwise surface minutes later as a traceback inside a
worker, and raises :class:`PreflightError` with one line ``<field or file>: <expected, found>``:

* data: ``data.path`` exists and is a readable file, and every row parses
  (``ResolvedRun.make_task``, naming ``file:line``);
* places: ``logging.run_dir`` and the checkpoint directory can be created and written;
* the model: the embedded model's sizes agree (``hidden_size`` a multiple of ``num_heads``);
  a local ``model.name_or_path`` is a directory with a causal-LM ``config.json``, weights and a
  tokenizer;
* resume: the newest checkpoint that verifies (damaged newer ones are skipped, each named in a
  warning) and its config against the current one (``skyrl_fn.trainer.resume``): incompatible
  fields refuse, compatible changes are warnings.

Degenerate settings (``skyrl_fn.trainer.degenerate``) are refused or warned here too.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import warnings

import attrs

from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.config import config_to_dict
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.degenerate import degenerate_settings, singleton_behaviour
from skyrl_fn.trainer.resume import ConfigDiff, IncompatibleResumeError, check_resume
from skyrl_fn.trainer.evaluate import heldout_task
from skyrl_fn.tasks.base import DataError
from skyrl_fn.trainer.teacher import check_teacher_vocabulary
from skyrl_fn.trainer.workers import trained_roles

__all__ = ["PreflightError", "Preflight", "preflight", "check_writable", "check_model", "check_resume_target"]


class PreflightError(ValueError):
    """A user mistake found before training; the message is one ``field: expected, found`` line."""


@attrs.frozen(kw_only=True)
class Preflight:
    """What the checks found.

    Attributes:
        warnings: one line each (skipped checkpoints, compatible config changes, settings that
            train but are probably not what was meant).
        resume_from: the checkpoint a resumed run will load, or None (fresh run).
        resume_step: its step (0 for a fresh run).
        resume_diff: the config changes since that checkpoint, or None.
    """

    warnings: tuple[str, ...] = ()
    resume_from: str | None = None
    resume_step: int = 0
    resume_diff: ConfigDiff | None = None


def check_writable(path: str, field: str) -> None:
    """Create ``path`` if needed and write (then remove) a probe file in it.

    Raises:
        PreflightError: ``<field>: expected a writable directory, got '<path>' (<reason>)``.
    """
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise PreflightError(f"{field}: expected a directory, got {path!r} (a file)")
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise PreflightError(f"{field}: expected a writable directory, got {path!r} ({err.strerror or err})") from None


def check_model(cfg: ModelConfig) -> None:
    """The embedded model's sizes, or a local HF directory's config, weights and tokenizer.

    Raises:
        PreflightError: naming the ``model.*`` field or the file.
    """
    if cfg.name_or_path is None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(cfg, name) < 1:
                raise PreflightError(f"model.{name}: expected >= 1, got {getattr(cfg, name)}")
        if cfg.hidden_size % cfg.num_heads:
            raise PreflightError(f"model.hidden_size: expected a multiple of model.num_heads={cfg.num_heads}, got {cfg.hidden_size}")
        return
    path = cfg.name_or_path
    if not os.path.isdir(path):
        raise PreflightError(f"model.name_or_path: expected a local HF model directory (downloads are disabled), got {path!r}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise PreflightError(f"model.name_or_path: expected {config_path} (a HF model directory), found no such file")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, JSON errors
        raise PreflightError(f"{config_path}: expected a readable HF model config, got {type(err).__name__}: {err}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PreflightError(f"{config_path}: expected a causal-LM model_type, got {config.model_type!r}")
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json") for p in glob.glob(os.path.join(path, pattern))]
    if not weights:
        raise PreflightError(f"model.name_or_path: expected weights (*.safetensors or *.bin) in {path!r}, found none")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise PreflightError(f"model.name_or_path: expected a tokenizer ({', '.join(tokenizer_files)}) in {path!r}, found none")


def check_teacher(cfg, alphabet: str) -> None:
    """The teacher (``teacher.model``) loads its tokenizer and it is the policy's
    (``skyrl_fn.trainer.teacher.check_teacher_vocabulary``; no weights are read)."""
    try:
        check_teacher_vocabulary(cfg, alphabet)
    except (OSError, ValueError) as err:
        text = str(err).strip().splitlines()[0]
        raise PreflightError(text if text.startswith("teacher.model") else f"teacher.model {cfg.teacher.model!r}: {text}") from None


def check_resume_target(run: ResolvedRun) -> Preflight:
    """The checkpoint ``trainer.resume`` will load and its config changes (see the module doc).

    Raises:
        PreflightError: checkpoints exist but none verifies, or the newest valid one's config is
            incompatible (each field named).
    """
    cfg = run.config
    if not cfg.trainer.resume:
        return Preflight()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ckpt.CheckpointWarning)
        try:
            found = ckpt.newest_valid(cfg.ckpt_dir)
        except ckpt.NoValidCheckpointError as err:
            raise PreflightError(str(err)) from None
    lines = tuple(str(w.message) for w in caught if issubclass(w.category, ckpt.CheckpointWarning))
    if found is None:
        return Preflight(warnings=lines)
    path, manifest = found
    with open(os.path.join(path, "state.json")) as f:  # verified by newest_valid
        models = json.load(f)["models"]
    try:
        diff = check_resume(manifest["config"], config_to_dict(cfg), where=path, saved_models=models, needed_models=trained_roles(run))
    except IncompatibleResumeError as err:
        raise PreflightError(str(err)) from None
    if diff.warning():
        lines += (diff.warning(),)
    return Preflight(warnings=lines, resume_from=path, resume_step=int(manifest["step"]), resume_diff=diff)


def preflight(run: ResolvedRun) -> Preflight:
    """Run every check of the module docstring on ``run``; the first failure raises.

    Raises:
        PreflightError: one line naming the field or file, what was expected and what was found.
    """
    cfg = run.config
    try:
        task = run.make_task()
        if cfg.eval.every > 0:
            heldout_task(task, cfg.eval)
    except (DataError, ValueError) as err:
        raise PreflightError(str(err)) from None
    promises = run.table.entry("advantage_estimator", cfg.algorithm.advantage_estimator).promises
    singleton = None
    if cfg.rollout.samples_per_prompt == 1:
        singleton = singleton_behaviour(run.algorithm.estimator)
    findings = degenerate_settings(cfg, estimator_promises=promises, singleton=singleton, task_size=task.size())
    refused = [f.message for f in findings if f.refuse]
    if refused:
        raise PreflightError("; ".join(refused))
    check_model(cfg.model)
    if run.uses_teacher:
        check_teacher(cfg, task.alphabet)
    check_writable(cfg.logging.run_dir, "logging.run_dir")
    check_writable(cfg.ckpt_dir, "trainer.ckpt_dir" if cfg.trainer.ckpt_dir else "trainer.ckpt_dir (<logging.run_dir>/checkpoints)")
    resumed = check_resume_target(run)
    return attrs.evolve(resumed, warnings=tuple(f.message for f in findings if not f.refuse) + resumed.warnings)
