"""report.html: one self-contained page (inline CSS, tables, inline SVG charts; no scripts, no external assets)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from html import escape

from optcli.report.summary import summary
from optcli.report.svg import svg_bar_chart, svg_loss_curve, svg_scatter
from optcli.report.view import (
    ENV_HEADERS,
    FIDELITY_HEADERS,
    GENERATION_HEADERS,
    INT8_OP_HEADERS,
    IO_HEADERS,
    LATENCY_HEADERS,
    SEARCH_HEADERS,
    TRAINING_HEADERS,
    accuracy,
    batch_sizes,
    clean,
    dig,
    env_rows,
    fidelity_rows,
    finite,
    fmt_ms,
    fmt_num,
    format_bytes,
    gate_lines,
    generation_line,
    generation_rows,
    graph_change_lines,
    int8_op_rows,
    int8_profile_summary,
    io_rows,
    latency_notes,
    latency_rows,
    metric_name,
    p50,
    pruned_rows,
    ratio_legend,
    search_candidates,
    search_rows,
    sensitivity_headers,
    sensitivity_rows,
    step_actions,
    step_table,
    steps,
    training_epochs,
    training_rows,
    training_summary,
    verdict,
    warning_lines,
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


# A figure (right-aligned, to compare down a column): 72.4 kB, 0.35×, 1,557, −0.28, 0.0%, 6.09 ms, —
_FIGURE = re.compile(r"^(?:[−+-]?[\d.,]+(?:e[−+-]?\d+)?\s*(?:×|%|kB|MB|GB|B|ms|s|pt)?|—|-)$")


def _is_figure(value) -> bool:
    return bool(_FIGURE.match(str(value).strip()))


def html_table(
    headers: list[str],
    rows: Iterable[list[str]],
    row_class: Callable[[int], str] | None = None,
    wide: bool = False,
) -> str:
    """Figures right-aligned (to compare down a column), text left-aligned; headers wrap, but never at the hyphen
    of a step name ("1-export"). `wide`: a smaller type for the many-column steps table."""
    rows = [list(r) for r in rows]
    text = [i > 0 and bool(rows) and not all(_is_figure(r[i]) for r in rows if i < len(r)) for i in range(len(headers))]

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


def _summary_charts(report: dict) -> list[str]:
    all_steps = steps(report)
    if not all_steps:
        return []
    names = [str(s.get("name")) for s in all_steps]
    charts = [svg_bar_chart("size", "size on disk", names, [s.get("size_bytes") for s in all_steps], format_bytes)]
    for b in batch_sizes(report):
        charts.append(
            svg_bar_chart(
                f"latency-b{b}",
                f"p50 latency, batch {b} (ms)",
                names,
                [p50(s, b) for s in all_steps],
                lambda v: f"{fmt_ms(v)} ms",
            )
        )
    if any(finite(accuracy(s)) for s in all_steps):
        charts.append(
            svg_bar_chart(
                "accuracy", metric_name(report), names, [accuracy(s) for s in all_steps], lambda v: f"{v:.4f}"
            )
        )
    elif any(finite(dig(s, "fidelity", "cosine_mean")) for s in all_steps):
        charts.append(
            svg_bar_chart(
                "fidelity",
                "fidelity: cosine vs original",
                names,
                [dig(s, "fidelity", "cosine_mean") for s in all_steps],
                lambda v: f"{v:.6f}",
            )
        )
    return charts


def _step_details(step: dict) -> list[str]:
    name = str(step.get("name"))
    out: list[str] = []
    fid = fidelity_rows(step)
    if fid:
        out += [f"<h2>{escape(name)}: fidelity per output</h2>", html_table(FIDELITY_HEADERS, fid)]
    pruned = pruned_rows(step)
    if pruned:
        out += [f"<h2>{escape(name)}: most pruned layers</h2>", html_table(["layer", "sparsity"], pruned)]
    if training_epochs(step):
        summary = training_summary(step)
        out += [
            f"<h2>{escape(name)}: training</h2>",
            *([f"<p>{escape(summary)}</p>"] if summary else []),
            '<div class="charts">',
            svg_loss_curve(step),
            html_table(TRAINING_HEADERS, training_rows(step)),
            "</div>",
        ]
    changes = graph_change_lines(step)
    if changes:
        items = "".join(f"<li>{escape(c)}</li>" for c in changes)
        out += [f"<h2>{escape(name)}: graph changes</h2>", f"<ul>{items}</ul>"]
    cands, target = search_candidates(step)
    if cands:
        out += [
            f"<h2>{escape(name)}: search (target {escape(fmt_num(target))})</h2>",
            '<div class="charts">',
            svg_scatter(step),
            html_table(SEARCH_HEADERS, search_rows(step)),
            "</div>",
        ]
    out += _int8_sections(step, name)
    return out


def _int8_sections(step: dict, name: str) -> list[str]:
    out: list[str] = []
    ops = int8_op_rows(step)
    if ops:
        out += [
            f"<h2>{escape(name)}: int8 per op type</h2>",
            f"<p>{escape(int8_profile_summary(step))}</p>",
            html_table(INT8_OP_HEADERS, ops),
        ]
    sens = sensitivity_rows(step)
    if sens:
        out += [f"<h2>{escape(name)}: per-node sensitivity</h2>", html_table(sensitivity_headers(step), sens)]
    return out


def render_html(report: dict) -> str:
    """One self-contained HTML page: inline CSS, tables and inline SVG charts; no scripts, no external assets."""
    report = clean(report)
    title = verdict(report)
    vclass = "pass" if report.get("passed") is True else "fail" if report.get("passed") is False else ""
    headers, rows = step_table(report)
    body = [f'<h1>optcli report <span class="verdict {vclass}">{escape(title)}</span></h1>']
    if report.get("evaluation"):
        body.append(f"<p>Evaluation: {escape(str(report['evaluation']))}</p>")
    facts = summary(report)
    if facts["verdict"]:
        body.append(f'<p class="sentence"><strong>{escape(facts["verdict"])}</strong></p>')
    for caveat in (facts["slower"], facts["busy"]):
        if caveat:
            body.append(f'<p class="caveat">⚠ {escape(caveat)}</p>')
    body += ["<h2>Steps</h2>", f'<div class="scroll">{html_table(headers, rows, wide=True)}</div>']
    body.append(f'<p class="note">{escape(ratio_legend(report))}</p>')
    actions = step_actions(report)
    if actions:
        body += ["<h2>What each step did</h2>", "<ul>"]
        body += [f"<li><strong>{escape(n)}</strong>: {escape(a)}</li>" for n, a in actions]
        body.append("</ul>")
    body += ["<h2>Gates</h2>"]
    gates = gate_lines(report)
    body += [f'<div class="{"pass" if ok else "fail"}">{escape(line)}</div>' for ok, line in gates] or [
        "<p>No gates.</p>"
    ]
    body += ["<h2>Warnings</h2>"]
    warns = warning_lines(report)
    body.append(
        "<ul>" + "".join(f'<li class="warn">{escape(w)}</li>' for w in warns) + "</ul>" if warns else "<p>None.</p>"
    )
    body += [f'<p class="note">latency note ({escape(n)}): {escape(t)}</p>' for n, t in latency_notes(report)]
    body += ["<h2>Charts</h2>", '<div class="charts">', *_summary_charts(report), "</div>"]
    lat = latency_rows(report)
    if lat:
        body += ["<h2>Latency</h2>", html_table(LATENCY_HEADERS, lat)]
    gen = generation_rows(report)
    if gen:
        body += ["<h2>Generation</h2>", html_table(GENERATION_HEADERS, gen)]
        body.append(f'<p class="note">{escape(generation_line(report))}</p>')
    for step in steps(report):
        body += _step_details(step)
    body += ["<h2>Files</h2>", html_table(IO_HEADERS, io_rows(report))]
    body += ["<h2>Environment</h2>", html_table(ENV_HEADERS, env_rows(report))]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>optcli report: {escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def html_page(title: str, body: list[str]) -> str:
    """A self-contained page in report.html's style (the sweep's page uses it)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
