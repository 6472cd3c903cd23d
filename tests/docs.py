"""The shell blocks of README.md and docs/*.md, for the tests that run them as written.

Every ```bash block carries a marker on the line just above its fence:

    <!-- run: NAME -->              a test runs this block as written; it takes the text with
                                    doc_block(page, NAME) (NAME unique on its page)
    <!-- not run: needs a GPU -->   (or: needs several nodes, needs the network) no CPU test can run it

tests/test_docs.py checks that every block is marked and that each NAME is taken by some test."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- (run: (?P<name>[\w.-]+)|not run: needs (?P<why>a GPU|several nodes|the network)) -->$")
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md page."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_blocks(page: Path) -> list[tuple[str | None, str, int]]:
    """[(the marker line above the block, or None; the block's text; its fence's line number)]."""
    lines = page.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out.append((lines[i - 1] if i and lines[i - 1].startswith("<!--") else None,
                        "\n".join(lines[i + 1:end]) + "\n", i + 1))
    return out


def doc_block(page: str, name: str) -> str:
    """The text of the block marked `<!-- run: name -->` on `page` (relative to the repository)."""
    found = [text for marker, text, _ in shell_blocks(REPO / page) if marker == f"<!-- run: {name} -->"]
    assert len(found) == 1, f"{page}: {len(found)} blocks marked 'run: {name}'"
    return found[0]
