"""The command line: ``python launch/train.py [PRESET] [--group.field VALUE ...] [--plugin P ...] [--app-dir DIR] [--debug]``.

Read top to bottom, :func:`main` does:

1. build the table: ``DEFAULT_TABLE`` (or the ``table`` argument), then the ``skyrl_fn.algorithms``
   entry points, then each ``--plugin``, then the SkyRL-compat façade's registrations (so a
   script that registers and then calls ``main()`` works);
2. parse the flags with tyro over ``TrainConfig``, starting from the preset (a base config); the
   ``--help`` of every name field lists what the table holds, and each chosen function's
   hyperparameters are typed flags (``--algorithm.estimator.lambd``, ``--algorithm.loss.tau-pos``;
   ``skyrl_fn.cli.hyper_flags``);
3. register ``module:function`` / ``path/file.py:function`` names, then ``resolve`` once: a typo
   exits with code 2 and a suggestion before any model is built;
4. pre-flight (``skyrl_fn.cli.preflight``): data rows, writable directories, the model, the
   resume target and its config, degenerate settings — still before Ray starts;
5. train on Ray (default) or in-process (``--ray.no-use-ray``) and report.

Every user mistake ends in one line ``error: <field or file>: <expected, found>`` and exit
status 2; a fault while training (a worker died, a checkpoint could not be written, too many
non-finite steps) in one ``error:`` line and exit status 1. ``--debug`` (or ``SKYRL_FN_DEBUG=1``)
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Annotated, Any, Mapping, NoReturn, Sequence

import attrs
import tyro

from skyrl_fn.algorithm.builtins import DEFAULT_TABLE
from skyrl_fn.cli.plugins import (
    NAME_FIELDS,
    PluginError,
    check_shippable,
    freeze_compat,
    load_entry_points,
    load_plugins,
    register_import_names,
)
from skyrl_fn.cli.hyper_flags import check_group_flags, chosen_names, group_type, to_mapping
from skyrl_fn.cli.observe import RunObserver
from skyrl_fn.cli.preflight import Preflight, PreflightError, preflight
from skyrl_fn.distributed.ray_runner import train_on_ray
from skyrl_fn.distributed.ray_workers import WorkerDiedError
from skyrl_fn.core.table import AlgorithmTable, UnknownNameError
from skyrl_fn.trainer.checkpoint import CheckpointError, CheckpointWarning
from skyrl_fn.trainer.config import (
    HYPER_FIELDS,
    AlgorithmConfig,
    EvalConfig,
    ResolvedRun,
    TrainConfig,
    TrainerConfig,
    config_to_dict,
    resolve,
)
from skyrl_fn.models.model import ModelConfig, checkpoint_dir
from skyrl_fn.rollout.base import RolloutConfig
from skyrl_fn.tasks.base import DataConfig, DataError, RewardError
from skyrl_fn.trainer.loop import train
from skyrl_fn.trainer.nonfinite import NonFiniteStepError, SkippedStepWarning
from skyrl_fn.rollout.choice import check_backend_available

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
#: Set to 1 to see tracebacks of user errors (as ``--debug``).
DEBUG_ENV = "SKYRL_FN_DEBUG"


def _recipe(description: str, **algorithm: Any) -> tuple[str, TrainConfig]:
    return description, TrainConfig(algorithm=AlgorithmConfig(**algorithm))


#: Preset name -> (description, base config). Flags override the preset's values.
PRESETS: Mapping[str, tuple[str, TrainConfig]] = {
    "grpo": _recipe("GRPO (Shao et al. 2024): group-normalised advantages, PPO clip, token mean (the default)."),
    "dr_grpo": _recipe(
        "Dr. GRPO (Liu et al. 2025): no std normalisation, constant-length loss normalisation.",
        advantage_estimator="grpo", estimator={"norm_by_std": False}, loss_reduction="seq_mean_token_sum_norm",
    ),
    "ppo_gae": _recipe(
        "PPO with a critic and GAE (Schulman et al. 2016/2017), lambda 0.95, two update epochs.",
        advantage_estimator="gae", estimator={"lambd": 0.95}, update_epochs=2,
    ),
    "rloo": _recipe("RLOO (Ahmadian et al. 2024): leave-one-out baseline.", advantage_estimator="rloo"),
    # Settings measured on a 2-core CPU: docs/real-model.md.
    "smollm2": (
        "GRPO on SmolLM2-135M-Instruct (the packaged GGUF) learning the arithmetic task's '#### N' answers, "
        "sized for a 2-core CPU, held-out greedy accuracy every 4 steps (needs `make setup-real`).",
        TrainConfig(
            model=ModelConfig(name_or_path="smollm2-135m-instruct"),
            data=DataConfig(task="arithmetic", min_value=1, max_value=9, format_credit=0.1),
            rollout=RolloutConfig(samples_per_prompt=8, max_new_tokens=20),
            trainer=TrainerConfig(
                steps=40, prompts_per_step=4, micro_batch_size=8, lr=2e-5, warmup_steps=2, torch_threads=2, ckpt_interval=0,
            ),
            eval=EvalConfig(every=4, size=48),
        ),
    ),
}
DEFAULT_PRESET = "grpo"


class UsageError(ValueError):
    """A user error found before training (bad name, plugin, flag value): exit code 2."""


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
    """``table`` (default ``DEFAULT_TABLE``) + entry points + plugins + compat registrations."""
    table = DEFAULT_TABLE if table is None else table
    if not isinstance(table, AlgorithmTable):
        raise TypeError(f"table: expected an AlgorithmTable, got {type(table).__name__}")
    table = load_entry_points(table)
    table = load_plugins(plugins, table, app_dir=app_dir)
    return freeze_compat(table)


# -- 2. the flags ------------------------------------------------------------------------------

_FIELD_HELP = {
    "advantage_estimator": "Advantage estimator",
    "policy_loss": "Policy loss",
    "loss_reduction": "Aggregation of the per-token loss",
    "kl_estimator": "KL estimator (KL loss and KL-in-reward)",
}


def _names_help(table: AlgorithmTable, field: str) -> str:
    names = table.names(NAME_FIELDS[field])
    listed = ", ".join(names) if names else "(none registered yet)"
    return f"{_FIELD_HELP[field]}. Registered: {listed}. Or module:function / path/to/file.py:function."


def _cli_types(table: AlgorithmTable, names: Mapping[str, str], base: AlgorithmConfig) -> tuple[type, type]:
    """Subclasses of AlgorithmConfig/TrainConfig for this command line: the name fields' help
    lists ``table``'s names, and each hyperparameter mapping is a group of typed flags of the
    function ``names`` chooses (``skyrl_fn.cli.hyper_flags``).

    Built at start-up because names and signatures depend on the plugins loaded; parsing converts
    back to the plain classes, so nothing dynamic ever leaves this module.
    """
    fields = [
        (f.name, Annotated[str, tyro.conf.arg(help=_names_help(table, f.name))], dataclasses.field(default=names[f.name]))
        for f in dataclasses.fields(AlgorithmConfig) if f.name in NAME_FIELDS
    ]
    for field, (group, _) in HYPER_FIELDS.items():
        # The base config's values belong to the function it names; another name starts clean.
        given = getattr(base, group) if names[field] == getattr(base, field) else {}
        typ, default = group_type(table, field, names[field], given)
        what = f"{HYPER_FIELDS[field][1].replace('_', ' ')} {names[field]!r}"
        doc = f"Hyperparameters of the {what} (set only those to change; the rest keep the function's own defaults)."
        if not dataclasses.is_dataclass(typ):
            doc = f"Hyperparameters of the {what} as KEY VALUE pairs (it takes **kwargs, so they are not typed)."
        fields.append((group, Annotated[typ, tyro.conf.arg(help=doc)], dataclasses.field(default_factory=lambda d=default: d)))
    alg = dataclasses.make_dataclass("AlgorithmConfig", fields, bases=(AlgorithmConfig,), frozen=True)
    alg.__doc__ = AlgorithmConfig.__doc__
    train = dataclasses.make_dataclass(
        "TrainConfig", [("algorithm", alg, dataclasses.field(default_factory=alg))], bases=(TrainConfig,), frozen=True
    )
    train.__doc__ = TrainConfig.__doc__
    return alg, train


def _description(table: AlgorithmTable) -> str:
    presets = "\n".join(f"  {name:<8} {desc}" for name, (desc, _) in PRESETS.items())
    kinds = "\n".join(f"  {kind}: {', '.join(table.names(kind)) or '-'}" for kind in sorted(set(NAME_FIELDS.values())))
    return (
        "Train a policy with any registered algorithm (skyrl_fn):\n"
        "  train.py [PRESET] [--group.field VALUE ...] [--plugin FILE_OR_MODULE ...]\n\n"
        f"Presets (base configs; flags override them; default {DEFAULT_PRESET}):\n{presets}\n\n"
        f"Registered names:\n{kinds}\n\n"
        "--plugin path/to/file.py or a module name (repeatable) is imported before names are resolved;\n"
        "it registers through skyrl_fn.compat or defines register(table) -> table. Module names (in\n"
        "--plugin and module:function) are searched in the working directory first (--app-dir DIR\n"
        "changes that place). Plugins travel to every Ray worker by value.\n\n"
        f"--debug (or {DEBUG_ENV}=1) shows the traceback of a user error instead of its one line."
    )


def parse_config(
    argv: Sequence[str], table: AlgorithmTable, *, prog: str | None = None, app_dir: str | None = None
) -> TrainConfig:
    """The ``TrainConfig`` of ``argv``: an optional leading preset name, then tyro flags.

    The functions named in ``argv`` (or the preset) decide which hyperparameter flags exist:
    ``--algorithm.policy-loss sapo --algorithm.loss.tau-pos 2`` is typed and checked by tyro.
    ``app_dir``: where ``module:function`` names are searched first (as :func:`resolve_names`).

    Raises:
        UsageError: a hyperparameter flag the chosen function does not take (named). A
            ``module:function`` name that cannot be loaded gets untyped flags here; resolving
            it (:func:`resolve_names`) reports why.
    """
    argv = list(argv)
    preset = DEFAULT_PRESET
    if argv and argv[0] in PRESETS:
        preset = argv.pop(0)
    base = PRESETS[preset][1]
    names = chosen_names(argv, {f: getattr(base.algorithm, f) for f in NAME_FIELDS})
    try:  # module:function names are registered here only to read their signatures
        preview = register_import_names({NAME_FIELDS[f]: n for f, n in names.items()}, table, app_dir=app_dir)
    except (PluginError, ValueError, TypeError):
        preview = table  # untyped groups; resolve_names reports the name's problem
    try:
        check_group_flags(argv, preview, names)
    except ValueError as err:
        raise UsageError(str(err)) from err
    alg_cls, train_cls = _cli_types(preview, names, base.algorithm)
    hyper_groups = {group for group, _ in HYPER_FIELDS.values()}
    default = train_cls(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "algorithm"},
        algorithm=alg_cls(**{
            f.name: getattr(base.algorithm, f.name) for f in dataclasses.fields(AlgorithmConfig)
            if f.name not in hyper_groups and f.name not in NAME_FIELDS
        }),
    )
    parsed = tyro.cli(train_cls, default=default, args=argv, prog=prog, description=_description(table))
    values = {f.name: getattr(parsed.algorithm, f.name) for f in dataclasses.fields(AlgorithmConfig)}
    for field, (group, _) in HYPER_FIELDS.items():
        values[group] = to_mapping(values[group], preview, field, values[field])
    return TrainConfig(
        **{f.name: getattr(parsed, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "algorithm"},
        algorithm=AlgorithmConfig(**values),
    )


# -- 3. names ----------------------------------------------------------------------------------


def resolve_names(config: TrainConfig, table: AlgorithmTable, *, app_dir: str | None = None) -> ResolvedRun:
    """Register ``module:function`` names of ``config`` (modules searched in ``app_dir``, default
    the working directory, first), then ``resolve`` once.

    Raises:
        UsageError: any unknown name, plugin problem or bad hyperparameter, with the message of
            the underlying error (which lists the options and the closest name).
    """
    names = {kind: getattr(config.algorithm, field) for field, kind in NAME_FIELDS.items()}
    try:
        table = register_import_names(names, table, app_dir=app_dir)
        return resolve(config, table)
    except (UnknownNameError, PluginError, ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


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
        check_backend_available(run.config.rollout)
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
        observer.finish({
            "backend": "ray" if cfg.ray.use_ray else "in-process", "last_checkpoint": summary.last_checkpoint,
            "resumed_from": summary.resumed_from,
        })
    return summary


def console_main() -> None:
    """The ``skyrl-fn-train`` console script: :func:`main` with exit status 0 on success."""
    main()
