"""`optcli init`: a starter recipe for a model file (core: optcli.verbs.starter)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.guard import err, guarded
from optcli.cli.options import Debug, TrustPickle


def init(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="model file the recipe starts from")],
    factory: Annotated[
        str | None,
        typer.Option(
            "--factory", metavar="MODULE:FN", help="module:callable that builds the module (state_dict files)"
        ),
    ] = None,
    shape: Annotated[
        list[str],
        typer.Option(
            "--shape",
            metavar="NAME=1x1x8x8",
            help="input shape where the file does not fix it: name=1x1x8x8[:dtype]",
        ),
    ] = [],  # noqa: B006 (never mutated: Typer reads it as the default)
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            metavar="FILE.npz",
            help="real inputs keyed by input name, checked against the model: a CNN calibrates on its first half and "
            "is measured on the second",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="FILE", help="write the recipe to FILE (paths relative to it), not stdout"
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="replace an existing --output FILE")
    ] = False,
    trust_pickle: TrustPickle = False,
    debug: Debug = False,
):
    """Write a starter recipe for MODEL (inputs read from the file, data checked against them) to stdout or --output."""

    def body():
        from optcli.errors import BadInput, writing
        from optcli.verbs.starter import starter_recipe

        if output is not None and any(p is not None and output.resolve() == p.resolve() for p in (model, data)):
            raise BadInput(f"--output {output} is an input of init; give the recipe a name of its own (recipe.yaml)")
        if output is not None and output.exists() and not overwrite:
            raise BadInput(f"--output {output} exists; pass --overwrite to replace it, or choose another name")
        if output is not None and output.is_dir():
            raise BadInput(f"--output {output} is a folder; give a file name such as {output}/recipe.yaml")
        start = starter_recipe(
            model,
            factory=factory,
            shapes=shape,
            data=data,
            trust_pickle=trust_pickle,
            recipe_dir=output.parent if output is not None else None,
        )
        for note in start.notes:
            err(f"optcli init: {note}")
        if output is None:
            sys.stdout.write(start.text)
            return
        from optcli.report.write import atomic_write_text

        with writing(output):
            atomic_write_text(output, start.text)
        err(f"wrote {output} (`optcli validate {output}` checks it)")

    guarded(body, debug)
