"""The report dict (what report.json holds) seen as rows, cells and strings, for every renderer.

Pure functions over plain dicts: no Rich, no HTML, only the standard library. Every value in a
report may be null (not measured); every cell shows DASH for it instead of failing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from optcli.report.summary import INCONCLUSIVE_HINT, baseline_index, step_comparisons

DASH = "—"

LATENCY_HEADERS = ["step", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "runs"]
TRAINING_HEADERS = ["epoch", "loss", "metric", "best"]
SEARCH_HEADERS = ["candidate", "latency ms", "size", "metric", "chosen"]
IO_HEADERS = ["", "path", "format", "sha256"]
ENV_HEADERS = ["", "value"]


# --------------------------------------------------------------------------- numbers


def finite(x: Any) -> bool:
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


def clean(obj: Any) -> Any:
    """A JSON-safe copy of obj: NaN/inf -> None, tuples -> lists, numpy values -> Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return clean(obj.tolist())
    return obj  # json.dumps(default=str) handles the rest (Path, datetime, ...)


def render_json(report: dict) -> str:
    """report.json's text: cleaned (no NaN), indented, one trailing newline."""
    return json.dumps(clean(report), indent=2, default=str, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- reading the report


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]...; None as soon as a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def steps(report: dict) -> list[dict]:
    return [s for s in (report.get("steps") or []) if isinstance(s, dict)]


def batch_sizes(report: dict) -> list[int]:
    """Sorted batch sizes found in any step's latency ("batch_<n>" keys)."""
    sizes: set[int] = set()
    for step in steps(report):
        for key in step.get("latency") or {}:
            prefix, _, n = str(key).partition("_")
            if prefix == "batch" and n.isdigit():
                sizes.add(int(n))
    return sorted(sizes)


def p50(step: dict, batch: int) -> Any:
    return dig(step, "latency", f"batch_{batch}", "p50_ms")


def accuracy(step: dict) -> Any:
    return dig(step, "accuracy", "value")


def metric_name(report: dict) -> str:
    for step in steps(report):
        name = dig(step, "accuracy", "metric")
        if name:
            return str(name)
    return "accuracy"


def verdict(report: dict) -> str:
    passed = report.get("passed")
    return "PASSED" if passed is True else "FAILED" if passed is False else "not gated"


def warning_lines(report: dict) -> list[str]:
    return [str(w) for w in report.get("warnings") or []]


def latency_notes(report: dict) -> list[tuple[str, str]]:
    """(step name, note) for each step whose latency needed a caveat."""
    return [
        (str(s.get("name")), str(dig(s, "details", "latency_note")))
        for s in steps(report)
        if dig(s, "details", "latency_note")
    ]


def training_epochs(step: dict) -> list[dict]:
    epochs = dig(step, "details", "training", "epochs")
    return [e for e in epochs if isinstance(e, dict)] if isinstance(epochs, list) else []


def search_candidates(step: dict) -> tuple[list[dict], Any]:
    """The quantize search's candidates and its target metric (None when the step did not search)."""
    search = dig(step, "details", "search")
    if not isinstance(search, dict):
        return [], None
    cands = [c for c in search.get("candidates") or [] if isinstance(c, dict)]
    return cands, search.get("target")


def candidate_label(c: dict, i: int) -> str:
    return str(c.get("name") or c.get("label") or f"#{i + 1}")


def top_pruned(step: dict, n: int = 10) -> list[tuple[str, float]]:
    """The n most sparse layers of a step's details.per_layer_sparsity, most sparse first."""
    per_layer = dig(step, "details", "per_layer_sparsity")
    if not isinstance(per_layer, dict):
        return []
    items = [(str(k), float(v)) for k, v in per_layer.items() if finite(v)]
    return sorted(items, key=lambda kv: (-kv[1], kv[0]))[:n]


# --------------------------------------------------------------------------- tables


