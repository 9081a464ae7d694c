"""Each pass type's part of the report in one place: the sentence saying what its step did, and the sections its
details fill. Looked up by the step's type (VIEWS); a type without a view of its own (a new pass) gets StepView:
its settings as a sentence and the sections any step's details may fill.

Pure (no Rich, no HTML): sections are document.Section values every renderer draws alike. The keys read here are
declared in the pass's details model (optcli/passes/<family>/details.py); tests/test_report_contract.py holds them
to it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from optcli.report.model import Step
from optcli.report.sections import Chart, Items, Section, Table, Text
from optcli.report.view import (
    FIDELITY_HEADERS,
    INT8_OP_HEADERS,
    SEARCH_HEADERS,
    TRAINING_HEADERS,
    candidate_label,
    fidelity_rows,
    finite,
    fmt_count,
    fmt_num,
    graph_change_lines,
    int8_op_rows,
    int8_profile_summary,
    pruned_rows,
    search_candidates,
    search_rows,
    sensitivity_headers,
    sensitivity_rows,
    training_epochs,
    training_rows,
    training_summary,
)


def _on_off(flag: Any, yes: str, no: str) -> str:
    return yes if flag else no


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
            *self._fidelity(raw, name),
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
    def _fidelity(self, raw: dict, name: str) -> list[Section]:
        rows = fidelity_rows(raw)
        return (
            [Section("fidelity", f"{name}: fidelity per output", [Table(FIDELITY_HEADERS, rows)], name)] if rows else []
        )

    def _training(self, raw: dict, name: str) -> list[Section]:
        if not training_epochs(raw):
            return []
        said = training_summary(raw)
        blocks = [
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
        epochs = training.get("epochs") if isinstance(training.get("epochs"), list) else []
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
