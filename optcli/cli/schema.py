"""`optcli schema`: the recipe's JSON Schema, for editors; with --report, report.json's, for CI jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from optcli.cli.guard import print_json


def schema(
    report: Annotated[
        bool, typer.Option("--report", help="the JSON Schema of report.json instead (for CI jobs)")
    ] = False,
):
    """JSON Schema of recipes, for editor completion (yaml-language-server); with --report, of report.json."""
    if report:
        from optcli.passes import all_passes
        from optcli.report.model import report_json_schema

        print_json(report_json_schema({p.type: p.details for p in all_passes()}))
        return
    from optcli.recipe import recipe_model

    print_json(recipe_model().model_json_schema())
