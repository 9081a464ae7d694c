"""report.md: the report's document (document.py) as GitHub-flavoured Markdown, safe for any step or layer name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from optcli.report.document import build_document
from optcli.report.model import Report
from optcli.report.sections import Block, Charts, Checks, Items, Notes, Section, Table, Text


def md_cell(x: Any) -> str:
    """One table cell: pipes escaped, one line, no raw HTML (< and > as entities)."""
    text = str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def md_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report | dict) -> str:
    doc = build_document(report)
    out = [f"# optcli report: {doc.verdict}", ""]
    if doc.evaluation:
        out += [f"Evaluation: {md_cell(doc.evaluation)}", ""]
    if doc.sentence:
        out += [f"**{md_cell(doc.sentence)}**", ""]
    for _, caveat in doc.caveats:
        out += [f"> **⚠ {md_cell(caveat)}**", ""]
    for section in doc.sections:
        out += md_section(section)
    return "\n".join(out)


def md_section(section: Section) -> list[str]:
    """A section as "## title" and its blocks, each followed by a blank line; nothing where no block shows."""
    blocks = [lines for lines in map(md_block, section.blocks) if lines]
    if not blocks:
        return []
    out = [f"## {md_cell(section.title)}", ""]
    for lines in blocks:
        out += [*lines, ""]
    return out


def md_block(block: Block) -> list[str]:
    if isinstance(block, Text):
        return [md_cell(block.text)]
    if isinstance(block, Table):
        caption = [md_cell(block.caption), ""] if block.caption is not None else []
        return [*caption, md_table(block.headers, block.rows)]  # a chart is the HTML page's
    if isinstance(block, Items):
        items = [
            f"- **{md_cell(label)}**: {md_cell(text)}" if label else f"- {md_cell(text)}" for label, text in block.items
        ]
        return items or ([block.empty] if block.empty else [])
    if isinstance(block, Checks):
        return [md_table(["gate"], [[line] for _, line in block.lines]) if block.lines else block.empty]
    if isinstance(block, Notes):
        lines = [f"> latency note ({md_cell(name)}): {md_cell(note)}" for name, note in block.notes]
        return [part for i, line in enumerate(lines) for part in ([""] if i else []) + [line]]
    assert isinstance(block, Charts)
    return []
