"""The README and docs/: every quoted result is its file's (benchmark/quote.py), every method page has the same
outline, every relative link leads to a file, every result file is shown on a page, and the README stays a front
page."""

import glob
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import quote  # noqa: E402

METHODS = ("guided_opd", "mopd", "atod", "two_phase")
OUTLINE = ["Overview", "What the file implements", "How to run", "Logged metrics", "Implementation details",
           "Experiment results"]


def read(path):
    with open(path) as f:
        return f.read()


def test_every_quoted_result_is_its_file():
    """A page quotes benchmark/results/ through markers that benchmark/quote.py fills: none differs from its file
    (after a rerun, `python benchmark/quote.py` or reproduce.py itself rewrites them)."""
    problems = [line for page in quote.pages() for line in quote.stale(page)]
    assert not problems, "\n".join(problems) + "\nrun: python benchmark/quote.py"


def test_a_changed_number_in_a_quote_fails_the_check(tmp_path):
    """The check above can fail: a page whose quoted table or quoted cell has one number changed is reported, the
    page as written is not."""
    os.symlink(os.path.join(ROOT, "benchmark"), tmp_path / "benchmark")
    (tmp_path / "docs").mkdir()
    for pattern in (quote.BLOCK, quote.CELL):
        page = next(p for p in quote.pages() if pattern.search(read(p)))
        copy = str(tmp_path / os.path.relpath(page, ROOT))
        shutil.copy(page, copy)
        assert quote.stale(copy, str(tmp_path)) == []
        text = read(page)
        m = pattern.search(text)
        group = 3 if pattern is quote.BLOCK else 5
        number = re.search(r"\d\.\d\d", m.group(group))
        at = m.start(group) + number.start()
        with open(copy, "w") as f:
            f.write(text[:at] + ("0.00" if number.group() != "0.00" else "0.01") + text[at + 4:])
        assert len(quote.stale(copy, str(tmp_path))) == 1, pattern
        assert quote.write(copy, str(tmp_path)) and read(copy) == text  # the fix: rewrite it from the file


def test_every_result_file_is_shown_on_a_page():
    quoted = {m.group(2) for page in quote.pages() for m in quote.BLOCK.finditer(read(page))}
    files = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmark", "results", "*.md"))}
    assert files <= quoted, f"not on any page: {sorted(files - quoted)}"


@pytest.mark.parametrize("method", METHODS)
def test_method_pages_share_one_outline(method):
    text = read(os.path.join(ROOT, "docs", f"{method}.md"))
    assert text.startswith(f"# {method}.py: ")
    assert re.findall(r"^## (.+)$", text, re.M) == OUTLINE
    assert quote.BLOCK.search(text.split("## Experiment results")[1]), "its results come from benchmark/results/"


def test_links_lead_to_files():
    broken = []
    for page in quote.pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+://|mailto:", path) and not os.path.exists(
                    os.path.join(os.path.dirname(page), path)):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
    assert not broken, broken


def test_readme_is_a_front_page_that_links_every_page():
    text = read(os.path.join(ROOT, "README.md"))
    assert len(text.splitlines()) <= 220
    links = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    assert {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))} <= links
    assert "python -m pytest -q tests" in text  # the command CI runs (.ci/run)
    assert "python -m pytest -q tests" in read(os.path.join(ROOT, ".ci", "run"))
