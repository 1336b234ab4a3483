"""Docs that stay true: the README's Python examples run, every docs page's Python parses, links resolve.

Convention: every ```python block of README.md runs here, in a fresh namespace and a temporary working
directory, so it must be self-contained and quick (small modules, small inputs). A block that cannot run in
CI (it needs a GPU, a dataset, a file) is preceded by the line ``<!-- docs-test: skip (REASON) -->``; the
reason is required. Python blocks in docs/*.md are fragments that build on earlier ones, so they are only
compiled. Links: every relative link in README.md, docs/*.md and benchmarks/*.md names a file that exists,
and a ``#anchor`` names a heading of that file (GitHub's heading slugs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, *sorted((ROOT / "benchmarks").glob("*.md"))]  # pages whose relative links must resolve
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->\s*\n$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```python block of ``page``."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        skip = SKIP.search(text[:m.start()][-300:])
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(2), skip.group(1).strip(" ()") if skip else None))
    return blocks


def prose(page: Path) -> str:
    """The page without its fenced code blocks (links and headings inside code do not count)."""
    return FENCE.sub("", page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(prose(page))}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


README_BLOCKS = python_blocks(README)


def test_readme_has_a_runnable_example() -> None:
    assert any(reason is None for _, _, reason in README_BLOCKS), "README.md needs a ```python example that runs"


@pytest.mark.parametrize(("line", "code", "reason"), README_BLOCKS, ids=[f"README.md:{b[0]}" for b in README_BLOCKS])
def test_readme_python_block_runs(line: int, code: str, reason: str | None, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if reason is not None:
        assert reason, f"README.md:{line}: a docs-test skip marker must say why the block cannot run"
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_docs_python_blocks_parse(page: Path) -> None:
    for line, code, _ in python_blocks(page):
        compile(code, f"{page.name}:{line}", "exec")  # a SyntaxError names the page and line


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading '#{anchor}' in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/ (at most {README_MAX_LINES})"


def test_slug_follows_github() -> None:
    assert slug("Which target should I pick") == "which-target-should-i-pick"
    assert slug("Layout: to-nhwc") == "layout-to-nhwc"
    assert slug("debug.compare: which layer loses accuracy") == "debugcompare-which-layer-loses-accuracy"
    assert slug("The `fxforge` command") == "the-fxforge-command"
