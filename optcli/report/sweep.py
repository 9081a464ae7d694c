"""A sweep's report for people: the variants table (shared by the terminal, Markdown and HTML), the Pareto scatter.

sweep.json is the data; sweep.md and sweep.html render the same rows. Standard library only (the terminal's Rich
table is in terminal.py).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import TypeGuard

from optcli.report.html import html_page, html_table
from optcli.report.svg import svg_bar_chart, svg_history, svg_pareto
from optcli.report.view import DASH, clean, fmt_ms, fmt_num, format_bytes, render_json
from optcli.report.write import atomic_write_texts

SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.html")
AXIS = {"size": "size on disk", "compressed": "compressed size", "latency": "p50 latency"}


def _finite(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _value(v) -> str:
    if v is True:
        return "on"
    if v is False:
        return "off"
    if isinstance(v, float):
        return f"{v:.4g}"  # a sampler's float (0.000383971698752...) read at a glance
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _ms(x) -> str:
    return f"{x:.3f}" if _finite(x) else DASH


def _metric(x) -> str:
    return f"{x:.4f}" if _finite(x) else DASH


def gates_cell(row: dict) -> str:
    if row.get("state") in ("running", "waiting"):
        return row["state"]
    if row.get("retried_as") is not None:
        return f"failed, retried as trial {row['retried_as']}"
    if row.get("error"):
        return "error"
    gates = row.get("gates") or []
    if not gates:
        return "no gates"
    held = sum(bool(g.get("passed")) for g in gates)
    failed = [g["name"] for g in gates if not g.get("passed")]
    return f"{held}/{len(gates)}" + (f" (failed: {', '.join(failed)})" if failed else "")


def sweep_table(sweep: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and string rows: one row per variant, the original first; ◆ on the Pareto front, ★ the best."""
    keys = list(sweep.get("grid") or {})
    rows = sweep.get("variants") or []
    batch = next((r.get("latency_batch") for r in rows if r.get("latency_batch")), None)
    b = f" b{batch.split('_')[-1]}" if batch else ""
    headers = ["variant", *keys, "size", "compressed", f"p50{b} ms", sweep.get("metric") or "metric", "gates", "front"]
    out = []
    original = sweep.get("original")
    if original:
        out.append(
            [
                "original",
                *[DASH for _ in keys],
                format_bytes(original.get("size_bytes")),
                format_bytes(original.get("compressed_bytes")),
                _ms(original.get("latency_ms")),
                _metric(original.get("metric")),
                DASH,
                "",
            ]
        )
    for r in rows:
        mark = ("★ best" if r.get("best") else "") + (" ◆" if r.get("pareto") else "")
        if r.get("state") in ("running", "waiting", "failed"):  # a study's trial not (or never) finished
            mark = r["state"]
        out.append(
            [
                r["name"],
                *[_value((r.get("values") or {}).get(k)) for k in keys],
                format_bytes(r.get("size_bytes")),
                format_bytes(r.get("compressed_bytes")),
                _ms(r.get("latency_ms")),
                _metric(r.get("metric")),
                gates_cell(r),
                mark.strip(),
            ]
        )
    return headers, out


def verdict(sweep: dict) -> str:
    n = len(sweep.get("variants") or [])
    what = "variants"
    if sweep.get("study"):
        n, what = (sweep["study"].get("counts") or {}).get("complete", 0), "finished trials"
    if sweep.get("best"):
        return f"best: {sweep['best']} (passes every gate, smallest {AXIS.get(str(sweep.get('minimize')), '')}) of {n} {what}"
    return f"no variant of {n} {what} passes every gate"


def progress_line(sweep: dict) -> str:
    """A study's progress: `12/40 trials done, 2 running, 1 failed (1 retried), front: 4`."""
    study = sweep.get("study") or {}
    c = study.get("counts") or {}
    parts = [f"{c.get('complete', 0)}/{study.get('trials', '?')} trials done"]
    parts += [f"{c[k]} {k}" for k in ("running", "waiting") if c.get(k)]
    if c.get("failed"):
        parts.append(f"{c['failed']} failed" + (f" ({c['retried']} retried)" if c.get("retried") else ""))
    parts.append(f"Pareto front: {len(sweep.get('pareto') or [])}")
    return ", ".join(parts)


