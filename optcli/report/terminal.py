"""Every Rich call of optcli: the run report's table, the tables of inspect / bench / passes / compare,
the consoles the CLI prints to, the step log and the training progress bar.

Views only: each renderer takes the plain dict its command's library function returned
(compare_reports, inspect_model, bench_model, pass_catalog, a report) and returns a Rich renderable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from optcli.progress import SILENT, Feedback, ProgressTask
from optcli.progress import EpochProgress as EpochProgress  # the protocol's home is optcli.progress; kept importable
from optcli.report.document import build_document
from optcli.report.model import clean
from optcli.report.sections import Checks, Items, Notes, Section
from optcli.report.sections import Table as DocTable
from optcli.report.view import format_bytes, is_figure

# --------------------------------------------------------------------------- consoles


PIPED_WIDTH = 100  # columns when the output is not a terminal (logs, CI, a pipe) and COLUMNS is not set


def console(stderr: bool = True) -> Console:
    """A console without syntax highlighting; COLUMNS or the terminal's width, else 100 columns."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    width = None if tty or os.environ.get("COLUMNS", "").isdigit() else PIPED_WIDTH
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def show(renderable: RenderableType) -> None:
    """Print to stdout (a command's human-readable result); piped, without Rich's trailing padding."""
    out = console(stderr=False)
    if sys.stdout.isatty():
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


def step_log(out: Console) -> Callable[[str], None]:
    """The runner's progress lines ("optcli <what happens>") on out."""
    return lambda message: out.print(f"[dim]optcli[/dim] {message}")


# --------------------------------------------------------------------------- optcli run


def render_table(report) -> Group:
    """A rich renderable of the report's document (a Report or its dict): verdict, the steps table (fits 100
    columns), what each ratio means, the verdict sentence and its caveats, then gates, warnings, notes, each step's
    graph changes in a line, and the step sections that fit a terminal (most pruned layers, int8 per op type)."""
    doc = build_document(report)
    style = "bold green" if doc.passed is True else "bold red" if doc.passed is False else "bold"
    parts: list[Any] = [Text(f"optcli report: {doc.verdict}", style=style)]
    parts += [_FittedTable(doc.compact.headers, doc.compact.rows), Text(doc.terminal_legend, style="dim")]
    if doc.sentence:
        parts.append(Text(doc.sentence, style="bold"))
    for kind, caveat in doc.caveats:
        parts.append(Text(f"⚠ {caveat}", style="bold yellow" if kind == "slower" else "yellow"))
    if doc.evaluation:
        parts.append(Text(f"evaluation: {doc.evaluation}", style="dim"))
    for section in (doc.section("gates"), doc.section("warnings")):
        for block in section.blocks if section is not None else []:
            parts += _lines(block)
    parts += [Text(s.brief, style="dim") for s in doc.sections if s.brief]
    parts += [table for s in doc.sections if s.terminal for table in _tables(s)]
    return Group(*parts)


def _lines(block) -> list[Text]:
    if isinstance(block, Checks):
        return [Text(line, style="green" if ok else "bold red") for ok, line in block.lines]
    if isinstance(block, Items):
        return [Text(f"⚠ {text}", style="yellow") for _, text in block.items]
    if isinstance(block, Notes):
        return [Text(f"note ({name}): {note}", style="dim") for name, note in block.notes]
    return []


def _tables(section: Section) -> list[Any]:
    """A section's tables, titled; figure columns right-aligned, text left (as in report.html)."""
    out: list[Any] = []
    for block in section.blocks:
        if not isinstance(block, DocTable):
            continue
        if block.drop:  # whole figures on 80 columns rather than wrapped headers and cut cells
            out.append(_FittedTable(block.headers, block.rows, drop=block.drop, title=Text(section.title)))
            continue
        t = Table(title=Text(section.title), title_justify="left", caption=block.caption)
        for i, h in enumerate(block.headers):
            figures = i > 0 and bool(block.rows) and all(is_figure(r[i]) for r in block.rows if i < len(r))
            t.add_column(h, justify="right" if figures else "left")
        for row in block.rows:
            t.add_row(*(Text(c) for c in row))
        out.append(t)
    return out


