"""`optcli sweep`: every combination of a grid of recipe values run as its own run (core: optcli.verbs.sweeper).

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
from optcli.errors import EXIT_GATE

SweepRecipe = Annotated[
    Path, typer.Argument(metavar="RECIPE", help="YAML recipe (its sweep: grid: block, if any, is merged with --grid)")
]
SweepOut = Annotated[
    Path,
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
SweepJunit = Annotated[
    Path | None, typer.Option("--junit", metavar="FILE", help=JUNIT_HELP + " (one test suite per variant)")
]


def sweep(
    recipe: SweepRecipe,
    out: SweepOut,
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
):
    """Run every combination of a grid of recipe values as its own run; print the table, the Pareto front and the best variant under the recipe's gates (OUT/best links to it). Exit 0 when a variant passes every gate."""  # noqa: E501

    def body():
        from optcli import api
        from optcli.report.terminal import console, feedback, render_sweep, show
        from optcli.verbs.sweeper import exit_code

        stderr = console()
        progress = feedback(quiet)
        try:
            result = api.sweep(
                recipe,
                out,
                grid,
                [*set_, *inconclusive_set(inconclusive)],
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
        ]
        ci_results(junit, suites, out / "sweep.md")
        if json_out:
            print_json(result)
            if not quiet:
                stderr.print(render_sweep(result))
        elif not quiet:
            show(render_sweep(result))
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
