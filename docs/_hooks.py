"""mkdocs hooks (mkdocs.yml ``hooks:``), run at build time.

The CLI page's flag reference is the launcher's own ``--help``: the marker ``<!-- cli-help -->``
is replaced by the output of ``python launch/train.py --help``, so the page cannot drift from the
code, and a launcher whose ``--help`` fails fails the (strict) docs build.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-help -->"


@functools.cache
def launcher_help(root: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "RAY_AUTH_MODE": "disabled", "NO_COLOR": "1"}
    cmd = [sys.executable, "launch/train.py", "--help"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise PluginError(f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout.rstrip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    root = str(pathlib.Path(config.config_file_path).resolve().parent)
    return markdown.replace(MARKER, "```text\n" + launcher_help(root) + "\n```")
