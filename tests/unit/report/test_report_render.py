"""Rendering and writing of reports (the optcli.report package): no torch, fast."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from optcli import report as rep
from optcli.report.terminal import EpochProgress, LineFeedback, render_pass_catalog, render_table

EVIL = "2-prune<script>alert(1)</script>"


def _latency(p50: float) -> dict:
    return {"p50_ms": p50, "p90_ms": p50 * 1.2, "p99_ms": p50 * 1.5, "throughput_per_s": 1000 / p50, "runs": 30}


def make_report() -> dict:
    per_layer = {f"encoder.layer.{i}.dense": 0.3 + 0.04 * i for i in range(14)}
    per_layer["classifier[0]"] = float("nan")  # unmeasured: must not crash or rank
    return {
        "optcli_version": "0.1.0",
        "recipe": {"passes": [{"type": "export"}, {"type": "prune", "sparsity": 0.5}, {"type": "quantize"}]},
        "environment": {
            "python": "3.11.7",
            "torch": "2.13.0",
            "onnxruntime": "1.32.0",
            "cpu": "x86_64 Test CPU",
            "threads": 2,
        },
        "input": {"path": "models/mlp.pt", "format": "torch", "sha256": "a" * 64},
        "output": {"path": "out/model.onnx", "format": "onnx", "sha256": "b" * 64},
        "evaluation": "accuracy on data.eval (1797 samples)",
        "steps": [
            {
                "name": "original",
                "type": None,
                "format": "torch",
                "path": "models/mlp.pt",
                "seconds": None,
                "size_bytes": 1_234_567,
                "compressed_bytes": 1_100_000,
                "parameters": 300_000,
                "nonzero_parameters": 300_000,
                "sparsity": 0.0,
                "latency": {"batch_1": _latency(0.9), "batch_32": _latency(6.0)},
                "accuracy": {"metric": "accuracy", "value": 0.97},
                "fidelity": None,
                "details": {},
            },
            {
                "name": "1-export",
                "type": "export",
                "format": "onnx",
                "path": "steps/1-export/model.onnx",
                "seconds": 1.23,
                "size_bytes": 1_200_000,
                "compressed_bytes": 1_090_000,
                "parameters": 300_000,
                "nonzero_parameters": 300_000,
                "sparsity": 0.0,
                "latency": {"batch_1": _latency(0.4), "batch_32": _latency(3.1)},
                "accuracy": None,
                "fidelity": {"cosine_mean": 0.999999, "max_abs_error": 1e-6, "top1_agreement": 1.0},
                "details": {
                    "exporter": "dynamo",
                    "max_abs_error": 1e-6,
                    "latency_note": "batch 32 measured with a padded static shape",
                },
            },
            {
                "name": EVIL,
                "type": "prune",
                "format": "onnx",
                "path": "steps/2-prune/model.onnx",
                "seconds": 42.5,
                "size_bytes": 1_190_000,
                "compressed_bytes": 700_000,
                "parameters": 300_000,
                "nonzero_parameters": 150_000,
                "sparsity": 0.5,
                "latency": {"batch_1": _latency(0.38), "batch_32": _latency(2.9)},
                "accuracy": {"metric": "accuracy", "value": 0.955},
                "fidelity": {"cosine_mean": 0.991, "max_abs_error": 0.2, "top1_agreement": 0.97},
                "details": {
                    "per_layer_sparsity": per_layer,
                    "training": {
                        "epochs": [{"epoch": i, "loss": 1.0 / i, "metric": 0.9 + 0.01 * i} for i in range(1, 6)],
                        "best_epoch": 4,
                    },
                },
            },
            {
                "name": "3-quantize",
                "type": "quantize",
                "format": "onnx",
                "path": "steps/3-quantize/model.onnx",
                "seconds": 3.0,
                "size_bytes": 320_000,
                "compressed_bytes": 250_000,
                "parameters": 300_000,
                "nonzero_parameters": 150_000,
                "sparsity": 0.5,
                "latency": {"batch_1": _latency(0.2), "batch_32": _latency(float("nan"))},
                "accuracy": {"metric": "accuracy", "value": 0.952},
                "fidelity": {"cosine_mean": 0.98, "max_abs_error": 0.4, "top1_agreement": 0.95},
                "details": {
                    "search": {
                        "target": 0.95,
                        "candidates": [
                            {"name": "per-tensor", "latency_ms": 0.18, "metric": 0.93, "chosen": False},
                            {"name": "per-channel", "latency_ms": 0.2, "metric": 0.952, "chosen": True},
                            {"name": "skip-first", "latency_ms": 0.26, "metric": 0.961, "chosen": False},
                        ],
                    }
                },
            },
        ],
        "gates": [
            {"name": "max_accuracy_drop", "limit": 0.01, "value": 0.018, "passed": False},
            {"name": "min_speedup", "limit": 1.5, "value": 4.5, "passed": True},
        ],
        "passed": False,
        "warnings": ["3-quantize: excluded 3 nodes whose activations hold inf: /a/MatMul <b>"],
    }


def _expected_json(report: dict) -> dict:
    def fix(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, list):
            return [fix(v) for v in o]
        return o

    return fix(copy.deepcopy(report))


# --------------------------------------------------------------------------- helpers


def test_format_bytes_and_ratio():
    assert rep.format_bytes(512) == "512 B"
    assert rep.format_bytes(1_234_567) == "1.2 MB"
    assert rep.format_bytes(999_999) == "1.0 MB"
    assert rep.format_bytes(None) == "—"
    assert rep.format_bytes(float("nan")) == "—"
    assert rep.ratio(320_000, 1_234_567) == "0.26×"
    assert rep.ratio(2.1, 1) == "2.1×"
    assert rep.ratio(25, 2) == "12×"
    assert rep.ratio(1, 0) == "—"
    assert rep.ratio(None, 3) == "—"


# --------------------------------------------------------------------------- writing


def test_write_reports_writes_three_files_and_json_round_trips(tmp_path):
    report = make_report()
    before = copy.deepcopy(report["steps"][0])
    paths = rep.write_reports(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text()) == _expected_json(report)
    assert report["steps"][0] == before  # input not mutated
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


@pytest.mark.parametrize("target", ["json.dumps", "os.replace"])
def test_failed_write_leaves_no_temp_and_no_final_files(tmp_path, monkeypatch, target):
    module, attr = target.split(".")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr({"json": json, "os": os}[module], attr, boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        rep.write_reports(make_report(), out)
    assert list(out.iterdir()) == []


def test_failed_replace_keeps_previous_reports_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rep.write_reports(make_report(), out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real_replace = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    changed = make_report()
    changed["steps"][0]["name"] = "renamed"
    with pytest.raises(OSError):
        rep.write_reports(changed, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(old)  # no temp files
    assert (out / "report.md").read_bytes() == old["report.md"]  # untouched, not truncated
    json.loads((out / "report.json").read_text())  # replaced whole or not at all


def test_atomic_path_replaces_whole_on_success_and_keeps_the_old_file_on_error(tmp_path):
    from optcli.report import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "sub" / "model.bin", "old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_text() == "old"  # nothing visible until the block succeeds
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"torn")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["model.bin"]  # no temp left either way


# --------------------------------------------------------------------------- html


def test_html_is_self_contained_with_charts(tmp_path):
    page = rep.render_html(make_report())
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(//|[a-z]+:)""", page, re.I)
    assert "<script" not in page and "<link" not in page
    charts = re.findall(r'<svg class="chart" data-chart="([^"]+)"', page)
    assert charts.count("size") == 1
    assert charts.count("latency-b1") == 1 and charts.count("latency-b32") == 1
    assert charts.count("accuracy") == 1
    assert charts.count("search") == 1 and charts.count("training") == 1
    assert page.count("<svg") == page.count("</svg>") == len(charts)
    # the search target line and the chosen point
    assert "stroke-dasharray" in page and "chosen: per-channel" in page