def why_best(sweep: dict) -> list[str]:
    """Why the best variant was chosen, in sentences: its gates, the rule, where it sits on the front."""
    rows = sweep.get("variants") or []
    best = next((r for r in rows if r.get("best")), None)
    if best is None:
        return ["No finished variant passes every gate of the recipe: none is chosen, and OUT/best is absent."]
    passing = [r for r in rows if r.get("passed") and not r.get("error")]
    axis = AXIS.get(str(sweep.get("minimize")), "size")
    lines = [
        f"{best['name']} passes every gate of the recipe"
        + (
            ": "
            + "; ".join(
                f"{g['name']} {fmt_num(g.get('value'))} (limit {fmt_num(g.get('limit'))})"
                for g in best.get("gates") or []
            )
            if best.get("gates")
            else " (it has none)"
        )
        + ".",
        f"Of the {len(passing)} variants that pass, it has the smallest {axis}"
        + (" (ties go to the better metric)." if len(passing) > 1 else "."),
        "It is on the Pareto front."
        if best.get("pareto")
        else "It is not on the Pareto front: a variant failing a gate beats it.",
    ]
    return lines


# --------------------------------------------------------------------------- Markdown


def _md(x: str) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_sweep_markdown(sweep: dict) -> str:
    sweep = clean(sweep)
    headers, rows = sweep_table(sweep)
    lines = [
        f"# optcli sweep: {_md(sweep.get('recipe', ''))}",
        "",
        f"**{_md(verdict(sweep))}**",
        "",
        "| " + " | ".join(_md(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(_md(c) for c in row) + " |" for row in rows),
        "",
        f"◆ Pareto front ({AXIS.get(str(sweep.get('minimize')), '')} vs {_md(sweep.get('metric') or 'metric')}): "
        + (", ".join(sweep.get("pareto") or []) or DASH),
    ]
    for e in sweep.get("errors") or []:
        lines.append(f"- {_md(e['variant'])}: {_md(e['error'])}")
    if sweep.get("study"):
        lines += [
            "",
            f"Study {_md(sweep['study'].get('name'))} ({_md(sweep['study'].get('sampler'))}): {_md(progress_line(sweep))}",
        ]
        lines += ["", *(_md(line) for line in why_best(sweep))]
        for objective, imp in (sweep.get("importances") or {}).items():
            lines.append(
                f"- importance for {_md(objective)}: " + ", ".join(f"{_md(k)} {v:.2f}" for k, v in imp.items())
            )
    if sweep.get("busy"):
        lines += ["", f"> ⚠ {_md(sweep['busy'])}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML


def _x_text(minimize: str):
    return (lambda v: f"{fmt_ms(v)} ms") if minimize == "latency" else format_bytes


def render_sweep_html(sweep: dict) -> str:
    sweep = clean(sweep)
    minimize = sweep.get("minimize") or "size"
    headers, rows = sweep_table(sweep)
    offset = 1 if sweep.get("original") else 0
    variants = sweep.get("variants") or []

    def row_class(i: int) -> str:
        if i < offset:
            return ""
        r = variants[i - offset]
        return " ".join(c for c, on in (("best", r.get("best")), ("front", r.get("pareto"))) if on)

    points = [
        {
            "label": r["name"],
            "x": r.get("x"),
            "y": r.get("metric"),
            "front": r.get("pareto"),
            "best": r.get("best"),
            "passed": r.get("passed"),
        }
        for r in variants
    ]
    original = sweep.get("original")
    if original:
        points.append({"label": "original", "x": original.get("x"), "y": original.get("metric"), "original": True})
    xlabel = AXIS.get(minimize, minimize) + (" (ms)" if minimize == "latency" else "")
    if sweep.get("study"):
        chart = _study_charts(sweep, variants, original)
    else:
        chart = svg_pareto(points, xlabel, sweep.get("metric") or "metric", _x_text(minimize))
    vclass = "pass" if sweep.get("passed") else "fail"
    body = [
        f'<h1>optcli sweep <span class="verdict {vclass}">{escape(verdict(sweep))}</span></h1>',
        f'<p class="caveat">⚠ {escape(sweep["busy"])}</p>' if sweep.get("busy") else "",
        f"<p>Recipe: <code>{escape(str(sweep.get('recipe', '')))}</code>; "
        f"{len(variants)} variants; filled points pass every gate, green ones are on the Pareto front.</p>",
        '<div class="charts">',
        chart,
        "</div>",
        "<h2>Variants</h2>",
        f'<div class="scroll">{html_table(headers, rows, row_class, wide=True)}</div>',
    ]
    if sweep.get("study"):
        study = sweep["study"]
        body[2] = (
            f"<p>Recipe: <code>{escape(str(sweep.get('recipe', '')))}</code>; study <code>{escape(str(study.get('name')))}</code> "
            f"({escape(str(study.get('sampler')))} sampler, storage <code>{escape(str(study.get('storage')))}</code>): "
            f"{escape(progress_line(sweep))}. Objectives: "
            + ", ".join(
                f"{escape(o)} ({escape(d)})"
                for o, d in zip(study.get("objectives") or [], study.get("directions") or [], strict=False)
            )
            + ".</p>"
        )
        body.insert(
            6,
            "<h2>The chosen variant, and why</h2><ul>"
            + "".join(f"<li>{escape(x)}</li>" for x in why_best(sweep))
            + "</ul>",
        )
    errors = sweep.get("errors") or []
    if errors:
        body += [
            "<h2>Errors</h2>",
            "<ul>",
            *(f'<li class="fail">{escape(e["variant"])}: {escape(e["error"])}</li>' for e in errors),
            "</ul>",
        ]
    body.append("<p>Each variant's own report: <code>&lt;variant&gt;/report.html</code>.</p>")
    return html_page(f"optcli sweep: {verdict(sweep)}", body)


def _study_charts(sweep: dict, variants: list[dict], original: dict | None) -> str:
    """The Pareto front of a study: latency (x) vs the metric (y), size as the marker's area; the trial history;
    Optuna's parameter importances per objective."""
    sizes = [s for s in (r.get("size_bytes") for r in variants) if _finite(s)]
    smax = max(sizes) if sizes else 1

    def radius(size) -> float:
        return 3 + 7 * math.sqrt(size / smax) if _finite(size) and smax > 0 else 5

    points = [
        {
            "label": f"{r['name']} ({format_bytes(r.get('size_bytes'))})",
            "x": r.get("latency_ms"),
            "y": r.get("metric"),
            "front": r.get("pareto"),
            "best": r.get("best"),
            "passed": r.get("passed"),
            "r": radius(r.get("size_bytes")),
        }
        for r in variants
        if r.get("state") == "complete"
    ]
    if original:
        points.append(
            {"label": "original", "x": original.get("latency_ms"), "y": original.get("metric"), "original": True}
        )
    metric = sweep.get("metric") or "metric"
    objectives = (sweep.get("study") or {}).get("objectives") or []
    charts = [
        svg_pareto(
            points,
            "p50 latency (ms), marker area: size",
            metric,
            lambda v: f"{fmt_ms(v)} ms",
            stairs=len(objectives) == 2,
        )
    ]
    higher = sweep.get("higher_is_better", True)
    history = sorted(
        (
            {"trial": r["trial"], "y": r.get("metric") if r.get("state") == "complete" else None, "higher": higher}
            for r in variants
            if r.get("state") in ("complete", "failed")
        ),
        key=lambda p: p["trial"],
    )
    charts.append(svg_history(history, metric))
    for objective, imp in (sweep.get("importances") or {}).items():
        charts.append(
            svg_bar_chart(
                "importance",
                f"parameter importance for {objective} (Optuna)",
                list(imp),
                list(imp.values()),
                lambda v: f"{v:.2f}",
            )
        )
    return "".join(charts)


def write_sweep_reports(sweep: dict, out: Path) -> list[Path]:
    """sweep.json, sweep.md and sweep.html, rendered first and written together (none half-written)."""
    texts = (render_json(sweep), render_sweep_markdown(sweep), render_sweep_html(sweep))
    return atomic_write_texts(Path(out), dict(zip(SWEEP_FILES, texts, strict=True)))