def _ratio_of(x: Any) -> str:
    """A stored new/reference ratio as a cell, two decimals below 10: "0.35×", "1.03×", "12×"."""
    if not finite(x):
        return DASH
    return f"{x:.2f}×" if abs(x) < 9.95 else f"{x:.0f}×"


def _delta_pt(x: Any) -> str:
    return f"{x:+.2f}".replace("-", "−") if finite(x) else DASH


def shown_sparsity(all_steps: list[dict], i: int) -> Any:
    """The sparsity worth showing: an int8 step's zeros beyond its source's are rounding (tiny weights to 0),
    not pruning, so it shows the sparsity of the weights it quantized (report.json keeps the raw count)."""
    step = all_steps[i]
    if step.get("type") == "quantize" and i > 0 and finite(all_steps[i - 1].get("sparsity")):
        return all_steps[i - 1].get("sparsity")
    return step.get("sparsity")


def baseline_name(report: dict) -> str:
    all_steps = steps(report)
    return str(all_steps[baseline_index(report)].get("name")) if all_steps else "original"


def ratio_legend(report: dict, terminal: bool = False) -> str:
    """Which reference each × column uses, in words (every view prints it under the steps table)."""
    base = baseline_name(report)
    if terminal:
        return (
            f"× prev: size or p50 time over the step before (< 1× is smaller / faster); {metric_name(report)} with "
            f"its change in points; the sentence below compares with {base}, the first ONNX step"
        )
    return (
        f"× prev: this step's size or p50 time over the step before it; × {base}: over {base}, the first ONNX step "
        "(the baseline of the verdict). Size and time read alike: < 1× is smaller / faster."
    )


def step_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and string rows of the full steps table (report.md, report.html)."""
    all_steps = steps(report)
    batches = batch_sizes(report)
    base = baseline_name(report)
    headers = ["step", "format", "size", "size × prev", f"size × {base}", "compressed", "params", "sparsity"]
    for b in batches:
        headers += [f"p50 b{b} ms", f"b{b} × prev", f"b{b} × {base}"]
    headers += [metric_name(report), "Δ pt vs prev", "fidelity cos", "top-1 agree", "seconds"]
    rows = []
    for i, (step, cmp) in enumerate(zip(all_steps, step_comparisons(report), strict=True)):
        prev, vs_base = cmp["vs_previous"] or {}, cmp["vs_baseline"] or {}
        row = [
            str(step.get("name", DASH)),
            str(step.get("format") or DASH),
            format_bytes(step.get("size_bytes")),
            _ratio_of(prev.get("size")),
            _ratio_of(vs_base.get("size")),
            format_bytes(step.get("compressed_bytes")),
            fmt_count(step.get("parameters")),
            fmt_pct(shown_sparsity(all_steps, i)),
        ]
        for b in batches:
            row += [
                fmt_ms(p50(step, b)),
                _ratio_of(prev.get(f"p50_batch_{b}")),
                _ratio_of(vs_base.get(f"p50_batch_{b}")),
            ]
        acc = accuracy(step)
        row += [
            f"{acc:.4f}" if finite(acc) else DASH,
            _delta_pt(prev.get("accuracy_pt")),
            fmt_num(dig(step, "fidelity", "cosine_mean"), 6),
            fmt_pct(_agreement(step)),
            fmt_seconds(step.get("seconds")),
        ]
        rows.append(row)
    return headers, rows


def compact_step_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The terminal's view of the steps table, made to fit 100 columns: each size and time with its ratio to
    the step before it, the accuracy with its change, the step's seconds. Sparsity only where a step prunes."""
    all_steps = steps(report)
    batches = batch_sizes(report)
    pruning = any(s.get("type") == "prune" for s in all_steps) or (
        bool(all_steps) and finite(all_steps[0].get("sparsity")) and all_steps[0]["sparsity"] >= 0.01
    )
    headers = ["step", "size  × prev"]
    headers += ["sparsity"] if pruning else []
    headers += [f"b{b} ms  × prev" for b in batches]
    headers += [metric_name(report), "fidelity", "secs"]
    rows = []
    for i, (step, cmp) in enumerate(zip(all_steps, step_comparisons(report), strict=True)):
        prev = cmp["vs_previous"] or {}

        def with_ratio(value: str, r: Any) -> str:
            # a row without a ratio (the original) gets a dash under "× prev", its figure under the figures
            return f"{value} {_ratio_of(r) if finite(r) else DASH:>5}"

        row = [str(step.get("name", DASH)), with_ratio(format_bytes(step.get("size_bytes")), prev.get("size"))]
        row += [fmt_pct(shown_sparsity(all_steps, i))] if pruning else []
        row += [with_ratio(fmt_ms(p50(step, b)), prev.get(f"p50_batch_{b}")) for b in batches]
        acc = accuracy(step)
        acc_cell = f"{acc:.4f}" if finite(acc) else DASH
        if finite(prev.get("accuracy_pt")):
            acc_cell += f" {_delta_pt(prev['accuracy_pt'])}"
        row += [acc_cell, fmt_num(dig(step, "fidelity", "cosine_mean"), 6), fmt_seconds(step.get("seconds"))]
        rows.append(row)
    return headers, rows


def gate_lines(report: dict) -> list[tuple[bool, str]]:
    """(passed, "✓ name value vs limit") per gate."""
    out = []
    for gate in report.get("gates") or []:
        passed = bool(gate.get("passed"))
        mark = "✓" if passed else "✗"
        text = f"{mark} {gate.get('name', '?')}: {fmt_num(gate.get('value'))}"
        interval = gate.get("interval")
        if isinstance(interval, list) and len(interval) == 2:
            text += f" [{fmt_num(interval[0])}–{fmt_num(interval[1])}]"
        text += f" vs limit {fmt_num(gate.get('limit'))}"
        if gate.get("verdict") == "inconclusive":
            text += f" — inconclusive, counted as {'passed' if passed else 'failed'}: {INCONCLUSIVE_HINT}"
        out.append((passed, text))
    return out


def latency_rows(report: dict) -> list[list[str]]:
    """One row per step and batch size: percentiles, throughput, runs (LATENCY_HEADERS)."""
    rows = []
    for step in steps(report):
        for b in batch_sizes(report):
            lat = dig(step, "latency", f"batch_{b}")
            if not isinstance(lat, dict):
                continue
            rows.append(
                [
                    str(step.get("name")),
                    str(b),
                    fmt_ms(lat.get("p50_ms")),
                    fmt_ms(lat.get("p90_ms")),
                    fmt_ms(lat.get("p99_ms")),
                    fmt_rate(lat.get("throughput_per_s")),
                    fmt_count(lat.get("runs")),
                ]
            )
    return rows


GENERATION_HEADERS = ["step", "perplexity", "TTFT ms", "decode tok/s", "greedy agreement", "export RSS", "generate RSS"]


def generation_rows(report: dict) -> list[list[str]]:
    """Decoder LLMs: one row per step of perplexity, generation timings, agreement and peak RSS (GENERATION_HEADERS)."""
    rows = []
    for step in steps(report):
        gen = dig(step, "details", "generation")
        if not isinstance(gen, dict):
            continue
        agreement = gen.get("greedy_agreement")
        rows.append(
            [
                str(step.get("name")),
                fmt_num(accuracy(step)),
                fmt_ms(gen.get("ttft_ms")),
                fmt_rate(gen.get("decode_tokens_per_s")),
                fmt_pct(agreement) if finite(agreement) else DASH,
                format_bytes(dig(step, "details", "export", "peak_rss_bytes")),
                format_bytes(gen.get("peak_rss_bytes")),
            ]
        )
    return rows


def generation_line(report: dict) -> str:
    """Decoder LLMs: how generation was measured, and the decode speed-up timed side by side."""
    gen = report.get("generation")
    if not isinstance(gen, dict):
        return ""
    line = (
        f"generation: batch 1, greedy, {gen.get('new_tokens')} new tokens after {gen.get('prompt_tokens')}-token "
        f"prompts ({gen.get('prompts')} from the eval text); perplexity: windows of {gen.get('context')} tokens, "
        f"stride {gen.get('stride')}"
    )
    speed = gen.get("decode_speedup")
    if isinstance(speed, dict) and finite(speed.get("value")):
        low, high = (speed.get("interval") or [None, None])[:2]
        line += (
            f"; decode speed-up of {gen.get('final')} over {gen.get('baseline')}: {fmt_num(speed['value'], 3)}× "
            f"[{fmt_num(low, 3)}–{fmt_num(high, 3)}] (interleaved A/B, {speed.get('rounds')} rounds)"
        )
    return line


def pruned_rows(step: dict) -> list[list[str]]:
    """["layer", "sparsity"] rows of the most pruned layers."""
    return [[layer, fmt_pct(s)] for layer, s in top_pruned(step)]


def training_rows(step: dict) -> list[list[str]]:
    best = dig(step, "details", "training", "best_epoch")
    return [
        [
            fmt_num(e.get("epoch")),
            fmt_num(e.get("loss")),
            fmt_num(e.get("metric")),
            "★" if e.get("epoch") == best else "",
        ]
        for e in training_epochs(step)
    ]


def training_summary(step: dict) -> str:
    """One line on where training ran: workers, backend, devices, batch per worker and global, samples/s."""
    t = dig(step, "details", "training")
    if not isinstance(t, dict) or not isinstance(t.get("world_size"), int):
        return ""
    world, devices = t["world_size"], t.get("devices") or []
    where = ", ".join(sorted({str(d) for d in devices})) or "?"
    workers = f"{world} workers ({t.get('backend')})" if world > 1 else "1 process"
    return (
        f"{workers} on {where}; batch {fmt_num(t.get('batch_per_worker'))} per worker, global batch {fmt_num(t.get('global_batch'))}; "
        f"{fmt_num(t.get('samples_per_s'))} samples/s ({fmt_num(t.get('samples_per_s_per_worker'))} per worker)"
    )


def search_rows(step: dict) -> list[list[str]]:
    cands, _ = search_candidates(step)
    return [
        [
            candidate_label(c, i),
            fmt_ms(c.get("latency_ms")),
            format_bytes(c.get("size_bytes")),
            fmt_num(c.get("metric")),
            "✓" if c.get("chosen") else "",
        ]
        for i, c in enumerate(cands)
    ]


def shown_path(path: Any) -> str:
    """Input and output paths the same way: relative to the working directory when under it, else absolute."""
    if not path:
        return DASH
    full = os.path.abspath(str(path))
    rel = os.path.relpath(full)
    return full if rel.startswith("..") else rel


def io_rows(report: dict) -> list[list[str]]:
    """Input and output files: path, format, sha256 (IO_HEADERS)."""
    return [
        [
            label,
            shown_path(dig(report, key, "path")),
            str(dig(report, key, "format") or DASH),
            str(dig(report, key, "sha256") or DASH),
        ]
        for label, key in (("input", "input"), ("output", "output"))
    ]


def env_rows(report: dict) -> list[list[str]]:
    """optcli's version, then the environment the run recorded (ENV_HEADERS)."""
    env = report.get("environment") or {}
    rows = [["optcli", str(report.get("optcli_version") or DASH)]]
    return rows + [[str(k), _plain(v)] for k, v in env.items()]


def _plain(value: Any) -> str:
    """A recorded value as text, not a Python repr: lists joined with commas, mappings as key: value."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or DASH
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or DASH
    return DASH if value is None else str(value)


def graph_change_lines(step: dict) -> list[str]:
    """What a graph rewrite did (prepare, optimize) or left in fp32 (quantize), one sentence each."""
    d = step.get("details") or {}
    if not isinstance(d, dict):
        return []
    out = [str(c) for c in d.get("changes") or []]
    pre = d.get("preprocess")
    if isinstance(pre, dict) and pre.get("rung"):
        tried = "; ".join(str(t) for t in pre.get("tried") or [])
        out.append(f"ONNX Runtime pre-processing: {pre['rung']}" + (f" (before it: {tried})" if tried else ""))
    if d.get("applied") is not None and isinstance(d.get("nodes"), dict):
        stages = ", ".join(str(a) for a in d["applied"]) or "nothing"
        out.append(f"applied: {stages}; nodes {d['nodes'].get('before')} -> {d['nodes'].get('after')}")
        ops = d.get("op_changes") or {}
        if ops:
            out.append("ops: " + ", ".join(f"{op} {a} -> {b}" for op, (a, b) in list(ops.items())[:12]))
        if d.get("portable") is False:
            out.append("uses ONNX Runtime's com.microsoft ops: only ONNX Runtime loads this artifact")
    out += [f"not applied: {k}" for k in d.get("not_applied") or []]
    out += [str(k) for k in d.get("kept") or []]
    if d.get("input_unloadable"):
        out.append(f"the input did not load in ONNX Runtime ({d['input_unloadable']})")
    if d.get("per_tensor_reason"):
        out.append(str(d["per_tensor_reason"]))
    if d.get("per_channel_off"):
        out.append(f"per-tensor int8: {d['per_channel_off']}")
    if isinstance(d.get("int8"), dict):
        out.append(int8_settings_line(d["int8"]))
    out += [str(v) for v in (d.get("kept_fp32") or {}).values()]
    if d.get("skipped"):
        out.append(str(d["skipped"]))
    if out and d.get("checked_on"):
        out.append(f"each change checked in ONNX Runtime on {d['checked_on']}")
    return out


def int8_settings_line(int8: dict) -> str:
    """The int8 types and reduce_range a quantize step ran with, who chose them and why (details.int8)."""
    by = int8.get("chosen_by") or {}
    parts = [
        f"{int8.get('activation_type')} activations ({by.get('activation_type', '?')})",
        f"{int8.get('weight_type')} weights ({by.get('weight_type', '?')})",
        f"reduce_range {_on_off(int8.get('reduce_range'), 'true', 'false')} ({by.get('reduce_range', '?')})",
    ]
    return f"int8 settings: {', '.join(parts)}: {int8.get('reason', '')}"


# --------------------------------------------------------------------------- int8: what the session runs (search profile)
INT8_OP_HEADERS = ["op type", "fp32 ms", "int8 ms", "int8", "kept fp32", "why fp32"]


def sensitivity_headers(step: dict) -> list[str]:
    """The int8 search drops nodes to fp32; the weight-only one keeps nodes at its backup precision."""
    search = dig(step, "details", "search") or {}
    low, kept = search.get("quantized_as", "int8"), search.get("kept_in", "fp32")
    return ["node", f"metric drop ({low} alone)", f"kept {kept}"]


def int8_profile(step: dict) -> dict | None:
    prof = dig(step, "details", "search", "profile")
    return prof if isinstance(prof, dict) else None


def int8_op_rows(step: dict) -> list[list[str]]:
    """Per compute-op type of the chosen int8 model: fp32 vs int8 profiled ms, regions int8 / kept fp32, and why."""
    prof = int8_profile(step)
    if not prof:
        return []
    return [
        [
            str(r.get("op_type")),
            fmt_ms(r.get("fp32_ms")),
            fmt_ms(r.get("int8_ms")),
            fmt_num(r.get("quantized")),
            fmt_num(r.get("fp32")),
            str(r.get("why") or ""),
        ]
        for r in prof.get("op_types") or []
        if isinstance(r, dict)
    ]


def int8_profile_summary(step: dict) -> str:
    prof = int8_profile(step)
    if not prof:
        return ""
    fused = prof.get("fused") or {}
    return (
        f"ONNX Runtime profile (kernel time per run): int8 {fmt_ms(prof.get('int8_total_ms'))} ms vs fp32 "
        f"{fmt_ms(prof.get('fp32_total_ms'))} ms; the session runs {fmt_num(fused.get('int8_kernels'))} int8 kernels, "
        f"{fmt_num(fused.get('float_compute'))} float compute ops, {fmt_num(fused.get('quantize_linear'))} QuantizeLinear / "
        f"{fmt_num(fused.get('dequantize_linear'))} DequantizeLinear"
    )


def sensitivity_rows(step: dict, n: int = 15) -> list[list[str]]:
    """The most sensitive nodes (metric lost when only that node is int8) and whether the chosen model keeps them fp32."""
    search = dig(step, "details", "search")
    if not isinstance(search, dict) or not isinstance(search.get("sensitivity"), dict):
        return []
    fallen = {f.get("node") for f in search.get("fallback_nodes") or [] if isinstance(f, dict)}
    items = sorted(search["sensitivity"].items(), key=lambda kv: -(kv[1] if finite(kv[1]) else float("-inf")))
    return [[str(node), fmt_num(drop), "✓" if node in fallen else ""] for node, drop in items[:n]]


FIDELITY_HEADERS = ["output", "kind", "cosine", "max abs error", "judged by"]


def fidelity_rows(step: dict) -> list[list[str]]:
    """Each output's drift in its own terms; empty where the steps table already says it all (one output whose
    cosine and top-1 columns are its judgement) and for the original (compared with itself)."""
    outputs = dig(step, "fidelity", "outputs")
    if not isinstance(outputs, list) or not outputs or step.get("name") == "original":
        return []
    if len(outputs) == 1 and outputs[0].get("kind") in ("classes", "embedding", "tensor"):
        return []
    return [
        [
            str(o.get("name") or DASH),
            str(o.get("kind") or DASH),
            fmt_num(o.get("cosine_mean"), 6),
            fmt_num(o.get("max_abs_error")),
            output_judgement(o),
        ]
        for o in outputs
        if isinstance(o, dict)
    ]


def output_judgement(o: dict) -> str:
    """The figure an output is judged by, in words ("top-1 agreement 97.7%", "max error 0.26 of the range")."""
    if o.get("note"):
        return str(o["note"])
    kind = o.get("kind")
    if kind == "value":
        return (
            f"max error {fmt_num(o.get('max_relative_error'))} × the original's range {fmt_num(o.get('spread'))} "
            f"(mean abs error {fmt_num(o.get('mean_abs_error'))})"
        )
    if kind == "classes":
        return f"top-1 agreement {fmt_pct(o.get('top1_agreement'))}"
    if kind == "sequence":
        return f"agreement per position {fmt_pct(o.get('position_agreement'))}"
    if kind == "labels":
        return f"agreement {fmt_pct(o.get('agreement'))}"
    if kind == "scores":  # logits or features: nothing says which, so the cosine judges and the agreement informs
        agree = o.get("top1_agreement", o.get("position_agreement"))
        return f"cosine (top-1 agreement {fmt_pct(agree)})" if agree is not None else "cosine"
    if kind == "embedding":
        return f"cosine; nearest-neighbour top-1 agreement {fmt_pct(o.get('neighbour_top1_agreement'))}"
    return "cosine"


def _agreement(step: dict):
    """Top-1 agreement; for embeddings, nearest-neighbour top-1 agreement (an argmax over dimensions means nothing)."""
    value = dig(step, "fidelity", "top1_agreement")
    return value if value is not None else dig(step, "fidelity", "neighbour_top1_agreement")


def _on_off(flag: Any, yes: str, no: str) -> str:
    return yes if flag else no


def step_action(step: dict, config: dict) -> str:
    """What one pass did, in a sentence: its settings as they ran and what it measured on the way."""
    kind, details = step.get("type"), step.get("details") or {}
    if kind == "quantize" and config.get("weights"):
        return weight_only_action(config, details)
    if kind == "quantize":
        search = details.get("search")
        if isinstance(search, dict):
            chosen = next((c for c in search.get("candidates") or [] if c.get("chosen")), {})
            return (
                f"accuracy-aware int8 search over {len(search.get('candidates') or [])} candidates; kept "
                f"{candidate_label(chosen, 0) if chosen else 'none'}"
            )
        mode = config.get("mode")
        calibration = config.get("calibration") or {}
        text = (
            f"{'static QDQ' if mode == 'static' else 'dynamic'} int8, "
            f"{(details.get('int8') or {}).get('weight_type') or config.get('weight_type') or 'int8'} weights "
            f"{_on_off(config.get('per_channel'), 'per-channel', 'per-tensor')}"
        )
        if mode == "static":
            used, asked = details.get("calibration_samples"), details.get("calibration_samples_requested")
            text += f", calibration {calibration.get('method', 'minmax')} on {fmt_count(used)} samples"
            if finite(asked) and finite(used) and asked != used:
                text += f" ({fmt_count(asked)} requested)"
        ops = details.get("quantized_ops") or {}
        if ops:
            text += "; " + " / ".join(f"{n} {op}" for op, n in ops.items())
        excluded = details.get("excluded_nodes") or []
        if excluded:
            text += f"; {len(excluded)} nodes kept in float"
        text += _on_off(config.get("preprocess", True), "", "; ONNX Runtime pre-processing off")
        return text
    if kind == "export":
        return (
            f"torch → ONNX opset {details.get('opset', config.get('opset'))} with the {details.get('exporter', '?')} "
            f"exporter; max error vs torch {fmt_num(details.get('max_abs_error_vs_torch'), 3)} "
            f"(limit {fmt_num(details.get('error_limit'), 3)})"
        )
    if kind == "prune":
        return (
            f"{config.get('structured', 'none')} magnitude pruning to sparsity {fmt_num(config.get('sparsity'))} "
            f"({config.get('scope', 'global')})"
        )
    if kind == "finetune":
        training = details.get("training") or {}
        epochs = training.get("epochs") if isinstance(training.get("epochs"), list) else []
        distill = " with distillation" if config.get("distill") else ""
        return (
            f"{len(epochs)} epochs of {config.get('optimizer', 'sgd')} at lr {fmt_num(config.get('lr'))}{distill}"
            f"; best epoch {fmt_num(training.get('best_epoch'))}"
        )
    shown = {k: v for k, v in config.items() if k != "type" and v not in (None, [], {})}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def weight_only_action(config: dict, details: dict) -> str:
    wo = details.get("weight_only") or {}
    ops = wo.get("quantized_ops") or {}
    text = (
        f"weight-only {config.get('weights')} ({config.get('algorithm', 'rtn')}, block {config.get('block_size')}"
        f"{', symmetric' if config.get('symmetric') else ''}); "
        f"{fmt_count(ops.get('MatMulNBits', 0))} MatMulNBits / {fmt_count(ops.get('GatherBlockQuantized', 0))} "
        "GatherBlockQuantized"
    )
    mixed = wo.get("mixed") or {}
    if mixed.get("backup_nodes") is not None:
        text += (
            f"; {len(mixed['backup_nodes'])} of {fmt_count(mixed.get('matmuls'))} MatMuls (the most sensitive) in "
            f"{mixed.get('backup')}, {fmt_num(mixed.get('low_bit_share'))} of the MatMul weights in {config.get('weights')}"
        )
    search = details.get("search")
    if isinstance(search, dict):
        text += f"; {len(search.get('candidates') or [])} mixes tried for target {fmt_num(search.get('target'))}"
    return text


def step_actions(report: dict) -> list[tuple[str, str]]:
    """(step name, what it did) for every step after the original, from the resolved recipe and its details."""
    configs = [c for c in dig(report, "recipe", "passes") or [] if isinstance(c, dict)]
    return [(str(s.get("name")), step_action(s, c)) for s, c in zip(steps(report)[1:], configs, strict=False)]