def test_html_escapes_text():
    page = rep.render_html(make_report())
    assert "<script>" not in page
    assert "2-prune&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "/a/MatMul &lt;b&gt;" in page


def test_html_falls_back_to_fidelity_chart_without_accuracy():
    report = make_report()
    for step in report["steps"]:
        step["accuracy"] = None
    charts = re.findall(r'data-chart="([^"]+)"', rep.render_html(report))
    assert "fidelity" in charts and "accuracy" not in charts


# --------------------------------------------------------------------------- markdown


def test_markdown_has_every_step_and_the_failed_gate():
    report = make_report()
    md = rep.render_markdown(report)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for step in report["steps"]:
        name = step["name"].replace("<", "&lt;").replace(">", "&gt;")  # no raw HTML in Markdown
        assert any(line.startswith(f"| {name} |") for line in rows), step["name"]
    assert "<script>" not in md
    assert "✗ max_accuracy_drop: 0.018 vs limit 0.01" in md
    assert "✓ min_speedup" in md
    assert "excluded 3 nodes" in md
    assert "a" * 64 in md and "out/model.onnx" in md
    assert "x86_64 Test CPU" in md
    assert "encoder.layer.13.dense" in md and "encoder.layer.3.dense" not in md  # top 10 of 14
    assert "| 4 | 0.25 | 0.94 | ★ |" in md  # training curve row, best epoch marked
    assert "batch 32 measured with a padded static shape" in md
    assert "FAILED" in md


