"""exporter: auto exports with both exporters and keeps the graph ONNX Runtime runs faster, on the figures it records."""

from __future__ import annotations

import onnx
from conftest import digits_recipe, run_cli, write_recipe


def test_auto_export_keeps_the_faster_graph_and_says_why(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "export"}]))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    details = result.json()["steps"][-1]["details"]
    ms = details["exporters_ms"]
    assert set(ms) == {"dynamo", "torchscript"} and all(v > 0 for v in ms.values())
    faster = "torchscript" if ms["torchscript"] < 0.97 * ms["dynamo"] else "dynamo"
    assert details["exporter"] == faster
    assert details["exporter_choice"].startswith(faster)
    # One graph is written, no leftovers of the other.
    step = tmp_path / "out" / "steps" / result.json()["steps"][-1]["name"]
    assert not (step / "dynamo").exists() and not (step / "torchscript").exists()
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))


def test_an_explicit_exporter_exports_once(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "export", "exporter": "torchscript"}]))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    details = result.json()["steps"][-1]["details"]
    assert details["exporter"] == "torchscript" and "exporters_ms" not in details
