"""`optcli run`: a recipe's passes applied to its model; the artifact and report.json/md/html written to OUT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.guard import ci_error, ci_results, err, guarded, print_json
from optcli.cli.options import (
    Debug,
    InconclusivePolicy,
    JsonOut,
    Junit,
    Overwrite,
    Quiet,
    RecipeArg,
    Sets,
    Target,
    TrustPickle,
    inconclusive_set,
    target_set,
)
from optcli.errors import EXIT_GATE, EXIT_OK

MULTI_NODE = "Multi-node fine-tuning (torchrun's options)"

Resume = Annotated[
    bool, typer.Option("--resume", metavar="", help="reuse finished steps whose input and config are unchanged")
]
NprocPerNode = Annotated[
    str | None,
    typer.Option(
        "--nproc-per-node",
        metavar="N|auto",
        rich_help_panel=MULTI_NODE,
        help="finetune workers on this machine: N or auto (one per GPU); overrides the recipe",
    ),
]
Nnodes = Annotated[
    int | None,
    typer.Option(
        "--nnodes",
        metavar="N",
        rich_help_panel=MULTI_NODE,
        help="machines of a multi-node finetune; run the same command on each",
    ),
]
NodeRank = Annotated[
    int | None,
    typer.Option(
        "--node-rank", metavar="I", rich_help_panel=MULTI_NODE, help="this machine's index in a multi-node finetune"
    ),
]
RdzvEndpoint = Annotated[
    str | None,
    typer.Option(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        rich_help_panel=MULTI_NODE,
        help="host:port of the rendezvous on node 0 (multi-node)",
    ),
]


def run(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="output folder")],
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
    set_: Sets = [],  # noqa: B006 (never mutated: Typer reads it as the default)
    overwrite: Overwrite = False,
    resume: Resume = False,
    trust_pickle: TrustPickle = False,
    nproc_per_node: NprocPerNode = None,
    nnodes: Nnodes = None,
    node_rank: NodeRank = None,
    rdzv_endpoint: RdzvEndpoint = None,
    target: Target = None,
    junit: Junit = None,
    inconclusive: InconclusivePolicy = None,
):
    """Apply a recipe's passes to its model; write the artifact and report.json/md/html to OUT."""

    def body():
        from optcli import api
        from optcli.report.terminal import console, feedback, render_table, show

        stderr = console()
        progress = feedback(quiet)
        launch = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank}
        launch["rdzv_endpoint"] = rdzv_endpoint
        try:
            report = api.run(
                recipe,
                out,
                [*set_, *target_set(target), *inconclusive_set(inconclusive)],
                overwrite=overwrite,
                resume=resume,
                quiet=quiet,
                trust_pickle=trust_pickle,
                log=progress.log,
                progress=progress,
                distributed=launch,
                debug=debug,
            ).data
        finally:
            progress.close()  # the live display ends before anything else is printed
        ci_results(junit, [("run", report["gates"], report.get("seconds"))], out / "report.md")
        if json_out:
            print_json(report)
            if not quiet:
                stderr.print(render_table(report))
        elif not quiet:
            show(render_table(report))
            from optcli.report.view import shown_path

            show(f"wrote {shown_path(report['output']['path'])} and {shown_path(out)}/report.{{json,md,html}}")
        failed = [g["name"] for g in report["gates"] if not g["passed"]]
        if failed:
            err(f"gate failed: {', '.join(failed)} (see {out}/report.json)")
            return EXIT_GATE
        return EXIT_OK

    guarded(body, debug, ci_error("run", json_out, junit))
