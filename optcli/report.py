"""Render an optimization report (the dict written as report.json) for people.

Three views of the same content: a rich table for the terminal, Markdown, and
one self-contained HTML file with hand-written SVG charts. ``write_reports``
writes report.json, report.md and report.html atomically.

This module imports only the standard library and rich, so the CLI can load it
fast. Every value in a report may be null (not measured); every renderer
shows "—" for it instead of failing.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

DASH = "—"
REPORT_FILES = ("report.json", "report.md", "report.html")


# --------------------------------------------------------------------------- helpers


def format_bytes(n: float | None) -> str:
    """Human size in decimal units: 999 -> "999 B", 1234567 -> "1.2 MB"; None -> "—"."""
    if not _finite(n):
        return DASH
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if abs(n) < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    return DASH  # unreachable


def ratio(a: float | None, b: float | None) -> str:
    """a / b as "0.26×" / "2.1×" / "12×"; "—" when either is missing or b is 0."""
    if not _finite(a) or not _finite(b) or b == 0:
        return DASH
    x = float(a) / float(b)
    ax = abs(x)
    if ax >= 9.95:
        return f"{x:.0f}×"
    if ax >= 0.995:
        return f"{x:.1f}×"
    if ax >= 0.01 or ax == 0:
        return f"{x:.2f}×"
    return f"{x:.2g}×"


def clean(obj: Any) -> Any:
    """A JSON-safe copy of obj: NaN/inf -> None, tuples -> lists, numpy values -> Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return clean(obj.tolist())
    return obj  # json.dumps(default=str) handles the rest (Path, datetime, ...)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, (bool, str)):
        return str(x)
    if not _finite(x):
        return DASH
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _fmt_ms(ms: Any) -> str:
    if not _finite(ms):
        return DASH
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 100:
        return f"{ms:.2f}"
    return f"{ms:.0f}"


def _fmt_pct(x: Any) -> str:
    return f"{x * 100:.1f}%" if _finite(x) else DASH


def _fmt_count(n: Any) -> str:
    return f"{int(n):,}" if _finite(n) else DASH


def _fmt_seconds(s: Any) -> str:
    return f"{s:.2f}" if _finite(s) else DASH


# --------------------------------------------------------------------------- report model


def _steps(report: dict) -> list[dict]:
    return [s for s in (report.get("steps") or []) if isinstance(s, dict)]


def batch_sizes(report: dict) -> list[int]:
    """Sorted batch sizes found in any step's latency ("batch_<n>" keys)."""
    sizes: set[int] = set()
    for step in _steps(report):
        for key in step.get("latency") or {}:
            prefix, _, n = str(key).partition("_")
            if prefix == "batch" and n.isdigit():
                sizes.add(int(n))
    return sorted(sizes)


def _p50(step: dict, batch: int) -> Any:
    return _get(step, "latency", f"batch_{batch}", "p50_ms")


def _accuracy(step: dict) -> Any:
    return _get(step, "accuracy", "value")


def _metric_name(report: dict) -> str:
    for step in _steps(report):
        name = _get(step, "accuracy", "metric")
        if name:
            return str(name)
    return "accuracy"


def _accuracy_cell(step: dict, original: dict, is_original: bool) -> str:
    value = _accuracy(step)
    if not _finite(value):
        return DASH
    base = _accuracy(original)
    if is_original or not _finite(base):
        return f"{value:.4f}"
    return f"{value:.4f} ({(value - base) * 100:+.2f} pt)"


def _latency_cell(step: dict, original: dict, batch: int) -> str:
    ms = _p50(step, batch)
    if not _finite(ms):
        return DASH
    return f"{_fmt_ms(ms)} ({ratio(_p50(original, batch), ms)})"


