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
from enum import Enum
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from optcli import __version__
from optcli.errors import EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK, EXIT_PASS_FAILED


class _FlagHelp:
    """Help pages that read like a CLI's: flags without a "<bool>" beside them, arguments shown by their metavar
    (RECIPE, MODEL) without Typer's "<path>" type and usage as `optcli run [OPTIONS] RECIPE`, not `{RECIPE}`."""

    def get_help_option(self, ctx):
        # --help is a flag: no "<bool>" type beside it on the help page
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.param_type_name == "argument":
                param.display_type_rich = lambda ctx: None  # the metavar says it; "<path>" is Python's word
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):
        # Typer writes a required argument as {RECIPE}; a CLI's usage line says RECIPE (optional ones stay [NAME])
        return [re.sub(r"^\{(.*)\}((?:\.\.\.)?)$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


class PlainCommand(_FlagHelp, TyperCommand):
    """A command whose help page shows --help as a flag."""


class PlainErrorsGroup(_FlagHelp, TyperGroup):
    """Usage errors (unknown option or command, bad value) as one `error:` line, like optcli's own errors.

    Typer draws them in a boxed Rich panel beside the plain lines optcli prints; a user (and a log grep) should
    meet one style. Help pages keep their Rich panels.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except Exception as e:
            # click's ClickException family (vendored inside typer): duck-typed, not imported from a private module
            if not (standalone_mode and hasattr(e, "format_message") and hasattr(e, "exit_code")):
                raise
            message = usage_message(e.format_message(), getattr(e, "ctx", None))
            if message:
                _err(f"error: {message}")
            sys.exit(e.exit_code)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else EXIT_OK)
        return rv


def usage_message(text: str, ctx) -> str:
    """click's usage text in optcli's voice: lower case, a did-you-mean, and where the options are listed."""
    text = " ".join(text.split())
    if not text:
        return ""  # no arguments: the help page was printed already
    command = (ctx.command_path if ctx is not None else "optcli") or "optcli"
    hit = re.match(r"No such option: (\S+) \(Possible options: ([^)]*)\)", text)
    if hit:
        return f"no such option {hit[1]}: did you mean {hit[2]}? (`{command} --help` lists the options)"
    hit = re.match(r"No such option: (\S+)", text)
    if hit:
        return f"no such option {hit[1]} (`{command} --help` lists the options)"
    hit = re.match(r"No such command '([^']*)'\. Did you mean '([^']*)'\?", text)
    if hit:
        return f"no such command {hit[1]!r}: did you mean {hit[2]!r}? (`optcli --help` lists the commands)"
    hit = re.match(r"No such command '([^']*)'", text)
    if hit:
        return f"no such command {hit[1]!r} (`optcli --help` lists the commands)"
    return f"{text[0].lower()}{text[1:]} (`{command} --help` for the usage)"


app = typer.Typer(
    cls=PlainErrorsGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optimize saved models (int8, pruning, distillation, export) and report size, latency and accuracy honestly.",
)

DEBUG_HELP = "show the full traceback on errors"
MULTI_NODE = "Multi-node fine-tuning (torchrun's options)"


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"optcli {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="print optcli's version and exit"
    ),
) -> None:
    """Optimize saved models (int8, pruning, distillation, export) and report size, latency and accuracy honestly."""


JSON_HELP = "print only JSON on stdout (human text goes to stderr)"
JUNIT_HELP = "also write the gates as JUnit XML test cases to this file (CI test reporters read it)"


def _err(message: str) -> None:
    # One line always: library messages can carry newlines and terminal colour codes (torch's do).
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())
    sys.stderr.write(message + "\n")


def guarded(fn: Callable[[], int | None], debug: bool, on_error: Callable[[str, str, int], None] | None = None) -> None:
    """Run a command body; map errors to exit codes with one line on stderr (traceback with --debug).

    on_error(message, kind, exit_code) reports an error where CI reads results too (--json, --junit)."""
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
        _report_error(on_error, str(e), type(e).__name__, code)
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
        _report_error(on_error, f"internal error: {type(e).__name__}: {first_line(e, 1000)}", "InternalError", code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


def _report_error(on_error, message: str, kind: str, code: int) -> None:
    if on_error is None:
        return
    try:
        on_error(" ".join(message.split()), kind, code)
    except Exception as e:  # the error already printed is the one to see; this one is said after it
        _err(f"error: could not report the error for CI: {type(e).__name__}: {e}")


def ci_error(command: str, json_out: bool, junit: Path | None) -> Callable[[str, str, int], None]:
    """--json gets {"error", "exit_code"} on stdout, --junit one <error> test case: a CI job that reads either
    sees why the run stopped instead of nothing."""

    def report(message: str, kind: str, code: int) -> None:
        if json_out:
            _print_json({"error": message, "exit_code": code})
        if junit is not None:
            from optcli.report.ci import junit_error_xml
            from optcli.report.write import atomic_write_text

            atomic_write_text(junit, junit_error_xml(command, message, kind))

    return report


def _ci_results(junit: Path | None, suites: list, markdown: Path) -> None:
    """--junit PATH gets the gates as JUnit XML; a GitHub Actions job summary gets the Markdown report."""
    from optcli.errors import writing
    from optcli.report.ci import append_step_summary, write_junit

    if junit is not None:
        if junit.absolute().parent == markdown.absolute().parent:  # in OUT: optcli's, so --overwrite replaces it
            from optcli import owned

            with writing(markdown.parent / owned.MARKER):
                owned.record(markdown.parent, junit.name)
        with writing(junit):
            write_junit(junit, suites)
    with writing(os.environ.get("GITHUB_STEP_SUMMARY") or "$GITHUB_STEP_SUMMARY"):
        append_step_summary(markdown.read_text(encoding="utf-8"))


INCONCLUSIVE_HELP = (
    "pass | fail: how a speed gate counts when its confidence interval straddles the limit (a noisy machine); "
    "overrides gates.inconclusive (default pass)"
)


class Inconclusive(str, Enum):
    pass_ = "pass"
    fail = "fail"


def _inconclusive_option():
    return typer.Option(None, "--inconclusive", metavar="pass|fail", help=INCONCLUSIVE_HELP, case_sensitive=False)


def _inconclusive_set(choice: Inconclusive | None) -> list[str]:
    # Through the recipe key, so the report's resolved recipe records the choice the exit code followed.
    return [f"gates.inconclusive={choice.value}"] if choice is not None else []


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command(cls=PlainCommand)
def run(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="YAML recipe"),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="output folder"),
    json_out: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", metavar="", help="no progress or table; errors still go to stderr"
    ),
    debug: bool = typer.Option(False, "--debug", metavar="", help=DEBUG_HELP),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="override a recipe key: --set passes.1.per_channel=true"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="replace what optcli wrote in OUT"),
    resume: bool = typer.Option(
        False, "--resume", metavar="", help="reuse finished steps whose input and config are unchanged"
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", metavar="", help="allow unpickling a full torch module (runs code from the file)"
    ),
    nproc_per_node: str | None = typer.Option(
        None,
        "--nproc-per-node",
        metavar="N|auto",
        rich_help_panel=MULTI_NODE,
        help="finetune workers on this machine: N or auto (one per GPU); overrides the recipe",
    ),
    nnodes: int | None = typer.Option(
        None,
        "--nnodes",
        metavar="N",
        rich_help_panel=MULTI_NODE,
        help="machines of a multi-node finetune; run the same command on each",
    ),
    node_rank: int | None = typer.Option(
        None,
        "--node-rank",
        metavar="I",
        rich_help_panel=MULTI_NODE,
        help="this machine's index in a multi-node finetune",
    ),
    rdzv_endpoint: str | None = typer.Option(
        None,
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        rich_help_panel=MULTI_NODE,
        help="host:port of the rendezvous on node 0 (multi-node)",
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        metavar="NAME",
        help="cpu | cuda | tensorrt | openvino: where the report measures; overrides report.target",
    ),
    junit: Path | None = typer.Option(None, "--junit", metavar="FILE", help=JUNIT_HELP),
    inconclusive: Inconclusive | None = _inconclusive_option(),
):
    """Apply a recipe's passes to its model; write the artifact and report.json/md/html to OUT."""

    def body():
        from optcli import api
        from optcli.report.terminal import console, feedback, render_table, show

        err = console()
        progress = feedback(quiet)
        launch = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank}
        launch["rdzv_endpoint"] = rdzv_endpoint
        try:
            report = api.run(
                recipe,
                out,
                [*set_, *([f"report.target={target}"] if target else []), *_inconclusive_set(inconclusive)],
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
        _ci_results(junit, [("run", report["gates"], report.get("seconds"))], out / "report.md")
        if json_out:
            _print_json(report)
            if not quiet:
                err.print(render_table(report))
        elif not quiet:
            show(render_table(report))
            from optcli.report.view import shown_path

            show(f"wrote {shown_path(report['output']['path'])} and {shown_path(out)}/report.{{json,md,html}}")
        failed = [g["name"] for g in report["gates"] if not g["passed"]]
        if failed:
            _err(f"gate failed: {', '.join(failed)} (see {out}/report.json)")
            return EXIT_GATE
        return EXIT_OK

    guarded(body, debug, ci_error("run", json_out, junit))


@app.command(cls=PlainCommand)
def validate(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="YAML recipe"),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="override a recipe key: --set passes.1.per_channel=true"
    ),
    json_out: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", metavar="", help="allow unpickling a full torch module (runs code from the file)"
    ),
    debug: bool = typer.Option(False, "--debug", metavar="", help=DEBUG_HELP),
    target: str | None = typer.Option(
        None,
        "--target",
        metavar="NAME",
        help="cpu | cuda | tensorrt | openvino: where the report measures; overrides report.target",
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


@app.command(cls=PlainCommand)
def inspect(
    model: Path = typer.Argument(..., metavar="MODEL", help="model file (.onnx, .pt/.pth, .pt2, .safetensors)"),
    json_out: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", metavar="", help="allow unpickling a full torch module"),
    debug: bool = typer.Option(False, "--debug", metavar="", help=DEBUG_HELP),
):
    """Parameters, sparsity, dtypes, ops, inputs and outputs of a model file."""

    def body():
        from optcli.inspect import inspect_model
        from optcli.report.terminal import render_inspection, show

        info = inspect_model(model, trust_pickle=trust_pickle)
        _print_json(info) if json_out else show(render_inspection(info))

    guarded(body, debug)


@app.command(cls=PlainCommand)
def bench(
    model: Path = typer.Argument(..., metavar="MODEL", help="model file (.onnx or .pt2)"),
    shape: list[str] = typer.Option([], "--shape", metavar="NAME=1x3x32x32", help="input shape (repeatable)"),
    batch: list[int] = typer.Option([1], "--batch", metavar="N", help="batch size (repeatable)"),
    threads: int = typer.Option(
        2, "--threads", min=1, metavar="N", help="intra-op threads of the runtime (match your deployment)"
    ),
    warmup: int = typer.Option(10, "--warmup", min=0, metavar="N", help="untimed runs first (caches, lazy init)"),
    runs: int = typer.Option(100, "--runs", min=1, metavar="N", help="timed runs per batch size (percentiles)"),
    json_out: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP),
    debug: bool = typer.Option(False, "--debug", metavar="", help=DEBUG_HELP),
):
    """Latency percentiles and throughput of a model file (ONNX Runtime or torch)."""

    def body():
        from optcli.bench import bench_model
        from optcli.report.terminal import render_bench, show

        result = bench_model(model, shapes=shape, batch_sizes=batch, threads=threads, warmup=warmup, runs=runs)
        _print_json(result) if json_out else show(render_bench(result))

    guarded(body, debug)


