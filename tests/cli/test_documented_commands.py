"""The command lines the docs show (``python launch/train.py ...`` in bash blocks, which
tests/test_docs.py does not run) parse and resolve, and train a few tiny steps on Ray."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from trainer.teachers import save_teacher

from skyrl_fn.cli import build_table, main, parse_config, resolve_names

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "docs" / "batch-transforms.md", ROOT / "docs" / "distillation.md", ROOT / "docs" / "algorithms.md"]
TEACHER = "path/to/teacher"  # stands for a saved model in the docs; a saved tiny teacher here
FENCE = re.compile(r"^```bash\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)

# Appended to each documented command: a tiny model and budget (later flags win).
TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--data.min-digits", "1",
    "--data.max-digits", "2", "--logging.no-progress", "--logging.no-tensorboard", "--logging.no-plot",
    "--trainer.steps", "2", "--trainer.ckpt-interval", "0", "--trainer.max-consecutive-skips", "2",
]


def commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            for cmd in m.group("body").replace("\\\n", " ").splitlines():
                words = shlex.split(cmd)
                if words[:2] == ["python", "launch/train.py"]:
                    out.append((f"{page.name}:{len(out)}", words[2:]))
    return out


COMMANDS = commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 5


def _argv(argv, tmp_path) -> list[str]:
    teacher = save_teacher(tmp_path / "teacher") if TEACHER in argv else None
    return [teacher if a == TEACHER else a for a in argv] + [*TINY, "--logging.run-dir", str(tmp_path / "run")]


@pytest.mark.parametrize("argv", [a for _, a in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_documented_command_parses_and_resolves(argv, tmp_path):
    table = build_table()
    run = resolve_names(parse_config(_argv(argv, tmp_path), table), table)
    if "--algorithm.batch-transforms" in argv:
        chosen = argv[argv.index("--algorithm.batch-transforms") + 1:]
        assert list(run.batch_transforms.names) == chosen[: len(run.batch_transforms.names)]
    assert run.uses_teacher == ("--teacher.model" in argv)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("argv", [a for _, a in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_documented_command_trains_on_ray(ray_session, argv, tmp_path):
    summary = main(_argv(argv, tmp_path))
    assert summary.steps == 2
    if "--algorithm.batch-transforms" in argv:
        assert all("batch_sampled_batches" in h for h in summary.history)
    if "--teacher.model" in argv:
        assert all("teacher_kl" in h for h in summary.history)
