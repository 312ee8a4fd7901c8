"""The documentation: the README's quick start is what CI runs, links resolve, and the README, docs/,
the changelog and the docstrings and comments of the code speak of the library only (no words about
how the work was organised, no paths outside the repository)."""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted([*(ROOT / "minissl").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
                  *(ROOT / "data_scripts").rglob("*.py")])  # the shipped and documented code
PROCESS_WORDS = re.compile(r"\b(this round|previous round|last round|today|this session|this machine)\b"
                           r"|\.\./shared", re.IGNORECASE)
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown link target
MD_CITATION = re.compile(r"[\w./-]*\w\.md\b")  # a .md file named in a docstring or comment
TEXT_TOKENS = {tokenize.COMMENT, tokenize.STRING} | (
    {tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def quick_start_commands(text: str) -> list[str]:
    """The command lines of the first ```bash block under the heading that contains "Quick start"."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and "Quick start" in line), None)
    assert start is not None, "README.md: no heading containing 'Quick start'"
    body = lines[start + 1:]
    end = next((i for i, line in enumerate(body) if line.startswith("#")), len(body))
    body = body[:end]  # up to the next heading
    opening = next((i for i, line in enumerate(body) if line.strip() == "```bash"), None)
    assert opening is not None, "README.md: no ```bash block under the 'Quick start' heading"
    block = []
    for line in body[opening + 1:]:
        if line.strip() == "```":
            return [c for c in (b.strip() for b in block) if c and not c.startswith("#")]
        block.append(line)
    raise AssertionError("README.md: the quick-start ```bash block is not closed")


def find_in_text(path: Path, pattern: re.Pattern) -> list[tuple[int, str]]:
    """(line, match) of ``pattern`` in every comment and string literal (docstrings) of a Python file."""
    found = []
    for t in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if t.type not in TEXT_TOKENS:
            continue
        text = t.string
        if t.type == tokenize.STRING and "f" in re.match(r"[A-Za-z]*", text).group().lower():
            text = re.sub(r"\{[^{}]*\}", lambda m: " " * len(m.group()), text)  # f-string fields are code
        found += [(t.start[0] + text.count("\n", 0, m.start()), m.group(0)) for m in pattern.finditer(text)]
    return found


def test_quick_start_is_two_commands_and_the_second_is_what_ci_runs():
    commands = quick_start_commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 2, f"README.md quick start: expected 2 commands, found {len(commands)}: {commands}"
    assert commands[0].endswith("minissl demo"), commands[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert commands[1] in ci, f".ci/run does not run the README's test command {commands[1]!r}"


def test_quick_start_parser_counts_every_command_and_needs_a_block():
    text = "# x\n\n## Quick start\n\n```bash\npip install a\npip install b\nminissl demo\n```\n"
    assert quick_start_commands(text) == ["pip install a", "pip install b", "minissl demo"]
    with pytest.raises(AssertionError, match="no ```bash block"):
        quick_start_commands("## Quick start\n\ntext\n\n## Next\n\n```bash\nls\n```\n")


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; at most 200 (details belong in docs/)"


def test_readme_points_to_the_detailed_docs():
    targets = LINK.findall(README.read_text(encoding="utf-8"))
    for doc in ("docs/kernels.md", "docs/results.md"):
        assert doc in targets, f"README.md does not link {doc}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_docs_hold_no_process_words(doc):
    lines = doc.read_text(encoding="utf-8").splitlines()
    hits = [f"{rel(doc)}:{i}: {m.group(0)!r}" for i, line in enumerate(lines, 1) for m in PROCESS_WORDS.finditer(line)]
    assert not hits, "words about how the work was organised, or paths outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve(doc):
    missing = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            missing.append(target)
    assert not missing, f"{rel(doc)}: links to files that are not in the repository: {missing}"


def test_package_docstrings_and_comments_hold_no_process_words():
    hits = [f"{rel(src)}:{line}: {word!r}" for src in SOURCES for line, word in find_in_text(src, PROCESS_WORDS)]
    assert not hits, "words about how the work was organised, or paths outside the repository:\n" + "\n".join(hits)


def test_package_docstrings_cite_only_files_of_the_repository():
    hits = [f"{rel(src)}:{line}: {name}" for src in SOURCES for line, name in find_in_text(src, MD_CITATION)
            if not (ROOT / name).exists()]
    assert not hits, "docstrings cite files that are not in the repository (cite papers or public code):\n" + \
        "\n".join(hits)


def test_process_word_scan_finds_a_planted_word(tmp_path):
    src = tmp_path / "m.py"
    text = '"""Fast.\n\nOn this machine."""\ntoday = 1  # measured Today\ny = f"{today} ok"\n'
    src.write_text(text, encoding="utf-8")
    assert find_in_text(src, PROCESS_WORDS) == [(3, "this machine"), (4, "Today")]


def test_committed_tables_are_the_rendering_of_the_committed_results():
    """docs/results/*.md are `minissl bench render` of results/: a new run recorded without its table, or
    a table edited by hand, fails here."""
    from minissl import bench

    assert any((ROOT / "results").glob("*/*/*/seed*/metrics.json"))
    assert bench.render(str(ROOT / "results"), str(ROOT / "docs" / "results"), check=True) == []


def test_readme_compact_table_is_the_rendering_of_the_committed_results():
    """The README's method x suite table is `minissl bench render --summary` of the settings its marker names."""
    from minissl import bench

    found = re.search(r"<!-- summary (\S+) -->\n(.*?)<!-- /summary -->", README.read_text(encoding="utf-8"), re.S)
    assert found, "README.md: expected the compact table between <!-- summary SUITE:SETTING,... --> and " \
                  "<!-- /summary -->"
    assert found.group(2) == bench.summary(found.group(1).split(","), ROOT / "results")