@app.command(cls=PlainCommand)
def passes(json_out: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP)):
    """Every pass with its options, types and defaults."""
    from optcli.catalog import pass_catalog
    from optcli.report.terminal import render_pass_catalog, show

    catalog = pass_catalog()
    _print_json(catalog) if json_out else show(render_pass_catalog(catalog))


@app.command(cls=PlainCommand)
def schema():
    """JSON Schema of recipes, for editor completion (yaml-language-server)."""
    from optcli.recipe import recipe_model

    _print_json(recipe_model().model_json_schema())


@app.command(cls=PlainCommand)
def init(
    model: Path = typer.Argument(..., metavar="MODEL", help="model file the recipe starts from"),
    factory: str | None = typer.Option(
        None, "--factory", metavar="MODULE:FN", help="module:callable that builds the module (state_dict files)"
    ),
    shape: list[str] = typer.Option(
        [], "--shape", metavar="NAME=1x1x8x8", help="input shape where the file does not fix it: name=1x1x8x8[:dtype]"
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        metavar="FILE.npz",
        help="real inputs keyed by input name, checked against the model: a CNN calibrates on its first half and "
        "is measured on the second",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", metavar="FILE", help="write the recipe to FILE (paths relative to it), not stdout"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="replace an existing --output FILE"),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", metavar="", help="allow unpickling a full torch module (runs code from the file)"
    ),
    debug: bool = typer.Option(False, "--debug", metavar="", help=DEBUG_HELP),
):
    """Write a starter recipe for MODEL (inputs read from the file, data checked against them) to stdout or --output."""

    def body():
        from optcli.errors import BadInput, writing
        from optcli.starter import starter_recipe

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
            _err(f"optcli init: {note}")
        if output is None:
            sys.stdout.write(start.text)
            return
        from optcli.report.write import atomic_write_text

        with writing(output):
            atomic_write_text(output, start.text)
        _err(f"wrote {output} (`optcli validate {output}` checks it)")

    guarded(body, debug)


