"""Every Rich call of the run report: the steps table with gates, warnings, notes and pruned layers."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from optcli.report.view import (
    clean,
    compact_step_table,
    gate_lines,
    latency_notes,
    pruned_rows,
    step_table,
    steps,
    verdict,
    warning_lines,
)


def render_table(report: dict) -> Group:
    """A rich renderable: the steps table, then gates, warnings, notes and per-layer sparsity."""
    report = clean(report)
    headers, rows = compact_step_table(*step_table(report))
    table = Table(title=f"optcli report: {verdict(report)}", title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(c) for c in row))  # Text: no rich markup parsing of names
    parts: list[Any] = [table]
    if report.get("evaluation"):
        parts.append(Text(f"evaluation: {report['evaluation']}", style="dim"))
    for passed, line in gate_lines(report):
        parts.append(Text(line, style="green" if passed else "bold red"))
    for w in warning_lines(report):
        parts.append(Text(f"⚠ {w}", style="yellow"))
    for name, note in latency_notes(report):
        parts.append(Text(f"note ({name}): {note}", style="dim"))
    for step in steps(report):
        pruned = pruned_rows(step)
        if pruned:
            t = Table(title=Text(f"{step.get('name')}: most pruned layers"), title_justify="left")
            t.add_column("layer")
            t.add_column("sparsity", justify="right")
            for layer, sparsity in pruned:
                t.add_row(Text(layer), sparsity)
            parts.append(t)
    return Group(*parts)
