"""What the three renderers show of one report: the section titles of report.md and report.html, and the terminal's
text; importable from every tier (`from report_sections import assert_same_sections`)."""

from __future__ import annotations

import html
import io
import re


def section_titles(report) -> tuple[list[str], list[str]]:
    """(report.md's "## " titles, report.html's <h2> titles), unescaped."""
    from optcli.report import render_html, render_markdown

    md = [t.replace("&lt;", "<").replace("&gt;", ">") for t in re.findall(r"^## (.+)$", render_markdown(report), re.M)]
    page = [html.unescape(t) for t in re.findall(r"<h2>(.*?)</h2>", render_html(report))]
    return md, page


def assert_same_sections(report) -> list[str]:
    """Markdown and HTML show the document's sections in its order (the charts are the page's own); the terminal
    shows the sections made for it whole and a line for each step's graph changes. Returns the titles."""
    from rich.console import Console

    from optcli.report.document import build_document
    from optcli.report.terminal import render_table

    md, page = section_titles(report)
    doc = build_document(report)
    assert md == [t for t in page if t != "Charts"]
    assert md == [s.title for s in doc.sections if s.key != "charts"]
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render_table(report))
    text = " ".join(console.export_text().split())  # a title wider than its table wraps
    for section in doc.sections:
        if section.terminal:
            assert " ".join(section.title.split()) in text, section.title
        if section.brief:
            assert " ".join(section.brief.split()) in text, section.brief
    return md