def step_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and string rows of the steps table; shared by every renderer."""
    steps = _steps(report)
    batches = batch_sizes(report)
    headers = ["step", "format", "size", "size ratio", "compressed", "params", "sparsity"]
    headers += [f"p50 b{b} ms (speed-up)" for b in batches]
    headers += [f"{_metric_name(report)} (Δ)", "fidelity cos", "top-1 agree", "seconds"]
    if not steps:
        return headers, []
    original = steps[0]
    rows = []
    for i, step in enumerate(steps):
        row = [
            str(step.get("name", DASH)),
            str(step.get("format") or DASH),
            format_bytes(step.get("size_bytes")),
            ratio(step.get("size_bytes"), original.get("size_bytes")),
            format_bytes(step.get("compressed_bytes")),
            _fmt_count(step.get("parameters")),
            _fmt_pct(step.get("sparsity")),
        ]
        row += [_latency_cell(step, original, b) for b in batches]
        row += [
            _accuracy_cell(step, original, i == 0),
            _num(_get(step, "fidelity", "cosine_mean"), 6),
            _fmt_pct(_get(step, "fidelity", "top1_agreement")),
            _fmt_seconds(step.get("seconds")),
        ]
        rows.append(row)
    return headers, rows


def gate_lines(report: dict) -> list[tuple[bool, str]]:
    """(passed, "✓ name value vs limit") per gate."""
    out = []
    for gate in report.get("gates") or []:
        passed = bool(gate.get("passed"))
        mark = "✓" if passed else "✗"
        text = f"{mark} {gate.get('name', '?')}: {_num(gate.get('value'))} vs limit {_num(gate.get('limit'))}"
        out.append((passed, text))
    return out


def _warnings(report: dict) -> list[str]:
    return [str(w) for w in report.get("warnings") or []]


def _verdict(report: dict) -> str:
    passed = report.get("passed")
    return "PASSED" if passed is True else "FAILED" if passed is False else "not gated"


def top_pruned(step: dict, n: int = 10) -> list[tuple[str, float]]:
    """The n most sparse layers of a step's details.per_layer_sparsity, most sparse first."""
    per_layer = _get(step, "details", "per_layer_sparsity")
    if not isinstance(per_layer, dict):
        return []
    items = [(str(k), float(v)) for k, v in per_layer.items() if _finite(v)]
    return sorted(items, key=lambda kv: (-kv[1], kv[0]))[:n]


def _latency_notes(report: dict) -> list[tuple[str, str]]:
    return [
        (str(s.get("name")), str(_get(s, "details", "latency_note")))
        for s in _steps(report)
        if _get(s, "details", "latency_note")
    ]


def _training(step: dict) -> list[dict]:
    epochs = _get(step, "details", "training", "epochs")
    return [e for e in epochs if isinstance(e, dict)] if isinstance(epochs, list) else []


def _search(step: dict) -> tuple[list[dict], Any]:
    search = _get(step, "details", "search")
    if not isinstance(search, dict):
        return [], None
    cands = [c for c in search.get("candidates") or [] if isinstance(c, dict)]
    return cands, search.get("target")


def _latency_detail(report: dict) -> list[list[str]]:
    rows = []
    for step in _steps(report):
        for b in batch_sizes(report):
            lat = _get(step, "latency", f"batch_{b}")
            if not isinstance(lat, dict):
                continue
            rows.append(
                [
                    str(step.get("name")),
                    str(b),
                    _fmt_ms(lat.get("p50_ms")),
                    _fmt_ms(lat.get("p90_ms")),
                    _fmt_ms(lat.get("p99_ms")),
                    _num(lat.get("throughput_per_s")),
                    _fmt_count(lat.get("runs")),
                ]
            )
    return rows


LATENCY_HEADERS = ["step", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "runs"]
TRAINING_HEADERS = ["epoch", "loss", "metric", "best"]
SEARCH_HEADERS = ["candidate", "latency ms", "metric", "chosen"]


def _training_rows(step: dict) -> list[list[str]]:
    best = _get(step, "details", "training", "best_epoch")
    return [
        [_num(e.get("epoch")), _num(e.get("loss")), _num(e.get("metric")), "★" if e.get("epoch") == best else ""]
        for e in _training(step)
    ]


def training_summary(step: dict) -> str:
    """One line on where training ran: workers, backend, devices, batch per worker and global, samples/s."""
    t = _get(step, "details", "training")
    if not isinstance(t, dict) or not isinstance(t.get("world_size"), int):
        return ""
    world, devices = t["world_size"], t.get("devices") or []
    where = ", ".join(sorted({str(d) for d in devices})) or "?"
    workers = f"{world} workers ({t.get('backend')})" if world > 1 else "1 process"
    return (
        f"{workers} on {where}; batch {_num(t.get('batch_per_worker'))} per worker, global batch {_num(t.get('global_batch'))}; "
        f"{_num(t.get('samples_per_s'))} samples/s ({_num(t.get('samples_per_s_per_worker'))} per worker)"
    )


def _candidate_label(c: dict, i: int) -> str:
    return str(c.get("name") or c.get("label") or f"#{i + 1}")


