"""The launcher's flags: presets, then ``argv`` parsed with tyro over ``TrainConfig`` into a
config, whose names are resolved once (:func:`parse_config`, :func:`resolve_names`).

The functions named on the command line (or by the preset) decide which hyperparameter flags
exist: each chosen function's hyperparameters are typed flags (``--algorithm.estimator.lambd``,
``--algorithm.loss.tau-pos``; ``skyrl_fn.cli.hyper_flags``), and ``--help`` of every name field
lists what the table holds. A user mistake is a :class:`UsageError` naming the flag.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Mapping, Sequence

import tyro

from skyrl_fn.cli.hyper_flags import (
    CORRECTION_FIELD,
    CORRECTION_GROUP,
    CORRECTION_KIND,
    SECTIONS,
    check_correction_flags,
    check_group_flags,
    chosen_corrections,
    chosen_names,
    correction_group_type,
    correction_mapping,
    group_type,
    to_mapping,
)
from skyrl_fn.cli.plugins import NAME_FIELDS, PluginError, register_import_names
from skyrl_fn.cli.transform_flags import check_transform_flags, chosen_transforms, transforms_mapping, transforms_type
from skyrl_fn.core.table import AlgorithmTable, UnknownNameError
from skyrl_fn.models.model import ModelConfig
from skyrl_fn.rollout.base import RolloutConfig
from skyrl_fn.tasks.base import DataConfig
from skyrl_fn.trainer.config import DATA_HYPER_FIELDS, HYPER_FIELDS, AlgorithmConfig, EvalConfig, TrainConfig, TrainerConfig
from skyrl_fn.trainer.run import ResolvedRun, resolve
from skyrl_fn.trainer.run_table import RUN_KINDS

__all__ = ["PRESETS", "DEFAULT_PRESET", "DEBUG_ENV", "UsageError", "parse_config", "resolve_names"]

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


def _group_fields(table: AlgorithmTable, section: str, names: Mapping[str, str], base: Any) -> list[tuple]:
    """One typed field per hyperparameter group of ``section``, for the function ``names`` chooses."""
    fields = []
    for field, (group, kind) in SECTIONS[section].items():
        # The base config's values belong to the function it names; another name starts clean.
        given = getattr(base, group) if names[field] == getattr(base, field) else {}
        typ, default = group_type(table, field, names[field], given, section)
        what = f"{kind.replace('_', ' ')} {names[field]!r}"
        doc = f"Hyperparameters of the {what} (set only those to change; the rest keep the function's own defaults)."
        if not dataclasses.is_dataclass(typ):
            doc = f"Hyperparameters of the {what} as KEY VALUE pairs (untyped: it takes **kwargs or is not chosen)."
        fields.append((group, Annotated[typ, tyro.conf.arg(help=doc)], dataclasses.field(default_factory=lambda d=default: d)))
    return fields


def _cli_types(
    table: AlgorithmTable, names: Mapping[str, str], data_names: Mapping[str, str], base: TrainConfig,
    corrections: tuple[str, ...] = (), transforms: Sequence[str] = (),
) -> tuple[type, type, type]:
    """Subclasses of AlgorithmConfig/DataConfig/TrainConfig for this command line: the algorithm
    name fields' help lists ``table``'s names, and each hyperparameter mapping (the algorithm's
    pieces, the task's and the reward's arguments) is a group of typed flags of the function the
    names choose (``skyrl_fn.cli.hyper_flags``).

    Built at start-up because names and signatures depend on the plugins loaded; parsing converts
    back to the plain classes, so nothing dynamic ever leaves this module.
    """
    fields = [
        (f.name, Annotated[str, tyro.conf.arg(help=_names_help(table, f.name))], dataclasses.field(default=names[f.name]))
        for f in dataclasses.fields(AlgorithmConfig) if f.name in NAME_FIELDS
    ]
    fields += _group_fields(table, "algorithm", names, base.algorithm)
    registered = ", ".join(table.names(CORRECTION_KIND)) or "(none registered yet)"
    fields.append((CORRECTION_FIELD, Annotated[tuple[str, ...], tyro.conf.arg(help=(
        f"Off-policy corrections, composed in the order given (skyrl_fn.losses.compose_corrections). "
        f"Registered: {registered}."))], dataclasses.field(default=corrections)))
    given = base.algorithm.correction if corrections == tuple(base.algorithm.off_policy_correction) else {}
    typ, default = correction_group_type(table, corrections, given)
    fields.append((CORRECTION_GROUP, Annotated[typ, tyro.conf.arg(help="Hyperparameters of each chosen off-policy correction.")],
                   dataclasses.field(default_factory=lambda d=default: d)))
    listed = ", ".join(table.names("batch_transform")) or "(none registered yet)"
    fields.append((
        "batch_transforms", Annotated[tuple[str, ...], tyro.conf.arg(help=f"Batch transforms applied in order to each step's sampled batch. Registered: {listed}.")],
        dataclasses.field(default=tuple(transforms)),
    ))
    given = {n: base.algorithm.transform.get(n, {}) for n in transforms}
    typ, default = transforms_type(table, transforms, given)
    fields.append(("transform", Annotated[typ, tyro.conf.arg(help="Hyperparameters of the chosen batch transforms.")], dataclasses.field(default_factory=lambda d=default: d)))
    alg = dataclasses.make_dataclass("AlgorithmConfig", fields, bases=(AlgorithmConfig,), frozen=True)
    alg.__doc__ = AlgorithmConfig.__doc__
    data = dataclasses.make_dataclass(
        "DataConfig", _group_fields(table, "data", data_names, base.data), bases=(DataConfig,), frozen=True
    )
    data.__doc__ = DataConfig.__doc__
    train = dataclasses.make_dataclass(
        "TrainConfig",
        [("algorithm", alg, dataclasses.field(default_factory=alg)), ("data", data, dataclasses.field(default_factory=data))],
        bases=(TrainConfig,), frozen=True,
    )
    train.__doc__ = TrainConfig.__doc__
    # tyro reads an inherited field's help from its class's source (inspect.getsource): named as
    # their base classes, these find the base's source at once; as classes of module ``types``
    # the search took ~0.1 s per parse (half of parse_config). The help text is the same; the
    # classes never leave this module (parsing converts back to the plain ones), so nothing
    # resolves them by name.
    for cls, like in ((alg, AlgorithmConfig), (data, DataConfig), (train, TrainConfig)):
        cls.__module__, cls.__qualname__ = like.__module__, like.__qualname__
    return alg, data, train


def _description(table: AlgorithmTable) -> str:
    presets = "\n".join(f"  {name:<8} {desc}" for name, (desc, _) in PRESETS.items())
    kinds = "\n".join(
        f"  {kind}: {', '.join(table.names(kind)) or '-'}"
        for kind in sorted(set(NAME_FIELDS.values()) | {CORRECTION_KIND, "batch_transform"}) + list(RUN_KINDS)
    )
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
    data_names = chosen_names(argv, {f: getattr(base.data, f) for f in DATA_HYPER_FIELDS}, "data")
    try:  # module:function names are registered here only to read their signatures
        preview = register_import_names(_kind_names(names, data_names), table, app_dir=app_dir)
    except (PluginError, ValueError, TypeError):
        preview = table  # untyped groups; resolve_names reports the name's problem
    corrections = chosen_corrections(argv, base.algorithm.off_policy_correction)
    transforms = chosen_transforms(argv, base.algorithm.batch_transforms)
    try:
        check_group_flags(argv, preview, names)
        check_group_flags(argv, preview, data_names, "data")
        check_correction_flags(argv, preview, corrections)
        check_transform_flags(argv, preview, transforms)
    except ValueError as err:
        raise UsageError(str(err)) from err
    alg_cls, data_cls, train_cls = _cli_types(preview, names, data_names, base, corrections, transforms)
    hyper_groups = {group for group, _ in HYPER_FIELDS.values()} | {CORRECTION_FIELD, CORRECTION_GROUP, "transform", "batch_transforms"}
    data_groups = {group for group, _ in DATA_HYPER_FIELDS.values()}
    default = train_cls(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("algorithm", "data")},
        algorithm=alg_cls(**{
            f.name: getattr(base.algorithm, f.name) for f in dataclasses.fields(AlgorithmConfig)
            if f.name not in hyper_groups and f.name not in NAME_FIELDS
        }),
        data=data_cls(**{f.name: getattr(base.data, f.name) for f in dataclasses.fields(DataConfig) if f.name not in data_groups}),
    )
    parsed = tyro.cli(train_cls, default=default, args=argv, prog=prog, description=_description(table))
    values = {f.name: getattr(parsed.algorithm, f.name) for f in dataclasses.fields(AlgorithmConfig)}
    for field, (group, _) in HYPER_FIELDS.items():
        values[group] = to_mapping(values[group], preview, field, values[field])
    values[CORRECTION_GROUP] = correction_mapping(values[CORRECTION_GROUP], preview, values[CORRECTION_FIELD])
    data = {f.name: getattr(parsed.data, f.name) for f in dataclasses.fields(DataConfig)}
    for field, (group, _) in DATA_HYPER_FIELDS.items():
        data[group] = to_mapping(data[group], preview, field, data[field], "data")
    values["transform"] = transforms_mapping(values["transform"], preview)
    return TrainConfig(
        **{f.name: getattr(parsed, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("algorithm", "data")},
        algorithm=AlgorithmConfig(**values),
        data=DataConfig(**data),
    )


def _kind_names(names: Mapping[str, str], data_names: Mapping[str, str]) -> dict[str, str]:
    """Table kind -> chosen name, for registering ``module:function`` names (an unset reward skipped)."""
    out = {NAME_FIELDS[f]: n for f, n in names.items()}
    out.update({kind: data_names[f] for f, (_, kind) in DATA_HYPER_FIELDS.items() if data_names[f]})
    return out


# -- 3. names ----------------------------------------------------------------------------------


def resolve_names(config: TrainConfig, table: AlgorithmTable, *, app_dir: str | None = None) -> ResolvedRun:
    """Register ``module:function`` names of ``config`` (modules searched in ``app_dir``, default
    the working directory, first), then ``resolve`` once.

    Raises:
        UsageError: any unknown name, plugin problem or bad hyperparameter, with the message of
            the underlying error (which lists the options and the closest name).
    """
    names = _kind_names(
        {f: getattr(config.algorithm, f) for f in NAME_FIELDS}, {f: getattr(config.data, f) for f in DATA_HYPER_FIELDS}
    )
    try:
        table = register_import_names(names, table, app_dir=app_dir)
        return resolve(config, table)
    except (UnknownNameError, PluginError, ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
