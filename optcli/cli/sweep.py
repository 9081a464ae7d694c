"""`optcli sweep`: every combination of a grid of recipe values run as its own run (core: optcli.verbs.sweeper), or
an Optuna study that workers anywhere can join (core: optcli.verbs.study).

Options shared with `run` come from optcli.cli.options; sweep's own (and those whose help differs) are below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.guard import ci_error, ci_results, err, guarded, print_json
from optcli.cli.options import (
    JUNIT_HELP,
    Debug,
    InconclusivePolicy,
    JsonOut,
    Overwrite,
    Quiet,
    TrustPickle,
    inconclusive_set,
)
from optcli.errors import EXIT_GATE, EXIT_OK

SweepRecipe = Annotated[
    Path | None,
    typer.Argument(metavar="RECIPE", help="YAML recipe (its sweep: grid: block, if any, is merged with --grid)"),
]
SweepOut = Annotated[
    Path | None,
    typer.Option("--out", "-o", metavar="DIR", help="output folder: one run per variant inside, sweep.json/md/html"),
]
Grid = Annotated[
    list[str],
    typer.Option(
        "--grid",
        metavar="KEY=V1,V2",
        help="a recipe key and its values: --grid passes.1.sparsity=0.3,0.5 (repeatable; passes.N=on,off)",
    ),
]
EverySet = Annotated[
    list[str],
    typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key in every variant (repeatable)"),
]
Jobs = Annotated[
    int, typer.Option("--jobs", "-j", min=1, metavar="N", help="variants run in parallel (worker processes)")
]
SweepResume = Annotated[bool, typer.Option("--resume", help="continue a sweep: finished steps and variants are reused")]
# A study: any of these makes the sweep an Optuna study (docs/sweeps.md)
Space = Annotated[
    Path | None,
    typer.Option(
        "--space", metavar="FILE", help="search space YAML: recipe keys -> ranges {low, high, log, step} or choices"
    ),
]
Sampler = Annotated[
    str | None,
    typer.Option("--sampler", metavar="NAME", help="grid, random, tpe or nsga2 (default: grid for lists, else tpe)"),
]
Trials = Annotated[
    int | None,
    typer.Option(
        "--trials", min=1, metavar="N", help="the study's budget, all workers together (default: the grid, or 20)"
    ),
]
TimeBudget = Annotated[
    float | None,
    typer.Option("--time-budget", min=1, metavar="SECONDS", help="this worker starts no trial after that long"),
]
Storage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="URL",
        help="the study's storage: a journal file (default OUT/study.journal), sqlite:///FILE, postgresql://...",
    ),
]
Study = Annotated[str | None, typer.Option("--study", metavar="NAME", help="the study's name (default: OUT's name)")]
Objectives = Annotated[
    list[str],
    typer.Option(
        "--objective",
        metavar="NAME",
        help="metric, latency, size or compressed (repeatable; default: metric latency size)",
    ),
]
Worker = Annotated[
    bool, typer.Option("--worker", help="join the study in OUT and run its trials until the budget is spent")
]
Status = Annotated[
    Path | None,
    typer.Option("--status", metavar="OUT", help="print a study's progress and current front; runs nothing"),
]
Heartbeat = Annotated[int, typer.Option("--heartbeat", min=1, hidden=True, metavar="S")]
Grace = Annotated[int, typer.Option("--grace", min=1, hidden=True, metavar="S")]
SweepJunit = Annotated[
    Path | None, typer.Option("--junit", metavar="FILE", help=JUNIT_HELP + " (one test suite per variant)")
]


def sweep(
    recipe: SweepRecipe = None,
    out: SweepOut = None,
    grid: Grid = [],  # noqa: B006 (never mutated: Typer reads it as the default)
    set_: EverySet = [],  # noqa: B006
    jobs: Jobs = 1,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
    overwrite: Overwrite = False,
    resume: SweepResume = False,
    trust_pickle: TrustPickle = False,
    junit: SweepJunit = None,
    inconclusive: InconclusivePolicy = None,
    space: Space = None,
    sampler: Sampler = None,
    trials: Trials = None,
    time_budget: TimeBudget = None,
    storage: Storage = None,
    study: Study = None,
    objective: Objectives = [],  # noqa: B006
    worker: Worker = False,
    status: Status = None,
    heartbeat: Heartbeat = 10,
    grace: Grace = 60,
):
    """Run variants of a recipe, each as its own run; print the table, the Pareto front and the best variant under the recipe's gates (OUT/best links to it). --grid alone runs every combination here; --space, --sampler, --trials, --storage or --worker make it an Optuna study that workers on any machine sharing OUT can join (docs/sweeps.md). Exit 0 when a variant passes every gate."""  # noqa: E501

    def body():
        from optcli import api
        from optcli.errors import BadInput
        from optcli.report.sweep import progress_line
        from optcli.report.terminal import console, feedback, render_sweep, show
        from optcli.verbs.sweeper import exit_code

        if status is not None:
            from optcli.verbs.study import study_status

            state = study_status(status, storage)
            if json_out:
                print_json(state)
            else:
                show(render_sweep(state))
                show(progress_line(state))
            return EXIT_OK
        if recipe is None or out is None:
            raise BadInput("optcli sweep: give RECIPE and -o OUT (or --status OUT)")
        knobs = (space, sampler, trials, time_budget, storage, study)
        is_study = any(k is not None for k in knobs) or worker or bool(objective)
        if is_study and resume:
            raise BadInput("a study resumes by running the same command again: drop --resume")
        stderr = console()
        progress = feedback(quiet)
        overrides = [*set_, *inconclusive_set(inconclusive)]
        try:
            if is_study:
                from optcli.verbs.study import StudyOptions, run_study

                options = StudyOptions(
                    out=out,
                    space=space,
                    grid=grid,
                    overrides=overrides,
                    sampler=sampler,
                    trials=trials,
                    time_budget=time_budget,
                    storage=storage,
                    study=study,
                    objectives=objective or None,
                    jobs=jobs,
                    worker=worker,
                    overwrite=overwrite,
                    heartbeat=heartbeat,
                    grace=grace,
                    quiet=quiet,
                    trust_pickle=trust_pickle,
                    log=progress.log,
                    progress=progress,
                )
                result = run_study(recipe, options)
            else:
                result = api.sweep(
                    recipe,
                    out,
                    grid,
                    overrides,
                    jobs=jobs,
                    overwrite=overwrite,
                    resume=resume,
                    quiet=quiet,
                    trust_pickle=trust_pickle,
                    log=progress.log,
                    progress=progress,
                ).data
        finally:
            progress.close()  # the live display ends before anything else is printed
        crashed = {"name": "run", "limit": None, "value": None, "passed": False}  # a variant whose pass failed
        suites = [
            (
                r["name"],
                r.get("gates") or ([{**crashed, "note": r["error"]}] if r.get("error") else []),
                r.get("seconds"),
            )
            for r in result["variants"]
            if r.get("state", "complete") in ("complete", "failed") and r.get("retried_as") is None  # a study's
        ]
        ci_results(junit, suites, out / "sweep.md")
        if json_out:
            print_json(result)
            if not quiet:
                stderr.print(render_sweep(result))
        elif not quiet:
            show(render_sweep(result))
            if result.get("study"):
                show(progress_line(result))
            show(
                f"wrote {out}/sweep.{{json,md,html}}" + (f"; {out}/best -> {result['best']}" if result["best"] else "")
            )
        code = exit_code(result)
        for e in result["errors"]:
            err(f"error: variant {e['variant']}: {e['error']}")
        if code == EXIT_GATE:
            err(f"no variant passes every gate (see {out}/sweep.json)")
        return code

    guarded(body, debug, ci_error("sweep", json_out, junit))
