"""The README stays a short guide whose links and commands work; the reference lives in docs/, reachable from it."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO, run_cli

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")


def prose(text: str) -> str:
    """The text outside code: a `[0, 1]` in code followed by a parenthesis is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(prose(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def shown_commands(text: str) -> list[str]:
    """Every `optcli ...` the README shows: inline code spans and lines of code blocks that start with it."""
    spans = [s.strip("`") for s in INLINE_CODE.findall(FENCE.sub("", text))]
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()]
    return [c.strip() for c in spans + lines if c.strip().startswith("optcli ")]


def test_readme_stays_a_short_guide_under_220_lines():
    lines = README.read_text().splitlines()
    assert len(lines) < 220, f"README.md has {len(lines)} lines: move reference to docs/ and figures to benchmarks/"


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "docs/ holds no page"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README's 'Where to read more' does not link: {missing}"


def test_every_relative_link_in_readme_and_docs_opens_a_file():
    broken = [
        f"{page.relative_to(REPO)}: {target}"
        for page in [README, *DOCS]
        for target in relative_links(page)
        if not (page.parent / target.split("#")[0]).exists()
    ]
    assert not broken, f"links to files that do not exist: {broken}"


def test_every_optcli_verb_the_readme_shows_is_listed_by_optcli_help():
    result = run_cli("--help")
    assert result.exit_code == 0
    listed = set(re.findall(r"^│ ([a-z][a-z-]*)\s{2,}", result.stdout, re.M))
    shown = {c.split()[1] for c in shown_commands(README.read_text()) if not c.split()[1].startswith("-")}
    assert {"run", "validate"} <= shown, "the README shows no optcli command: the parser above no longer finds them"
    assert shown <= listed, f"the README shows verbs optcli --help does not list: {sorted(shown - listed)}"
