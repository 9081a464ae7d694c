"""The report's document, built once from the typed report: the head, then sections in the order every renderer
draws them (steps, what each did, gates, warnings, charts, latency, each step's own sections, files, environment).
Each step's sections and sentence come from its pass type's view (passviews.py)."""

from __future__ import annotations

from optcli.report.model import Report, clean, report_of
from optcli.report.passviews import view_for
from optcli.report.sections import Block, Chart, Charts, Checks, Document, Items, Notes, Section, Table, Text
from optcli.report.summary import summary
from optcli.report.view import (
    ENV_HEADERS,
    GENERATION_HEADERS,
    IO_HEADERS,
    LATENCY_HEADERS,
    compact_step_table,
    env_rows,
    gate_lines,
    generation_line,
    generation_rows,
    io_rows,
    latency_notes,
    latency_rows,
    ratio_legend,
    step_table,
    verdict,
)


def build_document(report: Report | dict) -> Document:
    typed = report_of(clean(report))
    raw = typed.to_dict()
    facts = summary(raw)
    sections = [Section("steps", "Steps", [Table(*step_table(typed), wide=True), Text(ratio_legend(typed), "note")])]
    actions = step_actions(typed)
    if actions:
        sections.append(Section("actions", "What each step did", [Items(actions)]))
    sections.append(Section("gates", "Gates", [Checks(gate_lines(typed))]))
    warnings = Items([(None, str(w)) for w in typed.warnings], empty="None.", tone="warn")
    sections.append(Section("warnings", "Warnings", [warnings, Notes(latency_notes(typed))]))
    sections.append(Section("charts", "Charts", [Charts([Chart("summary", typed)])]))
    latency = latency_rows(typed)
    if latency:
        sections.append(Section("latency", "Latency", [Table(LATENCY_HEADERS, latency)]))
    generation = generation_rows(typed)
    if generation:
        table = Table(GENERATION_HEADERS, generation, drop=("export RSS", "greedy agreement"))
        blocks: list[Block] = [table, Text(generation_line(typed), "note")]
        sections.append(Section("generation", "Generation", blocks, terminal=True))
    for step in typed.steps:
        sections += view_for(step.type).sections(step)
    sections.append(Section("files", "Files", [Table(IO_HEADERS, io_rows(typed))]))
    sections.append(Section("environment", "Environment", [Table(ENV_HEADERS, env_rows(typed))]))
    return Document(
        verdict=verdict(typed),
        passed=typed.passed,
        evaluation=typed.evaluation or None,
        sentence=facts["verdict"],
        caveats=[(kind, facts[kind]) for kind in ("slower", "busy") if facts[kind]],
        compact=Table(*compact_step_table(typed)),
        terminal_legend=ratio_legend(typed, terminal=True),
        sections=sections,
    )


def step_actions(report: Report) -> list[tuple[str | None, str]]:
    """(step name, what it did) for every step after the original, from the resolved recipe and its details."""
    configs = [c for c in (report.recipe or {}).get("passes") or [] if isinstance(c, dict)]
    return [
        (str(step.name), view_for(step.type).action(step, config))
        for step, config in zip(report.steps[1:], configs, strict=False)
    ]