class _FittedTable:
    """A table at the width it is printed at: where every column does not fit (an 80-column terminal), the least
    needed ones (`drop`, in order) are left out and said so, rather than every figure cut to "1.…"."""

    def __init__(self, headers: list[str], rows: list[list[str]], drop=("secs", "fidelity"), styles=None, title=None):
        self.headers, self.rows, self.drop = headers, rows, drop
        self.styles, self.title = styles or [None] * len(rows), title

    def _table(self, keep: list[int]) -> Table:
        from rich import box

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title=self.title, title_justify="left")
        for i in keep:
            table.add_column(self.headers[i], justify="left" if i == 0 else "right", no_wrap=True)
        for row, style in zip(self.rows, self.styles, strict=True):
            table.add_row(*(Text(row[i]) for i in keep), style=style)  # Text: no rich markup parsing of names
        return table

    def _width(self, keep: list[int]) -> int:
        from rich.cells import cell_len

        cells = [max(cell_len(r[i]) for r in [self.headers, *self.rows]) for i in keep]
        return sum(cells) + 3 * (len(keep) - 1)  # padding on each side and the (blank) divider between columns

    def __rich_console__(self, console, options):
        keep, left_out = list(range(len(self.headers))), []
        for name in self.drop:
            if self._width(keep) <= options.max_width or name not in self.headers:
                continue
            keep.remove(self.headers.index(name))
            left_out.append(name)
        yield self._table(keep)
        if left_out:
            yield Text(
                f"({', '.join(left_out)} left out to fit {options.max_width} columns; the .md report has all)",
                style="dim",
            )


# --------------------------------------------------------------------------- the other commands


_COMPARE_ROWS = {
    # metric: (label, formatter, which way is better: "lower" | "higher" | None)
    "size_bytes": ("size", "bytes", "lower"),
    "compressed_bytes": ("compressed", "bytes", "lower"),
    "sparsity": ("sparsity", "pct", None),
    "accuracy": ("accuracy", "acc", "higher"),
    "cosine_mean": ("fidelity cosine", "cos", "higher"),
}


def _compare_cell(kind: str, value: Any) -> str:
    from optcli.report.view import DASH, finite, fmt_pct

    if not finite(value):
        return DASH
    if kind == "bytes":
        return format_bytes(value)
    if kind == "pct":
        return fmt_pct(value)
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "cos":
        return f"{value:.6g}"
    return f"{value:.3g} ms"


def render_comparison(result: dict, notes: dict | None = None) -> Group:
    """`optcli compare`: one row per metric of the two final artifacts in human units, new/baseline with a
    better/worse mark, then what changed in the recipe and why the figures may not be comparable."""
    from optcli.report.view import DASH, finite

    notes = notes or {}
    t = Table(title=Text(f"{result['new']} (new) vs {result['baseline']} (baseline)"), title_justify="left")
    for col in ("metric", "baseline", "new", "new/baseline", ""):
        t.add_column(col, justify="left" if col in ("metric", "") else "right", no_wrap=True)
    for r in result["rows"]:
        metric = str(r["metric"])
        label, kind, better = _COMPARE_ROWS.get(metric, (metric, "ms", "lower"))
        if metric.startswith("p50_ms@batch_"):
            label, kind, better = f"p50 b{metric.removeprefix('p50_ms@batch_')}", "ms", "lower"
        if metric == "accuracy":
            better = notes.get("accuracy_better", "higher")
        ratio_value = r.get("ratio")
        mark, style = "", ""
        same = (
            finite(r.get("new"))
            and finite(r.get("baseline"))
            and abs(r["new"] - r["baseline"]) <= 1e-4 * abs(r["baseline"])
        )
        if better and finite(r.get("new")) and finite(r.get("baseline")) and not same:
            improved = (r["new"] < r["baseline"]) == (better == "lower")
            mark, style = ("▲ better", "green") if improved else ("▼ worse", "red")
        elif better and same:
            mark = "= same"
        t.add_row(
            label,
            _compare_cell(kind, r.get("baseline")),
            _compare_cell(kind, r.get("new")),
            f"{ratio_value:.3g}×" if finite(ratio_value) else DASH,
            Text(mark, style=style),
        )
    parts: list[Any] = [t]
    changes = notes.get("recipe_changes") or []
    if changes:
        parts.append(Text("recipe changes (baseline → new):", style="bold"))
        parts += [Text(f"  {line}") for line in changes]
    elif "recipe_changes" in notes:
        parts.append(Text("recipes: identical", style="dim"))
    for caveat in notes.get("caveats") or []:
        parts.append(Text(f"⚠ {caveat}", style="yellow"))
    return Group(*parts)


