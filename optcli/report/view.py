"""The typed report (report/model.py) seen as rows, cells and strings, for every renderer's document.

Pure functions: no Rich, no HTML. A value that was not measured is None; every cell shows DASH for it.
A pass type's own rows and sentences are its view's (passviews.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, TypeGuard

from optcli.report.model import Artifact, Comparison, OutputFidelity, Report, Step, clean
from optcli.report.summary import INCONCLUSIVE_HINT, baseline_index, step_comparisons

DASH = "—"

LATENCY_HEADERS = ["step", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "runs"]
IO_HEADERS = ["", "path", "format", "sha256"]
ENV_HEADERS = ["", "value"]


# --------------------------------------------------------------------------- numbers


def finite(x: Any) -> TypeGuard[float]:
    """A real number (not bool, not NaN/inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_bytes(n: float | None) -> str:
    """Human size in decimal units: 999 -> "999 B", 1234567 -> "1.2 MB"; None -> "—"."""
    if not finite(n):
        return DASH
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if abs(n) < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    return DASH  # unreachable


def ratio(a: float | None, b: float | None) -> str:
    """a / b as "0.26×" / "2.1×" / "12×"; "—" when either is missing or b is 0."""
    if not finite(a) or not finite(b) or b == 0:
        return DASH
    x = float(a) / float(b)
    ax = abs(x)
    if ax >= 9.95:
        return f"{x:.0f}×"
    if ax >= 0.995:
        return f"{x:.1f}×"
    if ax >= 0.01 or ax == 0:
        return f"{x:.2f}×"
    return f"{x:.2g}×"


def fmt_num(x: Any, digits: int = 4) -> str:
    """Any cell value: ints with thousands separators, floats to `digits` significant figures."""
    if isinstance(x, (bool, str)):
        return str(x)
    if not finite(x):
        return DASH
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def fmt_ms(ms: Any) -> str:
    """Milliseconds with the decimals their size deserves: 0.123, 12.35, 123."""
    if not finite(ms):
        return DASH
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 100:
        return f"{ms:.2f}"
    return f"{ms:.0f}"


def fmt_rate(x: Any) -> str:
    """Items per second as a plain number: 31,640 (never 3.164e+04)."""
    if not finite(x):
        return DASH
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_pct(x: Any) -> str:
    return f"{x * 100:.1f}%" if finite(x) else DASH


def fmt_count(n: Any) -> str:
    return f"{int(n):,}" if finite(n) else DASH


def fmt_seconds(s: Any) -> str:
    return f"{s:.2f}" if finite(s) else DASH


def render_json(report: Report | dict) -> str:
    """report.json's text: cleaned (no NaN), indented, one trailing newline."""
    return json.dumps(clean(report), indent=2, default=str, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- reading the report


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]...; None as soon as a level is missing or not a dict (a step's open-ended details)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def batch_sizes(report: Report) -> list[int]:
    """Sorted batch sizes found in any step's latency ("batch_<n>" keys)."""
    sizes: set[int] = set()
    for step in report.steps:
        for key in step.latency:
            prefix, _, n = str(key).partition("_")
            if prefix == "batch" and n.isdigit():
                sizes.add(int(n))
    return sorted(sizes)


def metric_name(report: Report) -> str:
    for step in report.steps:
        if step.accuracy is not None and step.accuracy.metric:
            return str(step.accuracy.metric)
    return "accuracy"


def verdict(report: Report) -> str:
    return "PASSED" if report.passed is True else "FAILED" if report.passed is False else "not gated"


def latency_notes(report: Report) -> list[tuple[str, str]]:
    """(step name, note) for each step whose latency needed a caveat."""
    return [(str(s.name), str(s.details["latency_note"])) for s in report.steps if s.details.get("latency_note")]


# --------------------------------------------------------------------------- tables


def _ratio_of(x: Any) -> str:
    """A stored new/reference ratio as a cell, two decimals below 10: "0.35×", "1.03×", "12×"."""
    if not finite(x):
        return DASH
    return f"{x:.2f}×" if abs(x) < 9.95 else f"{x:.0f}×"


def _delta_pt(x: Any) -> str:
    return f"{x:+.2f}".replace("-", "−") if finite(x) else DASH


def _metric_delta(c: Comparison) -> str:
    """The change of the metric over the step before: points of a share, % of anything else (perplexity)."""
    if finite(c.accuracy_pt):
        return f"{_delta_pt(c.accuracy_pt)} pt"
    if finite(c.metric_change_pct):
        return f"{_delta_pt(c.metric_change_pct)} %"
    return DASH


def shown_sparsity(all_steps: list[Step], i: int) -> Any:
    """The sparsity worth showing: an int8 step's zeros beyond its source's are rounding (tiny weights to 0),
    not pruning, so it shows the sparsity of the weights it quantized (report.json keeps the raw count)."""
    step = all_steps[i]
    if step.type == "quantize" and i > 0 and finite(all_steps[i - 1].sparsity):
        return all_steps[i - 1].sparsity
    return step.sparsity


def baseline_name(report: Report) -> str:
    return str(report.steps[baseline_index(report.to_dict())].name) if report.steps else "original"


def comparisons(report: Report) -> list[tuple[Comparison, Comparison]]:
    """Per step: (vs the step before, vs the baseline), empty Comparisons where there is none."""
    return [
        (Comparison.model_validate(c["vs_previous"] or {}), Comparison.model_validate(c["vs_baseline"] or {}))
        for c in step_comparisons(report.to_dict())
    ]


def ratio_legend(report: Report, terminal: bool = False) -> str:
    """Which reference each × column uses, in words (every view prints it under the steps table)."""
    base = baseline_name(report)
    if terminal:
        return (
            f"× prev: size or p50 time over the step before (< 1× is smaller / faster); {metric_name(report)} with "
            f"its change (pt: points of a share, %: relative); the sentence below compares with {base}, the first "
            "ONNX step"
        )
    return (
        f"× prev: this step's size or p50 time over the step before it; × {base}: over {base}, the first ONNX step "
        "(the baseline of the verdict). Size and time read alike: < 1× is smaller / faster."
    )


def _name(step: Step) -> str:
    return DASH if step.name is None else str(step.name)


def _accuracy_cell(step: Step) -> str:
    acc = step.accuracy_value
    return f"{acc:.4f}" if finite(acc) else DASH


def step_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and string rows of the full steps table (report.md, report.html)."""
    batches = batch_sizes(report)
    base = baseline_name(report)
    headers = ["step", "format", "size", "size × prev", f"size × {base}", "compressed", "params", "sparsity"]
    for b in batches:
        headers += [f"p50 b{b} ms", f"b{b} × prev", f"b{b} × {base}"]
    headers += [metric_name(report), "Δ vs prev", "fidelity cos", "top-1 agree", "seconds"]
    rows = []
    for i, (step, (prev, vs_base)) in enumerate(zip(report.steps, comparisons(report), strict=True)):
        row = [
            _name(step),
            str(step.format or DASH),
            format_bytes(step.size_bytes),
            _ratio_of(prev.size),
            _ratio_of(vs_base.size),
            format_bytes(step.compressed_bytes),
            fmt_count(step.parameters),
            fmt_pct(shown_sparsity(report.steps, i)),
        ]
        for b in batches:
            row += [fmt_ms(step.p50(b)), _ratio_of(prev.p50(b)), _ratio_of(vs_base.p50(b))]
        row += [
            _accuracy_cell(step),
            _metric_delta(prev),
            fmt_num(step.cosine, 6),
            fmt_pct(_agreement(step)),
            fmt_seconds(step.seconds),
        ]
        rows.append(row)
    return headers, rows


def compact_step_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The terminal's view of the steps table, made to fit 100 columns: each size and time with its ratio to
    the step before it, the accuracy with its change, the step's seconds. Sparsity only where a step prunes."""
    all_steps = report.steps
    batches = batch_sizes(report)
    pruning = any(s.type == "prune" for s in all_steps) or (
        bool(all_steps) and finite(all_steps[0].sparsity) and all_steps[0].sparsity >= 0.01
    )
    headers = ["step", "size  × prev"]
    headers += ["sparsity"] if pruning else []
    headers += [f"b{b} ms  × prev" for b in batches]
    headers += [metric_name(report), "fidelity", "secs"]
    rows = []
    for i, (step, (prev, _)) in enumerate(zip(all_steps, comparisons(report), strict=True)):

        def with_ratio(value: str, r: Any) -> str:
            # a row without a ratio (the original) gets a dash under "× prev", its figure under the figures
            return f"{value} {_ratio_of(r) if finite(r) else DASH:>5}"

        row = [_name(step), with_ratio(format_bytes(step.size_bytes), prev.size)]
        row += [fmt_pct(shown_sparsity(all_steps, i))] if pruning else []
        row += [with_ratio(fmt_ms(step.p50(b)), prev.p50(b)) for b in batches]
        acc_cell = _accuracy_cell(step)
        if finite(prev.accuracy_pt) or finite(prev.metric_change_pct):
            acc_cell += f" {_metric_delta(prev)}"
        row += [acc_cell, fmt_num(step.cosine, 6), fmt_seconds(step.seconds)]
        rows.append(row)
    return headers, rows


def gate_lines(report: Report) -> list[tuple[bool, str]]:
    """(passed, "✓ name value vs limit") per gate."""
    out = []
    for gate in report.gates:
        passed = bool(gate.passed)
        mark = "✓" if passed else "✗"
        text = f"{mark} {'?' if gate.name is None else gate.name}: {fmt_num(gate.value)}"
        if isinstance(gate.interval, list) and len(gate.interval) == 2:
            text += f" [{fmt_num(gate.interval[0])}–{fmt_num(gate.interval[1])}]"
        text += f" vs limit {fmt_num(gate.limit)}"
        if gate.verdict == "inconclusive":
            text += f" — inconclusive, counted as {'passed' if passed else 'failed'}: {INCONCLUSIVE_HINT}"
        out.append((passed, text))
    return out


def latency_rows(report: Report) -> list[list[str]]:
    """One row per step and batch size: percentiles, throughput, runs (LATENCY_HEADERS)."""
    rows = []
    for step in report.steps:
        for b in batch_sizes(report):
            lat = step.latency_at(b)
            if lat is None:
                continue
            rows.append(
                [
                    str(step.name),
                    str(b),
                    fmt_ms(lat.p50_ms),
                    fmt_ms(lat.p90_ms),
                    fmt_ms(lat.p99_ms),
                    fmt_rate(lat.throughput_per_s),
                    fmt_count(lat.runs),
                ]
            )
    return rows


def shown_path(path: Any) -> str:
    """Input and output paths the same way: relative to the working directory when under it, else absolute."""
    if not path:
        return DASH
    full = os.path.abspath(str(path))
    rel = os.path.relpath(full)
    return full if rel.startswith("..") else rel


def io_rows(report: Report) -> list[list[str]]:
    """Input and output files: path, format, sha256 (IO_HEADERS)."""
    rows = []
    for label, artifact in (("input", report.input), ("output", report.output)):
        artifact = artifact or Artifact()
        rows.append([label, shown_path(artifact.path), str(artifact.format or DASH), str(artifact.sha256 or DASH)])
    return rows


def env_rows(report: Report) -> list[list[str]]:
    """optcli's version, then the environment the run recorded (ENV_HEADERS)."""
    env = report.environment.to_dict() if report.environment is not None else {}
    rows = [["optcli", str(report.optcli_version or DASH)]]
    return rows + [[str(k), _plain(v)] for k, v in env.items()]


def _plain(value: Any) -> str:
    """A recorded value as text, not a Python repr: lists joined with commas, mappings as key: value."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or DASH
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or DASH
    return DASH if value is None else str(value)


FIDELITY_HEADERS = ["output", "kind", "cosine", "max abs error", "judged by"]


def fidelity_rows(step: Step) -> list[list[str]]:
    """Each output's drift in its own terms; empty where the steps table already says it all (one output whose
    cosine and top-1 columns are its judgement) and for the original (compared with itself)."""
    outputs = step.fidelity.outputs if step.fidelity is not None else None
    if not outputs or step.name == "original":
        return []
    if len(outputs) == 1 and outputs[0].kind in ("classes", "embedding", "tensor"):
        return []
    return [
        [
            str(o.name or DASH),
            str(o.kind or DASH),
            fmt_num(o.cosine_mean, 6),
            fmt_num(o.max_abs_error),
            output_judgement(o),
        ]
        for o in outputs
    ]


def output_judgement(o: OutputFidelity) -> str:
    """The figure an output is judged by, in words ("top-1 agreement 97.7%", "max error 0.26 of the range")."""
    if o.note:
        return str(o.note)
    if o.kind == "value":
        return (
            f"max error {fmt_num(o.max_relative_error)} × the original's range {fmt_num(o.spread)} "
            f"(mean abs error {fmt_num(o.mean_abs_error)})"
        )
    if o.kind == "classes":
        return f"top-1 agreement {fmt_pct(o.top1_agreement)}"
    if o.kind == "sequence":
        return f"agreement per position {fmt_pct(o.position_agreement)}"
    if o.kind == "labels":
        return f"agreement {fmt_pct(o.agreement)}"
    if o.kind == "scores":  # logits or features: nothing says which, so the cosine judges and the agreement informs
        agree = o.top1_agreement if "top1_agreement" in o.model_fields_set else o.position_agreement
        return f"cosine (top-1 agreement {fmt_pct(agree)})" if agree is not None else "cosine"
    if o.kind == "embedding":
        return f"cosine; nearest-neighbour top-1 agreement {fmt_pct(o.neighbour_top1_agreement)}"
    return "cosine"


def _agreement(step: Step) -> Any:
    """Top-1 agreement; for embeddings, nearest-neighbour top-1 agreement (an argmax over dimensions means nothing)."""
    if step.fidelity is None:
        return None
    value = step.fidelity.top1_agreement
    return value if value is not None else step.fidelity.neighbour_top1_agreement


# A figure (right-aligned, to compare down a column): 72.4 kB, 0.35×, 1,557, −0.28, 0.0%, 6.09 ms, —
_FIGURE = re.compile(r"^(?:[−+-]?[\d.,]+(?:e[−+-]?\d+)?\s*(?:×|%|kB|MB|GB|B|ms|s|pt)?|—|-)$")


def is_figure(value: Any) -> bool:
    """A cell that holds a figure (right-aligned in every table) rather than text."""
    return bool(_FIGURE.match(str(value).strip()))


GENERATION_HEADERS = ["step", "perplexity", "TTFT ms", "decode tok/s", "greedy agreement", "export RSS", "generate RSS"]


def generation_rows(report: Report) -> list[list[str]]:
    """Decoder LLMs: one row per step of perplexity, generation timings, agreement and peak RSS (GENERATION_HEADERS)."""
    rows = []
    for step in report.steps:
        gen = step.details.get("generation")
        if not isinstance(gen, dict):
            continue
        agreement = gen.get("greedy_agreement")
        rows.append(
            [
                str(step.name),
                fmt_num(step.accuracy_value),
                fmt_ms(gen.get("ttft_ms")),
                fmt_rate(gen.get("decode_tokens_per_s")),
                fmt_pct(agreement) if finite(agreement) else DASH,
                format_bytes(dig(step.details, "export", "peak_rss_bytes")),
                format_bytes(gen.get("peak_rss_bytes")),
            ]
        )
    return rows


def generation_line(report: Report) -> str:
    """Decoder LLMs: how generation was measured, and the speed-ups timed side by side."""
    gen = report.generation
    if gen is None:
        return ""
    line = (
        f"generation: batch 1, greedy, {gen.new_tokens} new tokens after {gen.prompt_tokens}-token prompts "
        f"({gen.prompts} from the eval text); perplexity: windows of {gen.context} tokens, stride {gen.stride}"
    )
    for label, speed in (("decode speed-up", gen.decode_speedup), ("time to first token", gen.ttft_speedup)):
        if speed is not None and finite(speed.value):
            low, high = ((speed.interval or []) + [None, None])[:2]
            line += f"; {label} of {gen.final} over {gen.baseline}: {fmt_num(speed.value, 3)}× [{fmt_num(low, 3)}–{fmt_num(high, 3)}]"
    return line
