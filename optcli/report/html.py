"""report.html: one self-contained page (inline CSS, tables, inline SVG charts; no scripts, no external assets)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from html import escape

from optcli.report.document import build_document
from optcli.report.model import Report
from optcli.report.sections import Block, Chart, Charts, Checks, Items, Notes, Section, Table, Text
from optcli.report.svg import svg_bar_chart, svg_loss_curve, svg_scatter
from optcli.report.view import (
    batch_sizes,
    finite,
    fmt_ms,
    format_bytes,
    is_figure,
    metric_name,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f4f6;white-space:normal;vertical-align:bottom}
td:first-child,th:first-child,.text{text-align:left}
table.wide{font-size:12px} table.wide th,table.wide td{padding:3px 5px}
.pass{color:#15803d} .fail{color:#b91c1c;font-weight:600} .warn{color:#a16207}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff}
.verdict.pass{background:#15803d;color:#fff} .verdict.fail{background:#b91c1c;color:#fff}
.scroll{overflow-x:auto} .charts{display:flex;align-items:flex-start;flex-wrap:wrap;gap:16px} svg.chart{border:1px solid #eee;background:#fff}
code{font-size:12px;word-break:break-all} .note{color:#555;font-style:italic}
.caveat{color:#92400e;background:#fef3c7;border-left:4px solid #d97706;padding:6px 10px;font-weight:600}
"""


def html_table(
    headers: list[str],
    rows: Iterable[list[str]],
    row_class: Callable[[int], str] | None = None,
    wide: bool = False,
) -> str:
    """Figures right-aligned (to compare down a column), text left-aligned; headers wrap, but never at the hyphen
    of a step name ("1-export"). `wide`: a smaller type for the many-column steps table."""
    rows = [list(r) for r in rows]
    text = [i > 0 and bool(rows) and not all(is_figure(r[i]) for r in rows if i < len(r)) for i in range(len(headers))]

    def th(i: int, h: str) -> str:
        cls = ' class="text"' if text[i] else ""
        return f"<th{cls}>{escape(h).replace('-', chr(0x2011))}</th>"

    head = "".join(th(i, h) for i, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{escape(row_class(i))}"' if row_class and row_class(i) else ""
        cells = "".join(
            f'<td class="text">{escape(str(c))}</td>' if j < len(text) and text[j] else f"<td>{escape(str(c))}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    table_cls = ' class="wide"' if wide else ""
    return f"<table{table_cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_charts(report: Report) -> list[str]:
    """Size, p50 per batch size and accuracy (or fidelity) of every step, as bar charts."""
    all_steps = report.steps
    if not all_steps:
        return []
    names = [str(s.name) for s in all_steps]
    charts = [svg_bar_chart("size", "size on disk", names, [s.size_bytes for s in all_steps], format_bytes)]
    for b in batch_sizes(report):
        charts.append(
            svg_bar_chart(
                f"latency-b{b}",
                f"p50 latency, batch {b} (ms)",
                names,
                [s.p50(b) for s in all_steps],
                lambda v: f"{fmt_ms(v)} ms",
            )
        )
    if any(finite(s.accuracy_value) for s in all_steps):
        values = [s.accuracy_value for s in all_steps]
        charts.append(svg_bar_chart("accuracy", metric_name(report), names, values, lambda v: f"{v:.4f}"))
    elif any(finite(s.cosine) for s in all_steps):
        values = [s.cosine for s in all_steps]
        charts.append(svg_bar_chart("fidelity", "fidelity: cosine vs original", names, values, lambda v: f"{v:.6f}"))
    return charts


def render_html(report: Report | dict) -> str:
    """One self-contained HTML page: inline CSS, tables and inline SVG charts; no scripts, no external assets."""
    doc = build_document(report)
    vclass = "pass" if doc.passed is True else "fail" if doc.passed is False else ""
    body = [f'<h1>optcli report <span class="verdict {vclass}">{escape(doc.verdict)}</span></h1>']
    if doc.evaluation:
        body.append(f"<p>Evaluation: {escape(doc.evaluation)}</p>")
    if doc.sentence:
        body.append(f'<p class="sentence"><strong>{escape(doc.sentence)}</strong></p>')
    body += [f'<p class="caveat">⚠ {escape(caveat)}</p>' for _, caveat in doc.caveats]
    for section in doc.sections:
        body += html_section(section)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>optcli report: {escape(doc.verdict)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def html_section(section: Section) -> list[str]:
    """A section as <h2>title</h2> and its blocks; nothing where no block shows."""
    blocks = [lines for lines in map(html_block, section.blocks) if lines]
    return [f"<h2>{escape(section.title)}</h2>", *(line for lines in blocks for line in lines)] if blocks else []


def html_block(block: Block) -> list[str]:
    if isinstance(block, Text):
        return [f'<p class="note">{escape(block.text)}</p>' if block.tone == "note" else f"<p>{escape(block.text)}</p>"]
    if isinstance(block, Table):
        caption = [f"<p>{escape(block.caption)}</p>"] if block.caption is not None else []
        table = html_table(block.headers, block.rows, wide=block.wide)
        table = f'<div class="scroll">{table}</div>' if block.wide else table
        if block.chart is not None:
            return [*caption, '<div class="charts">', *_charts(block.chart), table, "</div>"]
        return [*caption, table]
    if isinstance(block, Items):
        if not block.items:
            return [f"<p>{escape(block.empty)}</p>"] if block.empty else []
        cls = f' class="{block.tone}"' if block.tone else ""
        items = "".join(
            f"<li{cls}><strong>{escape(label)}</strong>: {escape(text)}</li>"
            if label
            else f"<li{cls}>{escape(text)}</li>"
            for label, text in block.items
        )
        return [f"<ul>{items}</ul>"]
    if isinstance(block, Checks):
        lines = [f'<div class="{"pass" if ok else "fail"}">{escape(line)}</div>' for ok, line in block.lines]
        return lines or [f"<p>{escape(block.empty)}</p>"]
    if isinstance(block, Notes):
        return [f'<p class="note">latency note ({escape(n)}): {escape(t)}</p>' for n, t in block.notes]
    assert isinstance(block, Charts)
    return ['<div class="charts">', *(svg for chart in block.charts for svg in _charts(chart)), "</div>"]


def _charts(chart: Chart) -> list[str]:
    if chart.kind == "loss":
        return [svg_loss_curve(chart.data)]
    if chart.kind == "search":
        return [svg_scatter(chart.data)]
    return _summary_charts(chart.data)


def html_page(title: str, body: list[str]) -> str:
    """A self-contained page in report.html's style (the sweep's page uses it)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
