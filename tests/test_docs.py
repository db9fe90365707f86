"""Every ```python block of the Markdown docs runs.

The pages are README.md, CONTRIBUTING.md, docs/*.md and the READMEs under examples/ and
benchmarks/. The blocks of one page run in order in one namespace (a later block may use what
an earlier one defined, as a reader would run them). A block whose first line is a
`# skip-test: <reason>` comment is shown but not run: kept for the few that need a device mesh
or minutes of training, each covered by the test the reason names.
"""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted(
    {
        *REPO.glob("*.md"),
        *(REPO / "docs").glob("*.md"),
        *(REPO / "examples").glob("*/README.md"),
        *(REPO / "benchmarks").glob("README.md"),
    }
    - {REPO / "CHANGELOG.md"}
)
SKIP = "# skip-test:"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, source) of each ```python block of a Markdown page, in order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_the_pages_have_blocks_to_run():
    runnable = {p.name for p in PAGES for _, src in python_blocks(p) if not src.startswith(SKIP)}
    assert {"README.md", "index.md", "building_blocks.md", "projection.md"} <= runnable
    skipped = [(p, n) for p in PAGES for n, src in python_blocks(p) if src.startswith(SKIP)]
    assert len(skipped) <= 5, f"keep the skipped blocks few: {skipped}"
    for page, line in skipped:
        first = page.read_text().splitlines()[line - 1]
        assert len(first) > len(SKIP) + 3, f"{page}:{line}: a skip-test marker names its reason"


@pytest.mark.parametrize(
    "page",  # the fast tier runs the front page's blocks; the other pages' are slow
    [pytest.param(p, marks=() if p == REPO / "README.md" else pytest.mark.slow) for p in PAGES],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_page_code_blocks_run(page, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {"__name__": f"docs:{page.name}"}
    for line, source in python_blocks(page):
        if source.startswith(SKIP):
            continue
        # Padded so that a traceback's line number is the page's.
        code = compile("\n" * (line - 1) + source, str(page.relative_to(REPO)), "exec")
        exec(code, namespace)
