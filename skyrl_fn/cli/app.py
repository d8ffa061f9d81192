"""The command line: ``python launch/train.py [PRESET] [--group.field VALUE ...] [--plugin P ...] [--app-dir DIR] [--debug]``.

Read top to bottom, :func:`main` does:

1. build the table: ``DEFAULT_TABLE`` (or the ``table`` argument), then the ``skyrl_fn.algorithms``
   entry points, then each ``--plugin``, then the SkyRL-compat façade's registrations (so a
   script that registers and then calls ``main()`` works);
2. parse the flags with tyro over ``TrainConfig``, starting from the preset (a base config); the
   ``--help`` of every name field lists what the table holds, and each chosen function's
   hyperparameters are typed flags (``skyrl_fn.cli.flags``);
3. register ``module:function`` / ``path/file.py:function`` names, then ``resolve`` once: a typo
   exits with code 2 and a suggestion before any model is built (``skyrl_fn.cli.flags``);
4. pre-flight (``skyrl_fn.cli.preflight``): data rows, writable directories, the model, the
   resume target and its config, degenerate settings — still before Ray starts;
5. train on Ray (default) or in-process (``--ray.no-use-ray``) and report.

Every user mistake ends in one line ``error: <field or file>: <expected, found>`` and exit
status 2; a fault while training (a worker died, a checkpoint could not be written, too many
non-finite steps) in one ``error:`` line and exit status 1. ``--debug`` (or ``SKYRL_FN_DEBUG=1``)
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import NoReturn, Sequence

import attrs

from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.cli.flags import DEBUG_ENV, PRESETS, UsageError, parse_config, resolve_names
from skyrl_fn.cli.observe import RunObserver
from skyrl_fn.cli.plugins import PluginError, check_shippable, freeze_compat, load_entry_points, load_plugins
from skyrl_fn.cli.preflight import Preflight, PreflightError, preflight
from skyrl_fn.core.table import AlgorithmTable, UnknownNameError
from skyrl_fn.distributed.devices import gpu_plan
from skyrl_fn.distributed.ray_runner import train_on_ray
from skyrl_fn.distributed.ray_workers import WorkerDiedError
from skyrl_fn.models.model import checkpoint_dir
from skyrl_fn.tasks.base import DataError, RewardError
from skyrl_fn.trainer.checkpoint import CheckpointError, CheckpointWarning
from skyrl_fn.trainer.config import config_to_dict
from skyrl_fn.trainer.loop import train
from skyrl_fn.trainer.nonfinite import NonFiniteStepError, SkippedStepWarning
from skyrl_fn.trainer.run import ResolvedRun
from skyrl_fn.trainer.run_table import with_run_builtins

__all__ = [
    "PRESETS",
    "EXIT_USAGE",
    "EXIT_FAULT",
    "DEBUG_ENV",
    "UsageError",
    "LauncherArgs",
    "split_launcher_args",
    "build_table",
    "parse_config",
    "resolve_names",
    "launch",
    "main",
]

#: Exit status of a usage error (argparse's convention).
EXIT_USAGE = 2
#: Exit status of a fault while training (a worker died, a checkpoint write failed, ...).
EXIT_FAULT = 1
#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


# -- 1. the table ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LauncherArgs:
    """What the launcher takes out of ``argv`` before tyro parses the rest.

    Attributes:
        plugins: each ``--plugin FILE_OR_MODULE``, in order.
        app_dir: ``--app-dir DIR``: where module names (``--plugin my_module``,
            ``my_module:function``) are searched first; None = the working directory.
        rest: the remaining arguments, for :func:`parse_config`.
        debug: ``--debug``: user errors show their traceback.
    """

    plugins: tuple[str, ...]
    app_dir: str | None
    rest: tuple[str, ...]
    debug: bool = False


def split_launcher_args(argv: Sequence[str]) -> LauncherArgs:
    """``--plugin X`` (repeatable), ``--app-dir DIR`` (also as ``--flag=value``) and ``--debug``
    out of ``argv``."""
    plugins, app_dir, rest, it = [], None, [], iter(argv)
    debug = False
    for arg in it:
        if arg == "--debug":
            debug = True
            continue
        flag, eq, value = arg.partition("=")
        if flag in ("--plugin", "--app-dir"):
            if not eq:
                value = next(it, None)
                if value is None or value.startswith("--"):
                    what = "a .py path or a module name" if flag == "--plugin" else "a directory"
                    raise UsageError(f"{flag}: expected {what} after it")
            if flag == "--plugin":
                plugins.append(value)
            elif not os.path.isdir(value):
                raise UsageError(f"--app-dir: expected an existing directory, got {value!r}")
            else:
                app_dir = value
        else:
            rest.append(arg)
    return LauncherArgs(plugins=tuple(plugins), app_dir=app_dir, rest=tuple(rest), debug=debug)


def build_table(
    table: AlgorithmTable | None = None, plugins: Sequence[str] = (), *, app_dir: str | None = None
) -> AlgorithmTable:
    """``table`` (default ``DEFAULT_TABLE``) + the built-in tasks, rewards and rollout backends it
    lacks + entry points + plugins + compat registrations."""
    table = DEFAULT_TABLE if table is None else table
    if not isinstance(table, AlgorithmTable):
        raise TypeError(f"table: expected an AlgorithmTable, got {type(table).__name__}")
    table = with_run_builtins(table)
    table = load_entry_points(table)
    table = load_plugins(plugins, table, app_dir=app_dir)
    return freeze_compat(table)



# -- 4. run ------------------------------------------------------------------------------------


#: User mistakes: one ``error:`` line, exit 2.
USER_ERRORS = (UsageError, PluginError, PreflightError, DataError, UnknownNameError)


def _fault_errors() -> tuple[type[BaseException], ...]:
    """Faults while training: one ``error:`` line, exit 1."""

    return (WorkerDiedError, CheckpointError, RewardError, NonFiniteStepError)


def _one_line(err: BaseException) -> str:
    # An error raised inside a Ray actor arrives wrapped, its str() holding the remote
    # traceback: report the original.
    cause = getattr(err, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _fail(err: BaseException, status: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """Our own warnings as ``warning: <message>`` lines; any other as Python shows it."""
    if issubclass(category, (CheckpointWarning, SkippedStepWarning)):
        _warn(str(message))
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None, table: AlgorithmTable | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), resolve names once, check, train, report.

    Args:
        argv: command-line arguments without the program name.
        table: the base table (default ``DEFAULT_TABLE``); façade registrations, entry points and
            plugins are added to it.

    Returns:
        the training ``Summary`` (see :func:`launch`).

    Exits:
        2 on a user error (unknown name with a suggestion, bad plugin, bad value, data file,
        directory, model or resume target; see ``skyrl_fn.cli.preflight``), before any
        model is built; 1 on a fault while training (a Ray worker died, a checkpoint could not
        be written); each with one ``error:`` line. ``--debug`` or ``SKYRL_FN_DEBUG=1`` raises
        instead (traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        return _main(argv, table)
    except USER_ERRORS as err:
        if debug:
            raise
        _fail(err, EXIT_USAGE)
    except KeyboardInterrupt as err:  # the loop names the step and the last checkpoint
        if debug:
            raise
        print(f"error: {err or 'interrupted (Ctrl-C)'}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:
        if debug or not isinstance(err, _fault_errors()):
            raise
        _fail(err, EXIT_FAULT)


def _main(argv: list[str], table: AlgorithmTable | None):
    try:
        args = split_launcher_args(argv)
        table = build_table(table, args.plugins, app_dir=args.app_dir)
    except (ImportError, ValueError, TypeError) as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise UsageError(str(err)) from err
    config = parse_config(args.rest, table, app_dir=args.app_dir)
    run = resolve_names(config, table, app_dir=args.app_dir)
    try:
        run.check_backend_available()
        gpu_plan(run)  # a GPU layout the GPUs cannot hold fails here, before Ray, actors or models
        if run.config.model.name_or_path is not None:
            checkpoint_dir(run.config.model)  # resolve (clear error) and dequantise a GGUF once, here, not per actor
    except (RuntimeError, ValueError) as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise UsageError(str(err)) from err
    checks = preflight(run)
    for line in checks.warnings:
        _warn(line)
    with warnings.catch_warnings():
        # Pre-flight reported the skipped checkpoints already; the loader would repeat them.
        warnings.simplefilter("ignore", CheckpointWarning)
        warnings.simplefilter("always", SkippedStepWarning)
        warnings.showwarning = _show_warning
        return launch(run, checks=checks)


def launch(run: ResolvedRun, *, out=None, checks: Preflight | None = None):
    """Train ``run`` on Ray (``ray.use_ray``, the default) or in-process, with the progress bar,
    metrics files, the reward/KL plot and a one-line summary. Returns the ``Summary``.

    ``checks``: the :func:`~skyrl_fn.cli.preflight.preflight` of ``run`` (run here when
    None); a resume's config changes go into the metrics log as an ``event`` row.
    """

    checks = preflight(run) if checks is None else checks
    cfg = run.config
    if cfg.ray.use_ray:
        entries = {f"{e.kind} {e.name!r}": e.fn for e in run.table.entries()}
        check_shippable(run, what="the resolved run (config + algorithm table)", parts=entries)
    log = cfg.logging
    with RunObserver(
        log.run_dir, total_steps=cfg.trainer.steps, start_step=checks.resume_step, jsonl=log.jsonl,
        tensorboard=log.tensorboard, plot=log.plot, progress=log.progress, wandb_project=log.wandb_project,
        config=config_to_dict(cfg), out=out,
    ) as observer:
        if checks.resume_diff is not None and checks.resume_diff.compatible:
            observer.event("resume_config_changed", step=checks.resume_step, checkpoint=checks.resume_from, changes=[
                {"field": c.field, "saved": c.saved, "current": c.current} for c in checks.resume_diff.compatible
            ])
        if cfg.ray.use_ray:
            summary = train_on_ray(run, on_step=observer.on_step)
        else:
            summary = train(run, on_step=observer.on_step)
        from skyrl_fn.trainer.batch_transforms import batch_totals

        totals = batch_totals(summary.history)  # kept/dropped counts of the batch transforms, whole run
        observer.finish({
            "backend": "ray" if cfg.ray.use_ray else "in-process", "last_checkpoint": summary.last_checkpoint,
            "resumed_from": summary.resumed_from, **({"batch_transforms": totals} if totals else {}),
        })
    return summary


def console_main() -> None:
    """The ``skyrl-fn-train`` console script: :func:`main` with exit status 0 on success."""
    main()
