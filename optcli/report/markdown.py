"""report.md: the report as GitHub-flavoured Markdown tables, safe for any step or layer name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from optcli.report.summary import summary
from optcli.report.view import (
    ENV_HEADERS,
    FIDELITY_HEADERS,
    GENERATION_HEADERS,
    INT8_OP_HEADERS,
    IO_HEADERS,
    LATENCY_HEADERS,
    SEARCH_HEADERS,
    TRAINING_HEADERS,
    clean,
    env_rows,
    fidelity_rows,
    fmt_num,
    gate_lines,
    generation_line,
    generation_rows,
    graph_change_lines,
    int8_op_rows,
    int8_profile_summary,
    io_rows,
    latency_notes,
    latency_rows,
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


def md_cell(x: Any) -> str:
    """One table cell: pipes escaped, one line, no raw HTML (< and > as entities)."""
    text = str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def md_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    report = clean(report)
    out = [f"# optcli report: {verdict(report)}", ""]
    if report.get("evaluation"):
        out += [f"Evaluation: {md_cell(report['evaluation'])}", ""]
    facts = summary(report)
    if facts["verdict"]:
        out += [f"**{md_cell(facts['verdict'])}**", ""]
    for caveat in (facts["slower"], facts["busy"]):
        if caveat:
            out += [f"> **⚠ {md_cell(caveat)}**", ""]
    headers, rows = step_table(report)
    out += ["## Steps", "", md_table(headers, rows), "", md_cell(ratio_legend(report)), ""]
    actions = step_actions(report)
    if actions:
        out += ["## What each step did", ""] + [f"- **{md_cell(n)}**: {md_cell(a)}" for n, a in actions] + [""]
    out += ["## Gates", ""]
    gates = gate_lines(report)
    out += [md_table(["gate"], [[g] for _, g in gates]) if gates else "No gates.", ""]
    out += ["## Warnings", ""]
    out += [f"- {md_cell(w)}" for w in warning_lines(report)] or ["None."]
    out.append("")
    for name, note in latency_notes(report):
        out += [f"> latency note ({md_cell(name)}): {md_cell(note)}", ""]
    lat = latency_rows(report)
    if lat:
        out += ["## Latency", "", md_table(LATENCY_HEADERS, lat), ""]
    gen = generation_rows(report)
    if gen:
        out += ["## Generation", "", md_table(GENERATION_HEADERS, gen), "", md_cell(generation_line(report)), ""]
    for step in steps(report):
        out += _step_details(step)
    out += ["## Files", "", md_table(IO_HEADERS, io_rows(report)), ""]
    out += ["## Environment", "", md_table(ENV_HEADERS, env_rows(report)), ""]
    return "\n".join(out)


def _step_details(step: dict) -> list[str]:
    name = md_cell(step.get("name"))
    out: list[str] = []
    fid = fidelity_rows(step)
    if fid:
        out += [f"## {name}: fidelity per output", "", md_table(FIDELITY_HEADERS, fid), ""]
    pruned = pruned_rows(step)
    if pruned:
        out += [f"## {name}: most pruned layers", "", md_table(["layer", "sparsity"], pruned), ""]
    if training_epochs(step):
        summary = training_summary(step)
        out += [
            f"## {name}: training",
            "",
            *([md_cell(summary), ""] if summary else []),
            md_table(TRAINING_HEADERS, training_rows(step)),
            "",
        ]
    changes = graph_change_lines(step)
    if changes:
        out += [f"## {name}: graph changes", "", *[f"- {md_cell(c)}" for c in changes], ""]
    cands, target = search_candidates(step)
    if cands:
        out += [f"## {name}: search (target {fmt_num(target)})", "", md_table(SEARCH_HEADERS, search_rows(step)), ""]
    out += _int8_sections(step, name)
    return out


def _int8_sections(step: dict, name: str) -> list[str]:
    out: list[str] = []
    ops = int8_op_rows(step)
    if ops:
        out += [
            f"## {name}: int8 per op type",
            "",
            md_cell(int8_profile_summary(step)),
            "",
            md_table(INT8_OP_HEADERS, ops),
            "",
        ]
    sens = sensitivity_rows(step)
    if sens:
        out += [f"## {name}: per-node sensitivity", "", md_table(sensitivity_headers(step), sens), ""]
    return out
