"""The report of a run for people and machines: report.json, report.md, report.html, and the terminal view.

Layers inside the package, each importing only those below it:
  write.py     one atomic write (standard library only; any module may use it)
  model.py     report.json as typed models, declared once (pydantic only): the contract every reader holds to
  sections.py  the kinds of block a document is made of (plain data)
  summary.py   the verdict sentence and its caveats       view.py   the typed report as rows, cells and strings
  passviews.py each pass type's sentence and sections, looked up by type
  document.py  the report's sections, built once from the typed report
  svg.py       the chart kit of the HTML page            markdown.py  report.md
  html.py      report.html                               terminal.py  every Rich call of optcli
This face imports neither Rich nor torch: the runner loads it, and `optcli --help` never does.
"""

from __future__ import annotations

from pathlib import Path

from optcli.report.html import render_html
from optcli.report.markdown import render_markdown
from optcli.report.model import Report
from optcli.report.view import format_bytes, ratio, render_json
from optcli.report.write import atomic_path, atomic_write_text, atomic_write_texts

__all__ = [
    "REPORT_FILES",
    "Report",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_texts",
    "format_bytes",
    "ratio",
    "render_html",
    "render_json",
    "render_markdown",
    "write_reports",
]

REPORT_FILES = ("report.json", "report.md", "report.html")


def write_reports(report: Report | dict, out_dir: Path) -> list[Path]:
    """Write report.json, report.md and report.html into out_dir atomically; return their paths.

    All three are rendered before any file is touched, then written together: on any error
    none of them is left half-written and the previous ones stay as they were.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = (render_json(report), render_markdown(report), render_html(report))
    return atomic_write_texts(out_dir, dict(zip(REPORT_FILES, texts, strict=True)))
