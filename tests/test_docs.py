"""The README and the docs/ pages say what the code does: every Python block runs.

Each page's ```python blocks run in order in one namespace (a later block may use an earlier
block's names), in a scratch working directory, with the SkyRL-compat registries reset before and
after. A block that cannot run here (it needs a GPU, a cluster or a long run) is preceded by the
line ``<!-- docs-test: skip REASON -->``: invisible on the rendered page and on GitHub, and it must
give a reason. Bash blocks are not run, but every ``make`` target they name must exist.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from hypothesis import Phase, settings

from skyrl_fn.compat import AdvantageEstimatorRegistry, PolicyLossRegistry

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

# A fenced block at the start of a line: its info string and its body.
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(?P<reason>[^>]*)-->\s*\Z")
MAX_SKIPPED = 5  # skipped blocks over all pages: keep them rare


def blocks(page: pathlib.Path) -> list[tuple[str, str, int, str | None]]:
    """``(language, code, line, skip reason or None)`` for every fenced block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang = m.group("info").strip().split(" ")[0]
        skip = SKIP.search(text[: m.start()])
        reason = skip.group("reason").strip() if skip else None
        out.append((lang, m.group("body"), text.count("\n", 0, m.start()) + 2, reason))
    return out


def python_pages() -> list[pathlib.Path]:
    return [p for p in PAGES if any(lang == "python" for lang, *_ in blocks(p))]


def run_page(page: pathlib.Path) -> dict:
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for lang, code, line, reason in blocks(page):
        if lang != "python" or reason is not None:
            continue
        # Pad with newlines so a traceback's line numbers are the page's own.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
    return namespace


# The kit calls on the pages (check_estimator, check_policy_loss, ...) search with the loaded
# hypothesis profile. Here they run 10 fixed examples per property: this test checks that each block
# runs and that its asserts hold; the kit's search itself is tested in tests/testing/ under the
# loaded profile (make test: 30 examples, make test-all: 150). No shrinking: no block asserts on a
# counterexample's size, and shrinking the pages' deliberate failures was most of this test's CPU.
settings.register_profile(
    "docs", max_examples=10, derandomize=True, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate]
)


@pytest.fixture
def clean_registries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    profile = settings.get_current_profile_name()
    settings.load_profile("docs")
    yield
    settings.load_profile(profile)
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, clean_registries):
    run_page(page)


def test_readme_quick_start(clean_registries, capsys):
    namespace = run_page(README)
    out = namespace["out"]
    assert torch.equal(out.advantages[0], torch.zeros(2))  # score 1 minus the batch mean 1, scaled
    assert "tensor" in capsys.readouterr().out


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 150, f"README.md: expected at most 150 lines, got {lines}; move the rest to docs/"


def test_every_page_runs_something_or_says_why_not():
    found = {p: [b for b in blocks(p) if b[0] == "python"] for p in PAGES}
    assert sum(len(b) for b in found.values()) >= 10
    skipped = [(p, line, reason) for p, bs in found.items() for _, _, line, reason in bs if reason is not None]
    for page, line, reason in skipped:
        assert reason, f"{page}:{line}: a skipped block must give a reason"
    assert len(skipped) <= MAX_SKIPPED, f"expected at most {MAX_SKIPPED} skipped blocks, got {skipped}"


def test_skip_markers_precede_python_blocks():
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"<!--\s*docs-test:", text):
            after = text[m.end():].split("-->", 1)[1].lstrip()
            assert after.startswith("```python"), f"{page}: a docs-test marker must directly precede a ```python block"


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_make_commands_are_real_targets():
    targets = make_targets()
    assert {"setup", "train", "test"} <= targets
    for page in PAGES:
        for lang, code, line, _ in blocks(page):
            if lang not in ("bash", "sh", "console"):
                continue
            for target in re.findall(r"(?:^|[;&|]\s*)make\s+([A-Za-z][\w-]*)", code, re.M):
                assert target in targets, f"{page}:{line}: `make {target}` is not a Makefile target"
        for target in re.findall(r"`make ([A-Za-z][\w-]*)", page.read_text()):
            assert target in targets, f"{page}: `make {target}` is not a Makefile target"


def test_every_docs_page_is_in_the_nav():
    text = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", text, re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert listed - pages == set(), f"nav entries without a page: {sorted(listed - pages)}"


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