def _shape_text(shape) -> str:
    from optcli.model import readable_shape

    return "[" + readable_shape(shape, sep=", ") + "]" if shape is not None else "?"


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{k} ×{v}" if v != 1 else str(k) for k, v in counts.items())


def render_inspection(info: dict) -> Group:
    """`optcli inspect`: what the model is in one line, its summary, inputs and outputs, its 20 most used ops."""
    head = Table(show_header=False, box=None, pad_edge=False)
    if info.get("summary"):
        head.add_row("model", Text(info["summary"], style="bold"))
    head.add_row("file", Text(info["path"]))
    head.add_row("format", info["format"])
    head.add_row("size", f"{format_bytes(info['size_bytes'])} ({format_bytes(info['compressed_bytes'])} deflated)")
    head.add_row("parameters", f"{info['parameters']:,} ({info['sparsity']:.1%} zero)")
    for key in ("architecture", "task", "tokenizer"):  # a Hugging Face folder
        if info.get(key):
            head.add_row(key, str(info[key]))
    if info.get("opset"):
        head.add_row("opset", ", ".join(f"{domain} {version}" for domain, version in info["opset"].items()))
    for key, label in (("initializer_dtypes", "weight dtypes"), ("parameter_dtypes", "parameter dtypes")):
        if info.get(key):
            head.add_row(label, _counts_text(info[key]))
    parts: list[Any] = [head]
    for title, rows in (("inputs", info.get("inputs")), ("outputs", info.get("output_specs"))):
        if not rows:
            continue
        t = Table(title=title, title_justify="left")
        for col in ("name", "shape", "dtype") + (("batch",) if title == "inputs" else ()):
            t.add_column(col)
        for i in rows:
            i = i if isinstance(i, dict) else i.__dict__
            cells = [Text(i["name"]), Text(_shape_text(i.get("shape"))), i["dtype"]]
            if title == "inputs":
                cells.append("dynamic" if i.get("batch_dynamic") else "fixed")
            t.add_row(*cells)
        parts.append(t)
    if info.get("outputs") and not info.get("output_specs"):
        head.add_row("outputs", ", ".join(map(str, info["outputs"])))
    if info.get("ops"):
        t = Table(title="ops", title_justify="left")
        t.add_column("op")
        t.add_column("count", justify="right")
        for op, n in list(info["ops"].items())[:20]:
            t.add_row(op, str(n))
        parts.append(t)
    return Group(*parts)


def render_bench(result: dict) -> Table | Group:
    """`optcli bench`: latency percentiles and throughput per batch size; notes as the caption."""
    t = Table(title=f"{result['path']} on {result['engine']}, {result['threads']} threads, {result['runs']} runs")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "items/s"):
        t.add_column(col, justify="right")
    for key, row in result["latency"].items():
        t.add_row(
            key.removeprefix("batch_"),
            f"{row['p50_ms']:.3f}",
            f"{row['p90_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['throughput_per_s']:.1f}",
        )
    for note in result["notes"]:
        t.caption = (t.caption or "") + note
    return Group(t, Text(f"⚠ {result['busy']}", style="yellow")) if result.get("busy") else t


def render_pass_catalog(catalog: list[dict]) -> Group:
    """`optcli passes`: one table of options (type, default, meaning) per pass."""
    tables = []
    for entry in catalog:
        # Text, not markup: "[torch -> onnx]" and help strings would otherwise be read as Rich style tags and vanish.
        t = Table(
            title=Text(f"{entry['type']}: {entry['summary']}  [{'/'.join(entry['consumes'])} -> {entry['produces']}]"),
            title_justify="left",
        )
        for col in ("option", "type", "default", "meaning"):
            t.add_column(col)
        for opt in entry["options"]:
            default = repr(opt["default"]) if opt["default"] is not None else "-"
            t.add_row(*(Text(c) for c in (opt["name"], opt["type"], default, opt["help"])))
        tables.append(t)
    return Group(*tables)


# --------------------------------------------------------------------------- optcli sweep