def _search_rows(step: dict) -> list[list[str]]:
    cands, _ = _search(step)
    return [
        [_candidate_label(c, i), _fmt_ms(c.get("latency_ms")), _num(c.get("metric")), "✓" if c.get("chosen") else ""]
        for i, c in enumerate(cands)
    ]


# --------------------------------------------------------------------------- terminal


def _compact(headers: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The terminal's narrower view of the steps table: size and its ratio in one cell, no params/seconds."""
    idx = {h: i for i, h in enumerate(headers)}
    keep = [h for h in headers if h not in ("size ratio", "params", "seconds")]
    out_headers = ["size (×)" if h == "size" else h.replace(" (speed-up)", " (×)") for h in keep]
    out_rows = []
    for row in rows:
        cells = {h: row[i] for h, i in idx.items()}
        cells["size"] = f"{cells['size']} ({cells['size ratio']})"
        out_rows.append([cells[h] for h in keep])
    return out_headers, out_rows


def render_table(report: dict) -> Group:
    """A rich renderable: the steps table, then gates, warnings, notes and per-layer sparsity."""
    report = clean(report)
    headers, rows = _compact(*step_table(report))
    table = Table(title=f"optcli report: {_verdict(report)}", title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(c) for c in row))  # Text: no rich markup parsing of names
    parts: list[Any] = [table]
    if report.get("evaluation"):
        parts.append(Text(f"evaluation: {report['evaluation']}", style="dim"))
    for passed, line in gate_lines(report):
        parts.append(Text(line, style="green" if passed else "bold red"))
    for w in _warnings(report):
        parts.append(Text(f"⚠ {w}", style="yellow"))
    for name, note in _latency_notes(report):
        parts.append(Text(f"note ({name}): {note}", style="dim"))
    for step in _steps(report):
        top = top_pruned(step)
        if top:
            t = Table(title=Text(f"{step.get('name')}: most pruned layers"), title_justify="left")
            t.add_column("layer")
            t.add_column("sparsity", justify="right")
            for layer, s in top:
                t.add_row(Text(layer), _fmt_pct(s))
            parts.append(t)
    return Group(*parts)


# --------------------------------------------------------------------------- markdown


def _md_cell(x: Any) -> str:
    """One table cell: pipes escaped, one line, no raw HTML (< and > as entities)."""
    text = str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def md_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _io_rows(report: dict) -> list[list[str]]:
    return [
        [
            label,
            str(_get(report, key, "path") or DASH),
            str(_get(report, key, "format") or DASH),
            str(_get(report, key, "sha256") or DASH),
        ]
        for label, key in (("input", "input"), ("output", "output"))
    ]


def _env_rows(report: dict) -> list[list[str]]:
    env = report.get("environment") or {}
    rows = [["optcli", str(report.get("optcli_version") or DASH)]]
    return rows + [[str(k), str(v)] for k, v in env.items()]


def render_markdown(report: dict) -> str:
    report = clean(report)
    out = [f"# optcli report: {_verdict(report)}", ""]
    if report.get("evaluation"):
        out += [f"Evaluation: {_md_cell(report['evaluation'])}", ""]
    headers, rows = step_table(report)
    out += ["## Steps", "", md_table(headers, rows), ""]
    out += ["## Gates", ""]
    gates = gate_lines(report)
    out += [md_table(["gate"], [[g] for _, g in gates]) if gates else "No gates.", ""]
    out += ["## Warnings", ""]
    out += [f"- {_md_cell(w)}" for w in _warnings(report)] or ["None."]
    out.append("")
    for name, note in _latency_notes(report):
        out += [f"> latency note ({_md_cell(name)}): {_md_cell(note)}", ""]
    lat = _latency_detail(report)
    if lat:
        out += ["## Latency", "", md_table(LATENCY_HEADERS, lat), ""]
    for step in _steps(report):
        out += _md_step_details(step)
    out += ["## Files", "", md_table(["", "path", "format", "sha256"], _io_rows(report)), ""]
    out += ["## Environment", "", md_table(["", "value"], _env_rows(report)), ""]
    return "\n".join(out)


