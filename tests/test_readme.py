"""The README's quick start runs as written."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_block_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Quick start") : text.index("## Records")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    out = namespace["out"]
    assert torch.equal(out.advantages[0], torch.zeros(2))
    assert "tensor" in capsys.readouterr().out