def render_sweep(sweep: dict) -> Group:
    """`optcli sweep`: one row per variant (◆ on the Pareto front, ★ the best under the gates), then the verdict."""
    from optcli.report.sweep import sweep_table
    from optcli.report.sweep import verdict as sweep_verdict

    sweep = clean(sweep)
    headers, rows = sweep_table(sweep)
    keys = list(sweep.get("grid") or {})
    short = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(short)) == len(short):  # "per_channel" for passes.1.per_channel where unambiguous: fits 100 columns
        headers = [short[keys.index(h)] if h in keys else h for h in headers]
    styles = ["bold green" if "★" in row[-1] else None for row in rows]
    title = Text(f"optcli sweep: {sweep.get('recipe', '')}")
    table = _FittedTable(headers, rows, drop=("compressed", "gates"), styles=styles, title=title)
    parts: list[Any] = [table, Text(sweep_verdict(sweep), style="green" if sweep.get("passed") else "bold red")]
    for e in sweep.get("errors") or []:
        parts.append(Text(f"✗ {e['variant']}: {e['error']}", style="bold red"))
    if sweep.get("busy"):
        parts.append(Text(f"⚠ {sweep['busy']}", style="yellow"))
    return Group(*parts)


def render_checks(checks: list[dict]) -> Group:
    """`optcli compare --max-...`: one line per regression limit, green when held."""
    from optcli.report.ci import gate_message

    return Group(
        *(
            Text(("✓ " if c["passed"] else "✗ ") + gate_message(c), style="green" if c["passed"] else "bold red")
            for c in checks
        )
    )


# --------------------------------------------------------------------------- progress on long work


def _fields_text(fields: dict) -> str:
    shown = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in fields.values())
    return "  ".join(f"{k} {v}".strip() for k, v in zip(fields, shown, strict=True) if v not in ("None", ""))


class _LineTask(ProgressTask):
    def __init__(self, out, description: str, total: int | None, every: float, fields: dict):
        self.out, self.description, self.total, self.every = out, description, total, every
        self.done, self.fields = 0, dict(fields)
        self.started = self.last = time.monotonic()
        self.closed = False

    def _line(self, final: bool) -> None:
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        took = f" ({time.monotonic() - self.started:.1f} s)" if final else ""
        extra = _fields_text(self.fields)
        self.out.write(f"optcli {self.description}: {count}{'  ' + extra if extra else ''}{took}\n")
        self.out.flush()
        self.last = time.monotonic()

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        if time.monotonic() - self.last >= self.every:
            self._line(final=False)

    def set(self, **fields) -> None:
        self.fields.update(fields)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(final=True)


class LineFeedback(Feedback):
    def __init__(self, out=None, every: float = 5.0):
        self.out, self.every = out or sys.stderr, every

    def log(self, message: str) -> None:
        self.out.write(f"optcli {message}\n")
        self.out.flush()

    def task(self, description: str, total: int | None = None, **fields) -> ProgressTask:
        return _LineTask(self.out, description, total, self.every, fields)


class _RichTask(ProgressTask):
    def __init__(self, owner: RichFeedback, description: str, total: int | None, fields: dict):
        self.owner, self.bar, self.fields = owner, owner.bar, dict(fields)
        self.id = self.bar.add_task(description, total=total, info=_fields_text(self.fields))

    def advance(self, n: int = 1, **fields) -> None:
        self.fields.update(fields)
        self.bar.update(self.id, advance=n, info=_fields_text(self.fields))

    def set(self, **fields) -> None:  # drawn at once (advance() waits for Rich's next refresh, 10 per second)
        self.fields.update(fields)
        self.bar.update(self.id, info=_fields_text(self.fields), refresh=True)

    def close(self) -> None:
        if self.id in self.bar.task_ids:
            self.bar.remove_task(self.id)
            self.owner.idle()


class RichFeedback(Feedback):
    def __init__(self, console: Console | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True, highlight=False)
        self.bar = Progress(
            TextColumn("[dim]optcli[/dim] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.live = False

    def log(self, message: str) -> None:
        self.console.print(f"[dim]optcli[/dim] {message}", highlight=False)  # printed above the live bars

    def task(self, description: str, total: int | None = None, **fields) -> ProgressTask:
        if not self.live:  # the live display only while a task runs: one at a time (Rich allows one)
            self.bar.start()
            self.live = True
        return _RichTask(self, description, total, fields)

    def idle(self) -> None:
        if self.live and not self.bar.task_ids:
            self.bar.stop()
            self.live = False

    def close(self) -> None:
        if self.live:
            self.bar.stop()
            self.live = False


def feedback(quiet: bool, stream=None) -> Feedback:
    """The Feedback for a command: none when quiet, Rich on a terminal, plain lines elsewhere."""
    stream = stream or sys.stderr
    if quiet:
        return SILENT
    if stream.isatty():
        return RichFeedback(Console(file=stream, highlight=False))
    return LineFeedback(stream)
