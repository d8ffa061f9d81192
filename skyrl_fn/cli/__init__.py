"""The training launcher's command line: a tyro CLI over ``TrainConfig``, plugins, pre-flight checks,
observability (the Ray side is ``skyrl_fn.distributed``).

``main(argv=None, table=None)`` is what ``launch/train.py`` calls; see ``skyrl_fn.cli.app``.
"""

from skyrl_fn.cli.app import EXIT_USAGE, build_table, main
from skyrl_fn.cli.flags import PRESETS, UsageError, parse_config, resolve_names
from skyrl_fn.cli.observe import RunObserver
from skyrl_fn.cli.plugins import ENTRY_POINT_GROUP, PluginError

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