def _md_step_details(step: dict) -> list[str]:
    name = _md_cell(step.get("name"))
    out: list[str] = []
    top = top_pruned(step)
    if top:
        rows = [[layer, _fmt_pct(s)] for layer, s in top]
        out += [f"## {name}: most pruned layers", "", md_table(["layer", "sparsity"], rows), ""]
    if _training(step):
        summary = training_summary(step)
        out += [
            f"## {name}: training",
            "",
            *([_md_cell(summary), ""] if summary else []),
            md_table(TRAINING_HEADERS, _training_rows(step)),
            "",
        ]
    cands, target = _search(step)
    if cands:
        out += [f"## {name}: search (target {_num(target)})", "", md_table(SEARCH_HEADERS, _search_rows(step)), ""]
    return out


# --------------------------------------------------------------------------- html

_e = html.escape

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f4f6} td:first-child,th:first-child{text-align:left}
.pass{color:#15803d} .fail{color:#b91c1c;font-weight:600} .warn{color:#a16207}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff}
.verdict.pass{background:#15803d;color:#fff} .verdict.fail{background:#b91c1c;color:#fff}
.scroll{overflow-x:auto} .charts{display:flex;align-items:flex-start;flex-wrap:wrap;gap:16px} svg.chart{border:1px solid #eee;background:#fff}
code{font-size:12px;word-break:break-all} .note{color:#555;font-style:italic}
"""

_BAR = "#4f7cba"
_BAR_ORIG = "#9aa5b1"


def html_table(headers: list[str], rows: Iterable[list[str]], row_class: Callable[[int], str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_e(row_class(i))}"' if row_class and row_class(i) else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _short(label: str, n: int = 24) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def svg_bar_chart(kind: str, title: str, labels: list[str], values: list[Any], fmt: Callable[[Any], str]) -> str:
    """Horizontal bars from zero; a missing value gets no bar and "n/a"."""
    label_w, bar_w, value_w, row_h, top = 165, 260, 90, 24, 34
    width = label_w + bar_w + value_w
    height = top + row_h * len(labels) + 10
    vmax = max([v for v in values if _finite(v) and v > 0] or [1.0])
    parts = [
        f'<svg class="chart" data-chart="{_e(kind)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="8" y="20" font-size="14" font-weight="600">{_e(title)}</text>',
    ]
    for i, (label, v) in enumerate(zip(labels, values, strict=False)):
        y = top + i * row_h
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" font-size="12" text-anchor="end">'
            f"<title>{_e(label)}</title>{_e(_short(label))}</text>"
        )
        if _finite(v) and v > 0:
            w = max(1.0, bar_w * v / vmax)
            color = _BAR_ORIG if i == 0 else _BAR
            parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="{color}"/>')
            parts.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 16}" font-size="12">{_e(fmt(v))}</text>')
        else:
            text = fmt(v) if _finite(v) else "n/a"
            parts.append(f'<text x="{label_w + 5}" y="{y + 16}" font-size="12" fill="#888">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered ticks (steps of 1, 2 or 5 x 10^k) inside [lo, hi], at most about n of them."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step)
    return [k * step for k in range(first, math.floor(hi / step) + 1)]


def _span(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        d = abs(lo) * 0.05 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


class _Plot:
    """Maps data to pixels inside a fixed plot area and draws the axes."""

    def __init__(
        self, xs: list[float], ys: list[float], width: int = 460, height: int = 300, xticks: list[float] | None = None
    ):
        self.w, self.h, self.xticks = width, height, xticks
        self.left, self.right, self.top, self.bottom = 64, 16, 34, 44
        self.x0, self.x1 = _span(xs)
        self.y0, self.y1 = _span(ys)

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def frame(self, kind: str, title: str, xlabel: str, ylabel: str) -> list[str]:
        w, h, lft, bot = self.w, self.h, self.left, self.h - self.bottom
        out = [
            f'<svg class="chart" data-chart="{_e(kind)}" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">',
            f'<text x="8" y="20" font-size="14" font-weight="600">{_e(title)}</text>',
            f'<line x1="{lft}" y1="{bot}" x2="{w - self.right}" y2="{bot}" stroke="#444"/>',
            f'<line x1="{lft}" y1="{self.top}" x2="{lft}" y2="{bot}" stroke="#444"/>',
            f'<text x="{(lft + w - self.right) / 2:.1f}" y="{h - 6}" font-size="12" text-anchor="middle">{_e(xlabel)}</text>',
            f'<text x="12" y="{(self.top + bot) / 2:.1f}" font-size="12" text-anchor="middle" '
            f'transform="rotate(-90 12 {(self.top + bot) / 2:.1f})">{_e(ylabel)}</text>',
        ]
        for t in self.xticks or _ticks(self.x0, self.x1):
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" y1="{bot}" x2="{x:.1f}" y2="{bot + 4}" stroke="#444"/>')
            out.append(f'<text x="{x:.1f}" y="{bot + 16}" font-size="10" text-anchor="middle">{_e(f"{t:.3g}")}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(f'<line x1="{lft}" y1="{y:.1f}" x2="{w - self.right}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{lft - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{_e(f"{t:.4g}")}</text>')
        return out


def svg_scatter(step: dict) -> str:
    """Search candidates: latency (x) vs metric (y), chosen ones highlighted, target as a dashed line."""
    cands, target = _search(step)
    pts = [
        (c["latency_ms"], c["metric"], bool(c.get("chosen")), _candidate_label(c, i))
        for i, c in enumerate(cands)
        if _finite(c.get("latency_ms")) and _finite(c.get("metric"))
    ]
    if not pts:
        return ""
    ys = [p[1] for p in pts] + ([target] if _finite(target) else [])
    plot = _Plot([p[0] for p in pts], ys)
    out = plot.frame("search", f"{step.get('name')}: search candidates", "latency p50 (ms)", "metric")
    if _finite(target):
        y = plot.py(target)
        out.append(
            f'<line x1="{plot.left}" y1="{y:.1f}" x2="{plot.w - plot.right}" y2="{y:.1f}" '
            f'stroke="#b91c1c" stroke-dasharray="5,4"/>'
        )
        out.append(
            f'<text x="{plot.w - plot.right - 4}" y="{y - 4:.1f}" font-size="11" fill="#b91c1c" '
            f'text-anchor="end">{_e(f"target {_num(target)}")}</text>'
        )
    for x, y, chosen, label in sorted(pts, key=lambda p: p[2]):  # chosen drawn last, on top
        fill, r = ("#15803d", 6) if chosen else (_BAR, 4)
        out.append(
            f'<circle cx="{plot.px(x):.1f}" cy="{plot.py(y):.1f}" r="{r}" fill="{fill}" fill-opacity="0.85">'
            f"<title>{_e(f'{label}: {_fmt_ms(x)} ms, {_num(y)}')}</title></circle>"
        )
        if chosen:
            out.append(
                f'<text x="{plot.px(x) + 8:.1f}" y="{plot.py(y) - 6:.1f}" font-size="11" fill="#15803d">'
                f"{_e(f'chosen: {label}')}</text>"
            )
    out.append("</svg>")
    return "".join(out)


def svg_loss_curve(step: dict) -> str:
    """Training loss per epoch as a polyline with points; the best epoch is marked."""
    pts = [(e["epoch"], e["loss"]) for e in _training(step) if _finite(e.get("epoch")) and _finite(e.get("loss"))]
    if not pts:
        return ""
    best = _get(step, "details", "training", "best_epoch")
    epochs = [p[0] for p in pts]
    every = max(1, math.ceil(len(epochs) / 10))
    plot = _Plot(epochs, [p[1] for p in pts], xticks=epochs[::every])
    out = plot.frame("training", f"{step.get('name')}: training loss", "epoch", "loss")
    line = " ".join(f"{plot.px(x):.1f},{plot.py(y):.1f}" for x, y in pts)
    out.append(f'<polyline points="{line}" fill="none" stroke="{_BAR}" stroke-width="2"/>')
    for x, y in pts:
        is_best = x == best
        out.append(
            f'<circle cx="{plot.px(x):.1f}" cy="{plot.py(y):.1f}" r="{5 if is_best else 3}" '
            f'fill="{"#15803d" if is_best else _BAR}"><title>{_e(f"epoch {x}: loss {_num(y)}")}</title></circle>'
        )
    out.append("</svg>")
    return "".join(out)


def _summary_charts(report: dict) -> list[str]:
    steps = _steps(report)
    if not steps:
        return []
    names = [str(s.get("name")) for s in steps]
    charts = [svg_bar_chart("size", "size on disk", names, [s.get("size_bytes") for s in steps], format_bytes)]
    for b in batch_sizes(report):
        charts.append(
            svg_bar_chart(
                f"latency-b{b}",
                f"p50 latency, batch {b} (ms)",
                names,
                [_p50(s, b) for s in steps],
                lambda v: f"{_fmt_ms(v)} ms",
            )
        )
    if any(_finite(_accuracy(s)) for s in steps):
        charts.append(
            svg_bar_chart("accuracy", _metric_name(report), names, [_accuracy(s) for s in steps], lambda v: f"{v:.4f}")
        )
    elif any(_finite(_get(s, "fidelity", "cosine_mean")) for s in steps):
        charts.append(
            svg_bar_chart(
                "fidelity",
                "fidelity: cosine vs original",
                names,
                [_get(s, "fidelity", "cosine_mean") for s in steps],
                lambda v: f"{v:.6f}",
            )
        )
    return charts


def _html_step_details(step: dict) -> list[str]:
    name = str(step.get("name"))
    out: list[str] = []
    top = top_pruned(step)
    if top:
        out += [
            f"<h2>{_e(name)}: most pruned layers</h2>",
            html_table(["layer", "sparsity"], [[layer, _fmt_pct(s)] for layer, s in top]),
        ]
    if _training(step):
        summary = training_summary(step)
        out += [
            f"<h2>{_e(name)}: training</h2>",
            *([f"<p>{_e(summary)}</p>"] if summary else []),
            '<div class="charts">',
            svg_loss_curve(step),
            html_table(TRAINING_HEADERS, _training_rows(step)),
            "</div>",
        ]
    cands, target = _search(step)
    if cands:
        out += [
            f"<h2>{_e(name)}: search (target {_e(_num(target))})</h2>",
            '<div class="charts">',
            svg_scatter(step),
            html_table(SEARCH_HEADERS, _search_rows(step)),
            "</div>",
        ]
    return out


def render_html(report: dict) -> str:
    """One self-contained HTML page: inline CSS, tables and inline SVG charts; no scripts, no external assets."""
    report = clean(report)
    verdict = _verdict(report)
    vclass = "pass" if report.get("passed") is True else "fail" if report.get("passed") is False else ""
    headers, rows = step_table(report)
    body = [f'<h1>optcli report <span class="verdict {vclass}">{_e(verdict)}</span></h1>']
    if report.get("evaluation"):
        body.append(f"<p>Evaluation: {_e(str(report['evaluation']))}</p>")
    body += ["<h2>Steps</h2>", f'<div class="scroll">{html_table(headers, rows)}</div>']
    body += ["<h2>Gates</h2>"]
    gates = gate_lines(report)
    body += [f'<div class="{"pass" if ok else "fail"}">{_e(line)}</div>' for ok, line in gates] or ["<p>No gates.</p>"]
    body += ["<h2>Warnings</h2>"]
    warns = _warnings(report)
    body.append(
        "<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in warns) + "</ul>" if warns else "<p>None.</p>"
    )
    body += [f'<p class="note">latency note ({_e(n)}): {_e(t)}</p>' for n, t in _latency_notes(report)]
    body += ["<h2>Charts</h2>", '<div class="charts">', *_summary_charts(report), "</div>"]
    lat = _latency_detail(report)
    if lat:
        body += ["<h2>Latency</h2>", html_table(LATENCY_HEADERS, lat)]
    for step in _steps(report):
        body += _html_step_details(step)
    body += ["<h2>Files</h2>", html_table(["", "path", "format", "sha256"], _io_rows(report))]
    body += ["<h2>Environment</h2>", html_table(["", "value"], _env_rows(report))]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>optcli report: {_e(verdict)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------- writing


def render_json(report: dict) -> str:
    return json.dumps(clean(report), indent=2, default=str, allow_nan=False) + "\n"


def _write_temp(out_dir: Path, name: str, text: str) -> Path:
    """Write text to a fresh temp file next to name, fsynced; remove it on failure."""
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        _unlink(Path(tmp))
        raise
    return Path(tmp)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_reports(report: dict, out_dir: Path) -> list[Path]:
    """Write report.json, report.md and report.html into out_dir atomically; return their paths.

    Everything is rendered first, then each file goes to a temp file in out_dir,
    is fsynced and os.replace()d onto its name. On any error the temp files are
    removed and the error propagates; a final file is never left half-written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = dict(zip(REPORT_FILES, (render_json(report), render_markdown(report), render_html(report)), strict=False))
    temps: dict[str, Path] = {}
    try:
        for name, text in texts.items():
            temps[name] = _write_temp(out_dir, name, text)
        for name in REPORT_FILES:
            os.replace(temps[name], out_dir / name)
            del temps[name]
    finally:
        for tmp in temps.values():
            _unlink(tmp)
    _fsync_dir(out_dir)
    return [out_dir / name for name in REPORT_FILES]