# --------------------------------------------------------------------------- terminal


def test_render_table_shows_steps_and_size_ratio_to_the_step_before():
    report = make_report()
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    for step in report["steps"]:
        assert step["name"] in text
    last, before = report["steps"][-1]["size_bytes"], report["steps"][-2]["size_bytes"]
    assert f"{last / before:.2f}×" in text  # the terminal's × is against the step before
    assert "✗ max_accuracy_drop" in text and "✓ min_speedup" in text
    assert "excluded 3 nodes" in text
    assert "batch 32 measured with a padded static shape" in text
    assert "most pruned layers" in text and "encoder.layer.13.dense" in text
    assert "classifier[0]" not in text  # NaN sparsity is not ranked


def test_renderers_survive_a_sparse_report():
    report = {"steps": [{"name": "original"}], "gates": [], "warnings": [], "passed": None}
    Console(record=True, width=120).print(render_table(report))
    assert "original" in rep.render_markdown(report)
    assert "<svg" in rep.render_html(report)
    assert rep.render_markdown({}) and rep.render_html({})


def test_package_does_not_import_heavy_frameworks():
    assert "torch" not in rep.__dict__ and "onnxruntime" not in rep.__dict__
    sources = sorted(Path(rep.__file__).parent.glob("*.py"))
    assert len(sources) >= 7  # __init__, view, terminal, markdown, html, svg, write
    for path in sources:
        src = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|onnxruntime|onnx|numpy)\b", src, re.M), path.name


def test_pass_catalog_shows_what_a_pass_consumes_and_produces_and_bracketed_help_verbatim():
    entry = {"type": "export", "summary": "torch -> ONNX", "consumes": ["torch"], "produces": "onnx"}
    entry["options"] = [{"name": "layers", "type": "object", "default": None, "help": "[bold]globs[/bold] of layers"}]
    console = Console(file=io.StringIO(), record=True, width=200)
    console.print(render_pass_catalog([entry]))
    text = console.export_text()
    assert "export: torch -> ONNX  [torch -> onnx]" in text  # was swallowed as a Rich markup tag
    assert "[bold]globs[/bold] of layers" in text


def test_epoch_progress_shows_epoch_loss_metric_and_rate_and_is_silent_when_disabled():
    out = io.StringIO()
    bar = EpochProgress(LineFeedback(out), epochs=3)  # the run's Feedback (here: plain lines, as in a CI log)
    task = bar.epoch(2, steps=4)
    bar.update(task, advance=4, loss=0.5, metric="accuracy 0.91", rate=123.0)
    bar.close()
    text = out.getvalue()
    assert "epoch 2/3" in text and "4/4" in text
    assert "loss 0.5000" in text and "accuracy 0.91" in text and "samples/s 123" in text
    quiet = EpochProgress(False, epochs=3)
    quiet.update(quiet.epoch(1, steps=4), loss=1.0)  # silent: updates and close are no-ops, nothing printed
    quiet.close()


if __name__ == "__main__":  # render a preview: python tests/unit/report/test_report_render.py /tmp/report_preview.html
    Path(sys.argv[1] if len(sys.argv) > 1 else "report_preview.html").write_text(rep.render_html(make_report()))


def test_perplexity_changes_read_in_percent_not_in_points():
    """Points of a perplexity of 600 mean nothing: its change is relative, in every view and in report.json."""
    from optcli.report.summary import step_comparisons, verdict_sentence

    report = make_report()
    for step, ppl in zip(report["steps"], (600.0, 600.0, 606.0, 612.12), strict=False):
        step["accuracy"] = {"metric": "perplexity", "value": ppl}
    last = report["steps"][-1]
    prev = step_comparisons(report)[-1]["vs_previous"]
    assert prev["accuracy_pt"] is None
    assert prev["metric_change_pct"] == pytest.approx((last["accuracy"]["value"] / 606.0 - 1) * 100, abs=1e-3)
    assert " pt" not in verdict_sentence(report) and re.search(r"perplexity \+\d+\.\d %", verdict_sentence(report))
    console = Console(record=True, width=200)
    console.print(render_table(report))
    assert "+1.01 %" in console.export_text()
    assert "+1.01 %" in rep.render_markdown(report)
    # an accuracy stays in points
    accuracy = step_comparisons(make_report())[-1]["vs_previous"]
    assert accuracy["accuracy_pt"] is not None and accuracy["metric_change_pct"] is None