@app.command(cls=PlainCommand)
def compare(
    report: Path = typer.Argument(..., metavar="NEW", help="report.json of the new run"),
    baseline: Path = typer.Argument(..., metavar="OLD", help="report.json to compare against"),
    json_out: bool = typer.Option(False, "--json", metavar="", help=JSON_HELP),
    debug: bool = typer.Option(False, "--debug", metavar="", help=DEBUG_HELP),
    max_latency_regression: float | None = typer.Option(
        None,
        "--max-latency-regression",
        min=0,
        metavar="FRACTION",
        help="exit 1 if p50 latency grew by more than this fraction (0.05)",
    ),
    max_accuracy_drop: float | None = typer.Option(
        None, "--max-accuracy-drop", min=0, metavar="X", help="exit 1 if the metric dropped by more than this (0.005)"
    ),
    max_size_growth: float | None = typer.Option(
        None,
        "--max-size-growth",
        min=0,
        metavar="FRACTION",
        help="exit 1 if the size on disk grew by more than this fraction (0.02)",
    ),
    junit: Path | None = typer.Option(
        None, "--junit", metavar="FILE", help="also write the regression checks as JUnit XML"
    ),
    inconclusive: Inconclusive | None = _inconclusive_option(),
):
    """What changed between two runs' final artifacts (size, latency, accuracy, fidelity); with --max-* limits, exit 1 when the new run regressed against the baseline."""  # noqa: E501 (one paragraph: Rich keeps docstring line breaks)

    def body():
        from optcli.compare import compare_reports, explain, regression_checks
        from optcli.report.terminal import render_checks, render_comparison, show

        result = compare_reports(report, baseline)
        limits = (max_latency_regression, max_accuracy_drop, max_size_growth)
        policy = inconclusive.value if inconclusive is not None else "pass"
        checks = regression_checks(report, baseline, *limits, policy) if any(v is not None for v in limits) else []
        if checks:
            result = {**result, "checks": checks, "passed": all(c["passed"] for c in checks)}
        _print_json(result) if json_out else show(render_comparison(result, explain(report, baseline)))
        if checks and not json_out:
            show(render_checks(checks))
        if junit is not None:
            from optcli.errors import writing
            from optcli.report.ci import write_junit

            with writing(junit):
                write_junit(junit, [("compare", checks, None)])
        failed = [c["name"] for c in checks if not c["passed"]]
        if failed:
            _err(f"regression: {', '.join(failed)} ({report} vs {baseline})")
            return EXIT_GATE
        return EXIT_OK

    guarded(body, debug, ci_error("compare", json_out, junit))


