"""Fill the README's and docs/ pages' quotes of benchmark/results/ from the files, or check that they match.

The result tables have one source: the files `benchmark/reproduce.py` writes into benchmark/results/. A page never
holds a copy made by hand; it marks where a file is quoted, and this script writes the quote:

    <!-- results: benchmark/results/atod.md -->
    (the file: its command, table, per-step table and figure; its title as a bold line, the figure's link made
    relative to the page)
    <!-- end results -->

and, inside a sentence or a table cell, one cell of a result table (the row whose first cell is the arm, the
column by its header):

    <!-- cell: benchmark/results/atod.md | ATOD | final mean ± std -->0.72 ± 0.08<!-- /cell -->

Markdown shows the quoted text only. `benchmark/reproduce.py` runs this after writing a table; tests/test_docs.py
fails when a page's quote differs from its file.

    python benchmark/quote.py            # rewrite every quote in README.md and docs/*.md
    python benchmark/quote.py --check    # list the quotes that differ from their files, exit 1 if any
"""

from __future__ import annotations

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- results: (\S+) -->\n)(.*?)(<!-- end results -->)", re.S)
CELL = re.compile(r"(<!-- cell: ([^|]+?) \| ([^|]+?) \| ([^|]+?) -->)(.*?)(<!-- /cell -->)")


def pages(root: str = ROOT) -> list[str]:
    """The pages that may quote results: README.md and docs/*.md."""
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def read_result(path: str, root: str) -> str:
    full = os.path.join(root, path)
    if not os.path.isfile(full):
        raise SystemExit(f"error: a page quotes {path}, which does not exist: run benchmark/reproduce.py for it, or "
                         "fix the quote's path")
    with open(full) as f:
        return f.read()


def block(path: str, page: str, root: str) -> str:
    """What a page shows of results file `path`: the file, its H1 title as a bold line (a page has one H1), and
    relative links (the figure) made relative to the page's folder."""
    text = read_result(path, root).strip("\n")
    lines = text.split("\n")
    if lines[0].startswith("# "):
        lines[0] = f"**{lines[0][2:].strip()}**"
    folder = os.path.dirname(os.path.join(root, path))

    def relink(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z]+://|#|/", target):
            return m.group(0)
        return f"{m.group(1)}({os.path.relpath(os.path.join(folder, target), os.path.dirname(page))})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", relink, "\n".join(lines)) + "\n"


def cell(path: str, arm: str, column: str, root: str) -> str:
    """The cell of results file `path`'s first table in the row of `arm` and the column headed `column`."""
    rows = []
    for line in read_result(path, root).split("\n"):
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:  # the first table ended
            break
    if not rows or column not in rows[0]:
        raise SystemExit(f"error: {path} has no table with a column {column!r} (columns: {rows[0] if rows else []})")
    j = rows[0].index(column)
    for row in rows[2:]:
        if row[0] == arm:
            return row[j]
    raise SystemExit(f"error: a page quotes the row {arm!r} of {path}, which has no such row: write the table with that "
                     "arm (benchmark/reproduce.py without --arms), or change the quote")


def quoted(text: str, page: str, root: str = ROOT) -> str:
    """`text` (a page at path `page`) with every quote rewritten from its file."""
    text = BLOCK.sub(lambda m: m.group(1) + block(m.group(2), page, root) + m.group(4), text)
    return CELL.sub(lambda m: m.group(1) + cell(m.group(2), m.group(3), m.group(4), root) + m.group(6), text)


def stale(page: str, root: str = ROOT) -> list[str]:
    """The quotes of `page` that differ from their files, one line each (empty: all match)."""
    with open(page) as f:
        text = f.read()
    new = quoted(text, page, root)
    if new == text:
        return []
    old_quotes = BLOCK.findall(text) + CELL.findall(text)
    new_quotes = BLOCK.findall(new) + CELL.findall(new)
    return [f"{os.path.relpath(page, root)}: the quote of {a[1]}" + (f" ({a[2]}, {a[3]})" if len(a) == 6 else "")
            + " differs from the file" for a, b in zip(old_quotes, new_quotes) if a != b]


def write(page: str, root: str = ROOT) -> bool:
    """Rewrite `page`'s quotes from their files; True if it changed."""
    with open(page) as f:
        text = f.read()
    new = quoted(text, page, root)
    if new != text:
        with open(page + ".tmp", "w") as f:
            f.write(new)
        os.replace(page + ".tmp", page)
    return new != text


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    targets = [os.path.abspath(a) for a in sys.argv[1:] if a != "--check"] or pages()
    if check:
        problems = [line for page in targets for line in stale(page)]
        print("\n".join(problems) or f"every quote in {len(targets)} page(s) matches its file")
        sys.exit(1 if problems else 0)
    for page in targets:
        if write(page):
            print(f"rewrote the quotes of {os.path.relpath(page, ROOT)}")
