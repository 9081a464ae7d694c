"""`optcli bench`: latency percentiles of a model file (core: optcli.verbs.bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optcli.cli.guard import guarded, print_json
from optcli.cli.options import Debug, JsonOut


def bench(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="model file (.onnx or .pt2)")],
    shape: Annotated[
        list[str], typer.Option("--shape", metavar="NAME=1x3x32x32", help="input shape (repeatable)")
    ] = [],  # noqa: B006 (never mutated: Typer reads it as the default)
    batch: Annotated[list[int], typer.Option("--batch", metavar="N", help="batch size (repeatable)")] = [1],  # noqa: B006
    threads: Annotated[
        int,
        typer.Option("--threads", min=1, metavar="N", help="intra-op threads of the runtime (match your deployment)"),
    ] = 2,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, metavar="N", help="untimed runs first (caches, lazy init)")
    ] = 10,
    runs: Annotated[
        int, typer.Option("--runs", min=1, metavar="N", help="timed runs per batch size (percentiles)")
    ] = 100,
    json_out: JsonOut = False,
    debug: Debug = False,
):
    """Latency percentiles and throughput of a model file (ONNX Runtime or torch)."""

    def body():
        from optcli.report.terminal import render_bench, show
        from optcli.verbs.bench import bench_model

        result = bench_model(model, shapes=shape, batch_sizes=batch, threads=threads, warmup=warmup, runs=runs)
        print_json(result) if json_out else show(render_bench(result))

    guarded(body, debug)
