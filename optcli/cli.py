"""The optcli command line. Thin: parse, call one library function, render.

torch / onnxruntime are imported inside commands only, so `optcli --help` stays instant.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from optcli.errors import EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK, EXIT_PASS_FAILED

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optimize saved models (int8, pruning, distillation, export) and report size, latency and accuracy honestly.",
)

DEBUG_HELP = "show the full traceback on errors"
JSON_HELP = "print only JSON on stdout (human text goes to stderr)"


def _err(message: str) -> None:
    # One line always: library messages can carry newlines and terminal colour codes (torch's do).
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())
    sys.stderr.write(message + "\n")


def guarded(fn: Callable[[], int | None], debug: bool) -> None:
    """Run a command body; map errors to exit codes with one line on stderr (traceback with --debug)."""
    from optcli.errors import DISK_FULL, OptcliError, first_line

    def _sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _sigterm)
    debug = debug or os.environ.get("OPTCLI_DEBUG") == "1"
    try:
        code = fn() or 0
    except OptcliError as e:
        if debug:
            import traceback

            traceback.print_exc()
        _err(f"error: {e}")
        code = e.exit_code
    except KeyboardInterrupt:
        _err("interrupted: nothing half-written was left at the output paths")
        code = EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            import traceback

            traceback.print_exc()
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # a write no writing() block named
            _err(f"error: disk full while writing {e.filename or 'output'}: free some space and rerun")
        else:
            _err(
                f"error: internal error: {type(e).__name__}: {first_line(e, 1000)} (rerun with --debug for the traceback)"
            )
        code = EXIT_PASS_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress or table; errors still go to stderr"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key: --set passes.1.per_channel=true"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
    resume: bool = typer.Option(False, "--resume", help="reuse finished steps whose input and config are unchanged"),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="allow unpickling a full torch module (runs code from the file)"
    ),
    nproc_per_node: str | None = typer.Option(
        None, "--nproc-per-node", help="finetune workers on this machine: N or auto (one per GPU); overrides the recipe"
    ),
    nnodes: int | None = typer.Option(
        None, "--nnodes", help="machines of a multi-node finetune; run the same command on each"
    ),
    node_rank: int | None = typer.Option(None, "--node-rank", help="this machine's index in a multi-node finetune"),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="host:port of the rendezvous on node 0 (multi-node)"
    ),
    target: str | None = typer.Option(
        None, "--target", help="cpu | cuda | tensorrt | openvino: where the report measures; overrides report.target"
    ),
):
    """Apply a recipe's passes to its model; write the artifact and report.json/md/html to OUT."""

    def body():
        from optcli.passes.finetune.launch import cli_overrides
        from optcli.recipe import load_recipe
        from optcli.report.terminal import console, render_table, show, step_log
        from optcli.runner import RunOptions, run_recipe

        err = console()
        log = (lambda m: None) if quiet else step_log(err)
        rec = load_recipe(recipe, overrides=[*set_, *([f"report.target={target}"] if target else [])])
        launch = cli_overrides(
            rec, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint
        )
        report = run_recipe(
            rec,
            RunOptions(
                out=out,
                overwrite=overwrite,
                resume=resume,
                quiet=quiet,
                trust_pickle=trust_pickle,
                log=log,
                extra={"distributed": launch, "debug": debug},
            ),
        )
        if json_out:
            _print_json(report)
            if not quiet:
                err.print(render_table(report))
        elif not quiet:
            show(render_table(report))
            show(f"wrote {report['output']['path']} and {out}/report.{{json,md,html}}")
        failed = [g["name"] for g in report["gates"] if not g["passed"]]
        if failed:
            _err(f"gate failed: {', '.join(failed)} (see {out}/report.json)")
            return EXIT_GATE
        return EXIT_OK

    guarded(body, debug)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key: --set passes.1.per_channel=true"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="allow unpickling a full torch module (runs code from the file)"
    ),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    target: str | None = typer.Option(
        None, "--target", help="cpu | cuda | tensorrt | openvino: where the report measures; overrides report.target"
    ),
):
    """Check a recipe (keys, types, files, pass order, model and data files) without running any pass."""

    def body():
        from optcli.recipe import load_recipe
        from optcli.runner import preflight

        rec = load_recipe(recipe, overrides=[*set_, *([f"report.target={target}"] if target else [])])
        preflight(rec, trust_pickle)
        resolved = rec.model_dump(mode="json")
        if json_out:
            _print_json({"valid": True, "recipe": resolved})
        else:
            steps = " -> ".join(["original", *[f"{i + 1}-{p.type}" for i, p in enumerate(rec.passes)]])
            _err(f"{recipe}: valid ({steps})")

    guarded(body, debug)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="model file (.onnx, .pt/.pth, .pt2, .safetensors)"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow unpickling a full torch module"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """Parameters, sparsity, dtypes, ops, inputs and outputs of a model file."""

    def body():
        from optcli.inspect import inspect_model
        from optcli.report.terminal import render_inspection, show

        info = inspect_model(model, trust_pickle=trust_pickle)
        _print_json(info) if json_out else show(render_inspection(info))

    guarded(body, debug)


@app.command()
def bench(
    model: Path = typer.Argument(..., help="model file (.onnx or .pt2)"),
    shape: list[str] = typer.Option([], "--shape", help="input shape, name=1x3x32x32 (repeatable)"),
    batch: list[int] = typer.Option([1], "--batch", help="batch size (repeatable)"),
    threads: int = typer.Option(2, "--threads", min=1),
    warmup: int = typer.Option(10, "--warmup", min=0),
    runs: int = typer.Option(100, "--runs", min=1),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """Latency percentiles and throughput of a model file (ONNX Runtime or torch)."""

    def body():
        from optcli.bench import bench_model
        from optcli.report.terminal import render_bench, show

        result = bench_model(model, shapes=shape, batch_sizes=batch, threads=threads, warmup=warmup, runs=runs)
        _print_json(result) if json_out else show(render_bench(result))

    guarded(body, debug)


@app.command()
def passes(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Every pass with its options, types and defaults."""
    from optcli.catalog import pass_catalog
    from optcli.report.terminal import render_pass_catalog, show

    catalog = pass_catalog()
    _print_json(catalog) if json_out else show(render_pass_catalog(catalog))


