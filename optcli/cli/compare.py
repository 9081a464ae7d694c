"""`optcli compare`: what changed between two runs, and regression limits for CI (core: optcli.verbs.compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.guard import ci_error, err, guarded, print_json
from optcli.cli.options import Debug, InconclusivePolicy, JsonOut
from optcli.errors import EXIT_GATE, EXIT_OK


def compare(
    report: Annotated[Path, typer.Argument(metavar="NEW", help="report.json of the new run")],
    baseline: Annotated[Path, typer.Argument(metavar="OLD", help="report.json to compare against")],
    json_out: JsonOut = False,
    debug: Debug = False,
    max_latency_regression: Annotated[
        float | None,
        typer.Option(
            "--max-latency-regression",
            min=0,
            metavar="FRACTION",
            help="exit 1 if p50 latency grew by more than this fraction (0.05)",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop", min=0, metavar="X", help="exit 1 if the metric dropped by more than this (0.005)"
        ),
    ] = None,
    max_size_growth: Annotated[
        float | None,
        typer.Option(
            "--max-size-growth",
            min=0,
            metavar="FRACTION",
            help="exit 1 if the size on disk grew by more than this fraction (0.02)",
        ),
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", metavar="FILE", help="also write the regression checks as JUnit XML")
    ] = None,
    inconclusive: InconclusivePolicy = None,
):
    """What changed between two runs' final artifacts (size, latency, accuracy, fidelity); with --max-* limits, exit 1 when the new run regressed against the baseline."""  # noqa: E501 (one paragraph: Rich keeps docstring line breaks)

    def body():
        from optcli.report.terminal import render_checks, render_comparison, show
        from optcli.verbs.compare import compare_reports, explain, regression_checks

        result = compare_reports(report, baseline)
        limits = (max_latency_regression, max_accuracy_drop, max_size_growth)
        policy = inconclusive.value if inconclusive is not None else "pass"
        checks = regression_checks(report, baseline, *limits, policy) if any(v is not None for v in limits) else []
        if checks:
            result = {**result, "checks": checks, "passed": all(c["passed"] for c in checks)}
        print_json(result) if json_out else show(render_comparison(result, explain(report, baseline)))
        if checks and not json_out:
            show(render_checks(checks))
        if junit is not None:
            from optcli.errors import writing
            from optcli.report.ci import write_junit

            with writing(junit):
                write_junit(junit, [("compare", checks, None)])
        failed = [c["name"] for c in checks if not c["passed"]]
        if failed:
            err(f"regression: {', '.join(failed)} ({report} vs {baseline})")
            return EXIT_GATE
        return EXIT_OK

    guarded(body, debug, ci_error("compare", json_out, junit))
