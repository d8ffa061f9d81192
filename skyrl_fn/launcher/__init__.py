"""The training launcher: a tyro CLI over ``TrainConfig``, plugins, Ray actors, observability.

``main(argv=None, table=None)`` is what ``launch/train.py`` calls; see ``skyrl_fn.launcher.cli``.
"""

from skyrl_fn.launcher.cli import EXIT_USAGE, PRESETS, UsageError, build_table, main, parse_config, resolve_names
from skyrl_fn.launcher.observe import RunObserver
from skyrl_fn.launcher.plugins import ENTRY_POINT_GROUP, PluginError

__all__ = [
    "main",
    "PRESETS",
    "EXIT_USAGE",
    "UsageError",
    "build_table",
    "parse_config",
    "resolve_names",
    "RunObserver",
    "ENTRY_POINT_GROUP",
    "PluginError",
]