@app.command()
def schema():
    """JSON Schema of recipes, for editor completion (yaml-language-server)."""
    from optcli.recipe import recipe_model

    _print_json(recipe_model().model_json_schema())


@app.command()
def init(
    model: Path = typer.Argument(..., help="model file the recipe starts from"),
    factory: str | None = typer.Option(
        None, "--factory", help="module:callable that builds the module (state_dict files)"
    ),
    shape: list[str] = typer.Option(
        [], "--shape", help="input shape where the file does not fix it: name=1x1x8x8[:dtype]"
    ),
    data: Path | None = typer.Option(
        None, "--data", help="a .npz of real inputs keyed by input name: calibration and eval for int8 (CNNs)"
    ),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """Print a starter recipe for MODEL (inputs filled in from the file) to stdout."""

    def body():
        from optcli.starter import starter_recipe

        sys.stdout.write(starter_recipe(model, factory=factory, shapes=shape, data=data))

    guarded(body, debug)


@app.command()
def compare(
    report: Path = typer.Argument(..., help="report.json of the new run"),
    baseline: Path = typer.Argument(..., help="report.json to compare against"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """What changed between two runs' final artifacts (size, latency, accuracy, fidelity)."""

    def body():
        from optcli.compare import compare_reports
        from optcli.report.terminal import render_comparison, show

        result = compare_reports(report, baseline)
        _print_json(result) if json_out else show(render_comparison(result))

    guarded(body, debug)


def main() -> None:
    # A signal before a command's own handler is in place (start-up, option parsing) must still exit 130, not
    # click's "Aborted!" 1: note that one arrived, behave as the default handler does, and map the exit code.
    interrupted: list[int] = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        app()
    except SystemExit as e:
        if interrupted and e.code == 1:
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise
