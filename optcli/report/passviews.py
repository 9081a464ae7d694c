"""Each pass type's part of the report in one place: the sentence saying what its step did, and the sections its
details fill. Looked up by the step's type (VIEWS); a type without a view of its own (a new pass) gets StepView:
its settings as a sentence and the sections any step's details may fill.

Pure (no Rich, no HTML): sections are sections.Section values every renderer draws alike. A view reads its step's
details as the dict report.json holds (the details models sit beside the passes, above this package); each view's
`reads` names the keys, and tests/unit/test_architecture.py holds them to the pass's details model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from optcli.report.model import Step
from optcli.report.sections import Block, Chart, Items, Section, Table, Text
from optcli.report.view import (
    FIDELITY_HEADERS,
    dig,
    fidelity_rows,
    finite,
    fmt_count,
    fmt_ms,
    fmt_num,
    fmt_pct,
    format_bytes,
)

TRAINING_HEADERS = ["epoch", "loss", "metric", "best"]
SEARCH_HEADERS = ["candidate", "latency ms", "size", "metric", "chosen"]
INT8_OP_HEADERS = ["op type", "fp32 ms", "int8 ms", "int8", "kept fp32", "why fp32"]

# --------------------------------------------------------------------------- reading a step's details (as a dict:
# they are open-ended, and a report read back from disk has no pass registry behind it)


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


def _on_off(flag: Any, yes: str, no: str) -> str:
    return yes if flag else no


def int8_settings_line(int8: dict) -> str:
    """The int8 types and reduce_range a quantize step ran with, who chose them and why (details.int8)."""
    by = int8.get("chosen_by") or {}
    parts = [
        f"{int8.get('activation_type')} activations ({by.get('activation_type', '?')})",
        f"{int8.get('weight_type')} weights ({by.get('weight_type', '?')})",
        f"reduce_range {_on_off(int8.get('reduce_range'), 'true', 'false')} ({by.get('reduce_range', '?')})",
    ]
    return f"int8 settings: {', '.join(parts)}: {int8.get('reason', '')}"


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


class StepView:
    """Any step: its settings as they ran, and the sections every step's details may fill (fidelity per output,
    a training curve, graph changes). A pass type's view adds its own sentence and sections."""

    type: ClassVar[str | None] = None
    # The details keys this view reads besides StepDetails' own: declared in the pass type's details model.
    reads: ClassVar[tuple[str, ...]] = ()

    def action(self, step: Step, config: dict) -> str:
        shown = {k: v for k, v in config.items() if k != "type" and v not in (None, [], {})}
        return ", ".join(f"{k}={v}" for k, v in shown.items())

    def sections(self, step: Step) -> list[Section]:
        raw = step.to_dict()
        name = str(step.name)
        return [
            *self._fidelity(step, name),
            *self.before_training(raw, name),
            *self._training(raw, name),
            *self._graph_changes(raw, name),
            *self.after_changes(raw, name),
        ]

    # ------------------------------------------------------------------ what a pass type adds
    def before_training(self, raw: dict, name: str) -> list[Section]:
        return []

    def after_changes(self, raw: dict, name: str) -> list[Section]:
        return []

    # ------------------------------------------------------------------ sections of any step
    def _fidelity(self, step: Step, name: str) -> list[Section]:
        rows = fidelity_rows(step)
        return (
            [Section("fidelity", f"{name}: fidelity per output", [Table(FIDELITY_HEADERS, rows)], name)] if rows else []
        )

    def _training(self, raw: dict, name: str) -> list[Section]:
        if not training_epochs(raw):
            return []
        said = training_summary(raw)
        blocks: list[Block] = [
            *([Text(said)] if said else []),
            Table(TRAINING_HEADERS, training_rows(raw), chart=Chart("loss", raw)),
        ]
        return [Section("training", f"{name}: training", blocks, name)]

    def _graph_changes(self, raw: dict, name: str) -> list[Section]:
        changes = graph_change_lines(raw)
        if not changes:
            return []
        brief = f"{name}: {'; '.join(changes[:4])}"  # the terminal's one line
        return [Section("graph changes", f"{name}: graph changes", [Items([(None, c) for c in changes])], name, brief)]


class ExportView(StepView):
    type = "export"
    reads = ("opset", "exporter", "max_abs_error_vs_torch", "error_limit")

    def action(self, step: Step, config: dict) -> str:
        d = step.details
        return (
            f"torch → ONNX opset {d.get('opset', config.get('opset'))} with the {d.get('exporter', '?')} "
            f"exporter; max error vs torch {fmt_num(d.get('max_abs_error_vs_torch'), 3)} "
            f"(limit {fmt_num(d.get('error_limit'), 3)})"
        )


class PruneView(StepView):
    type = "prune"
    reads = ("per_layer_sparsity",)

    def action(self, step: Step, config: dict) -> str:
        return (
            f"{config.get('structured', 'none')} magnitude pruning to sparsity {fmt_num(config.get('sparsity'))} "
            f"({config.get('scope', 'global')})"
        )

    def before_training(self, raw: dict, name: str) -> list[Section]:
        rows = pruned_rows(raw)
        if not rows:
            return []
        return [
            Section("pruned", f"{name}: most pruned layers", [Table(["layer", "sparsity"], rows)], name, terminal=True)
        ]


class FinetuneView(StepView):
    type = "finetune"
    reads = ("training",)

    def action(self, step: Step, config: dict) -> str:
        training = step.details.get("training") or {}
        epochs = training.get("epochs")
        if not isinstance(epochs, list):
            epochs = []
        distill = " with distillation" if config.get("distill") else ""
        return (
            f"{len(epochs)} epochs of {config.get('optimizer', 'sgd')} at lr {fmt_num(config.get('lr'))}{distill}"
            f"; best epoch {fmt_num(training.get('best_epoch'))}"
        )


class QuantizeView(StepView):
    type = "quantize"
    reads = (
        "search",
        "weight_only",
        "int8",
        "calibration_samples",
        "calibration_samples_requested",
        "quantized_ops",
        "excluded_nodes",
        "kept_fp32",
        "per_channel_off",
        "skipped",
    )

    def action(self, step: Step, config: dict) -> str:
        details = step.details
        if config.get("weights"):
            return self._weight_only(config, details)
        search = details.get("search")
        if isinstance(search, dict):
            chosen: dict = next((c for c in search.get("candidates") or [] if c.get("chosen")), {})
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

    @staticmethod
    def _weight_only(config: dict, details: dict) -> str:
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
                f"{mixed.get('backup')}, {fmt_num(mixed.get('low_bit_share'))} of the MatMul weights in "
                f"{config.get('weights')}"
            )
        search = details.get("search")
        if isinstance(search, dict):
            text += f"; {len(search.get('candidates') or [])} mixes tried for target {fmt_num(search.get('target'))}"
        return text

    def after_changes(self, raw: dict, name: str) -> list[Section]:
        out = []
        cands, target = search_candidates(raw)
        if cands:
            table = Table(SEARCH_HEADERS, search_rows(raw), chart=Chart("search", raw))
            out.append(Section("search", f"{name}: search (target {fmt_num(target)})", [table], name))
        ops = int8_op_rows(raw)
        if ops:
            table = Table(INT8_OP_HEADERS, ops, caption=int8_profile_summary(raw))
            out.append(Section("int8 ops", f"{name}: int8 per op type", [table], name, terminal=True))
        sens = sensitivity_rows(raw)
        if sens:
            out.append(
                Section("sensitivity", f"{name}: per-node sensitivity", [Table(sensitivity_headers(raw), sens)], name)
            )
        return out


VIEWS: dict[str, StepView] = {v.type: v for v in (ExportView(), PruneView(), FinetuneView(), QuantizeView()) if v.type}
ANY_STEP = StepView()


def view_for(step_type: str | None) -> StepView:
    """The view of a pass type; StepView for the original and for a type without a view of its own."""
    return VIEWS.get(step_type or "", ANY_STEP)
