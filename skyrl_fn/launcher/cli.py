"""The command line: ``python launch/train.py [PRESET] [--group.field VALUE ...] [--plugin P ...] [--app-dir DIR]``.

Read top to bottom, :func:`main` does:

1. build the table: ``DEFAULT_TABLE`` (or the ``table`` argument), then the ``skyrl_fn.algorithms``
   entry points, then each ``--plugin``, then the SkyRL-compat façade's registrations (so a
   script that registers and then calls ``main()`` works);
2. parse the flags with tyro over ``TrainConfig``, starting from the preset (a base config); the
   ``--help`` of every name field lists what the table holds, and each chosen function's
   hyperparameters are typed flags (``--algorithm.estimator.lambd``, ``--algorithm.loss.tau-pos``;
   ``skyrl_fn.launcher.hyper_flags``);
3. register ``module:function`` / ``path/file.py:function`` names, then ``resolve`` once: a typo
   exits with code 2 and a suggestion before any model is built;
4. train on Ray (default) or in-process (``--ray.no-use-ray``) and report.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Annotated, Any, Mapping, NoReturn, Sequence

import attrs
import tyro

from skyrl_fn.launcher.plugins import (
    NAME_FIELDS,
    PluginError,
    check_shippable,
    freeze_compat,
    load_entry_points,
    load_plugins,
    register_import_names,
)
from skyrl_fn.launcher.hyper_flags import check_group_flags, chosen_names, group_type, to_mapping
from skyrl_fn.table import DEFAULT_TABLE, AlgorithmTable, UnknownNameError
from skyrl_fn.train.config import HYPER_FIELDS, AlgorithmConfig, ResolvedRun, TrainConfig, resolve

__all__ = [
    "PRESETS",
    "EXIT_USAGE",
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
    """

    plugins: tuple[str, ...]
    app_dir: str | None
    rest: tuple[str, ...]


def split_launcher_args(argv: Sequence[str]) -> LauncherArgs:
    """``--plugin X`` (repeatable) and ``--app-dir DIR`` (also as ``--flag=value``) out of ``argv``."""
    plugins, app_dir, rest, it = [], None, [], iter(argv)
    for arg in it:
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
    return LauncherArgs(plugins=tuple(plugins), app_dir=app_dir, rest=tuple(rest))


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
    function ``names`` chooses (``skyrl_fn.launcher.hyper_flags``).

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
        "changes that place). Plugins travel to every Ray worker by value."
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


def _fail(err: BaseException) -> NoReturn:
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None, table: AlgorithmTable | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), resolve names once, train, report.

    Args:
        argv: command-line arguments without the program name.
        table: the base table (default ``DEFAULT_TABLE``); façade registrations, entry points and
            plugins are added to it.

    Returns:
        the training ``Summary`` (see :func:`launch`).

    Exits:
        2 on a usage error (unknown name with a suggestion, bad plugin, bad value), before any
        model is built; 1 when a Ray worker dies (the message names it).
    """
    try:
        args = split_launcher_args(sys.argv[1:] if argv is None else argv)
        table = build_table(table, args.plugins, app_dir=args.app_dir)
    except (UsageError, PluginError, ImportError, ValueError, TypeError) as err:
        _fail(err)
    try:
        config = parse_config(args.rest, table, app_dir=args.app_dir)
        run = resolve_names(config, table, app_dir=args.app_dir)
        from skyrl_fn.train.rollout import check_backend_available

        check_backend_available(run.config.rollout)
    except (UsageError, RuntimeError) as err:
        _fail(err)
    from skyrl_fn.launcher.ray_runner import WorkerDiedError

    try:
        return launch(run)
    except PluginError as err:
        _fail(err)
    except WorkerDiedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _start_step(run: ResolvedRun) -> int:
    """The step a resumed run continues after (0 for a fresh run)."""
    if not run.config.trainer.resume:
        return 0
    from skyrl_fn.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run.config.ckpt_dir)
    return 0 if path is None else int(os.path.basename(path).split("_")[-1])


def launch(run: ResolvedRun, *, out=None):
    """Train ``run`` on Ray (``ray.use_ray``, the default) or in-process, with the progress bar,
    metrics files, the reward/KL plot and a one-line summary. Returns the ``Summary``."""
    from skyrl_fn.launcher.observe import RunObserver
    from skyrl_fn.train.config import config_to_dict

    cfg = run.config
    if cfg.ray.use_ray:
        entries = {f"{e.kind} {e.name!r}": e.fn for e in run.table.entries()}
        check_shippable(run, what="the resolved run (config + algorithm table)", parts=entries)
    log = cfg.logging
    with RunObserver(
        log.run_dir, total_steps=cfg.trainer.steps, start_step=_start_step(run), jsonl=log.jsonl,
        tensorboard=log.tensorboard, plot=log.plot, progress=log.progress, wandb_project=log.wandb_project,
        config=config_to_dict(cfg), out=out,
    ) as observer:
        if cfg.ray.use_ray:
            from skyrl_fn.launcher.ray_runner import train_on_ray

            summary = train_on_ray(run, on_step=observer.on_step)
        else:
            from skyrl_fn.train.loop import train

            summary = train(run, on_step=observer.on_step)
        observer.finish({
            "backend": "ray" if cfg.ray.use_ray else "in-process", "last_checkpoint": summary.last_checkpoint,
            "resumed_from": summary.resumed_from,
        })
    return summary


def console_main() -> None:
    """The ``skyrl-fn-train`` console script: :func:`main` with exit status 0 on success."""
    main()
