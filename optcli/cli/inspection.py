"""`optcli inspect`: what a model file holds (core: optcli.verbs.inspection)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.guard import guarded, print_json
from optcli.cli.options import Debug, JsonOut


def inspect(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="model file (.onnx, .pt/.pth, .pt2, .safetensors)")],
    json_out: JsonOut = False,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", metavar="", help="allow unpickling a full torch module")
    ] = False,
    debug: Debug = False,
):
    """Parameters, sparsity, dtypes, ops, inputs and outputs of a model file."""

    def body():
        from optcli.report.terminal import render_inspection, show
        from optcli.verbs.inspection import inspect_model

        info = inspect_model(model, trust_pickle=trust_pickle)
        print_json(info) if json_out else show(render_inspection(info))

    guarded(body, debug)
