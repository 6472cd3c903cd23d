"""The shell blocks of README.md and docs/*.md, for the tests that run them as written.

Every ```bash block carries a marker on the line just above its fence:

    <!-- run: NAME -->              a test runs this block as written; it takes the text with
                                    doc_block(page, NAME) (NAME unique on its page)
    <!-- not run: needs a GPU -->   (or: needs several nodes, needs the network) no CPU test can run it

A block of another language (docs/extending.md's Python) may carry a `run:` marker too; doc_block
finds it the same way. tests/test_docs.py checks that every shell block is marked and that each
NAME is taken by some test."""

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- (run: (?P<name>[\w.-]+)|not run: needs (?P<why>a GPU|several nodes|the network)) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = {"bash", "sh", "shell", "console"}


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md page."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(page: Path) -> list[tuple[str, str | None, str, int]]:
    """[(the block's language, the marker line above it or None, its text, its fence's line number)]."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = lines[i - 1] if i and lines[i - 1].startswith("<!--") else None
            out.append((opening.group(1), marker, "\n".join(lines[i + 1:end]) + "\n", i + 1))
            i = end
        i += 1
    return out


def shell_blocks(page: Path) -> list[tuple[str | None, str, int]]:
    """[(the marker line above the block, or None; the block's text; its fence's line number)]."""
    return [(marker, text, line) for lang, marker, text, line in fenced_blocks(page) if lang in SHELL]


def doc_block(page: str, name: str) -> str:
    """The text of the block marked `<!-- run: name -->` on `page` (relative to the repository)."""
    found = [text for _, marker, text, _ in fenced_blocks(REPO / page) if marker == f"<!-- run: {name} -->"]
    assert len(found) == 1, f"{page}: {len(found)} blocks marked 'run: {name}'"
    return found[0]


def doc_output(page: str, name: str) -> str:
    """The text of the block right after the one marked `run: name`: the output the page shows."""
    blocks = fenced_blocks(REPO / page)
    (i,) = [i for i, (_, marker, _, _) in enumerate(blocks) if marker == f"<!-- run: {name} -->"]
    assert blocks[i + 1][1] is None, f"{page}: the block after 'run: {name}' is itself marked"
    return blocks[i + 1][2]


def doc_command(page: str, name: str, *extra: str) -> str:
    """The one command of a shell block as a bash command line, with `extra` arguments appended (a
    test's --log_dir, a shorter --max_steps: later flags override the block's own)."""
    text = doc_block(page, name).replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if shlex.split(line, comments=True) != shlex.split(line):   # a trailing comment: drop it
        line = shlex.join(shlex.split(line, comments=True))
    return " ".join([line.strip(), *map(shlex.quote, extra)])