@app.command(cls=PlainCommand)
def sweep(
    recipe: Path | None = typer.Argument(
        None, metavar="RECIPE", help="YAML recipe (its sweep: grid: block, if any, is merged with --grid)"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", metavar="DIR", help="output folder: one run per variant inside, sweep.json/md/html"
    ),
    grid: list[str] = typer.Option(
        [],
        "--grid",
        metavar="KEY=V1,V2",
        help="a recipe key and its values: --grid passes.1.sparsity=0.3,0.5 (repeatable; passes.N=on,off)",
    ),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="override a recipe key in every variant (repeatable)"
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, metavar="N", help="variants run in parallel (worker processes)"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress or table; errors still go to stderr"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace what optcli wrote in OUT"),
    resume: bool = typer.Option(False, "--resume", help="continue a sweep: finished steps and variants are reused"),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="allow unpickling a full torch module (runs code from the file)"
    ),
    junit: Path | None = typer.Option(
        None, "--junit", metavar="FILE", help=JUNIT_HELP + " (one test suite per variant)"
    ),
    inconclusive: Inconclusive | None = _inconclusive_option(),
    space: Path | None = typer.Option(
        None,
        "--space",
        metavar="FILE",
        help="search space YAML: recipe keys -> ranges {low, high, log, step} or choices",
    ),
    sampler: str | None = typer.Option(
        None, "--sampler", metavar="NAME", help="grid, random, tpe or nsga2 (default: grid for lists, else tpe)"
    ),
    trials: int | None = typer.Option(
        None, "--trials", min=1, metavar="N", help="the study's budget, all workers together (default: the grid, or 20)"
    ),
    time_budget: float | None = typer.Option(
        None, "--time-budget", min=1, metavar="SECONDS", help="this worker starts no trial after that"
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        metavar="URL",
        help="the study's storage: a journal file (default OUT/study.journal), sqlite:///F, postgresql://...",
    ),
    study: str | None = typer.Option(None, "--study", metavar="NAME", help="the study's name (default: OUT's name)"),
    objective: list[str] = typer.Option(
        [],
        "--objective",
        metavar="NAME",
        help="metric, latency, size or compressed (repeatable; default: metric latency size)",
    ),
    worker: bool = typer.Option(
        False, "--worker", help="join the study in OUT and run trials until its budget is spent"
    ),
    status: Path | None = typer.Option(
        None, "--status", metavar="OUT", help="print a study's progress and front, run nothing"
    ),
    heartbeat: int = typer.Option(10, "--heartbeat", min=1, hidden=True, metavar="S"),
    grace: int = typer.Option(60, "--grace", min=1, hidden=True, metavar="S"),
):
    """Run variants of a recipe, each as its own run; print the table, the Pareto front and the best variant under the recipe's gates (OUT/best links to it). --grid alone runs every combination; --space, --sampler, --trials, --storage or --worker make it an Optuna study that workers on any machine sharing OUT can join. Exit 0 when a variant passes every gate."""  # noqa: E501

    def body():
        from optcli import api
        from optcli.errors import BadInput
        from optcli.report.terminal import console, feedback, render_sweep, show
        from optcli.sweeper import exit_code

        if status is not None:
            from optcli.report.sweep import progress_line
            from optcli.study import study_status

            result = study_status(status, storage)
            _print_json(result) if json_out else show(render_sweep(result))
            if not json_out:
                show(progress_line(result))
            return EXIT_OK
        if recipe is None or out is None:
            raise BadInput("optcli sweep: give RECIPE and -o OUT (or --status OUT)")
        is_study = (
            any(x is not None for x in (space, sampler, trials, time_budget, storage, study)) or worker or objective
        )
        err = console()
        progress = feedback(quiet)
        try:
            if is_study:
                from optcli.study import StudyOptions, run_study

                if resume:
                    raise BadInput("a study resumes by running the same command again: drop --resume")
                options = StudyOptions(
                    out=out,
                    space=space,
                    grid=grid,
                    overrides=[*set_, *_inconclusive_set(inconclusive)],
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
                    [*set_, *_inconclusive_set(inconclusive)],
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
            if r.get("state", "complete") in ("complete", "failed") and r.get("retried_as") is None
        ]
        _ci_results(junit, suites, out / "sweep.md")
        if json_out:
            _print_json(result)
            if not quiet:
                err.print(render_sweep(result))
        elif not quiet:
            show(render_sweep(result))
            if result.get("study"):
                from optcli.report.sweep import progress_line

                show(progress_line(result))
            show(
                f"wrote {out}/sweep.{{json,md,html}}" + (f"; {out}/best -> {result['best']}" if result["best"] else "")
            )
        code = exit_code(result)
        for e in result["errors"]:
            _err(f"error: variant {e['variant']}: {e['error']}")
        if code == EXIT_GATE:
            _err(f"no variant passes every gate (see {out}/sweep.json)")
        return code

    guarded(body, debug, ci_error("sweep", json_out, junit))


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
