"""exporter: auto exports with both exporters and keeps the graph ONNX Runtime runs faster, on the figures it records;
graphs that fuse to the same kernels are not timed, so the run repeats."""

from __future__ import annotations

import onnx
from conftest import digits_recipe, run_cli, write_recipe

from optcli.passes import export


def _export(digits, tmp_path, **config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "export", **config}]))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    return result.json()["steps"][-1]


def test_graphs_with_the_same_kernels_keep_the_torch_export_one_untimed(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "kernels", lambda p: {"Conv": 4, "FusedGemm": 1})
    step = _export(digits, tmp_path)
    details = step["details"]
    assert details["exporter"] == "dynamo" and "exporters_ms" not in details
    assert "same kernels" in details["exporter_choice"]
    # One graph is written, nothing left of the other.
    step_dir = tmp_path / "out" / "steps" / step["name"]
    assert not (step_dir / "dynamo").exists() and not (step_dir / "torchscript").exists()
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))


def test_graphs_with_different_kernels_are_timed_and_the_faster_kept(digits, tmp_path, monkeypatch):
    # As if ONNX Runtime fused the TorchScript graph differently (what it does for BERT's Gelu).
    monkeypatch.setattr(export, "kernels", lambda p: {"Conv": 4, "BiasGelu": int(p.parent.name == "torchscript")})
    details = _export(digits, tmp_path)["details"]
    ms = details["exporters_ms"]
    assert set(ms) == {"dynamo", "torchscript"} and all(v > 0 for v in ms.values())
    clearly_faster = ms["torchscript"] < 0.95 * ms["dynamo"] and ms["dynamo"] >= export.MIN_TIMED_MS
    faster = "torchscript" if clearly_faster else "dynamo"
    assert details["exporter"] == faster and details["exporter_choice"].startswith(faster)
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))


def test_an_explicit_exporter_exports_once(digits, tmp_path):
    details = _export(digits, tmp_path, exporter="torchscript")["details"]
    assert details["exporter"] == "torchscript" and "exporter_choice" not in details


def test_the_torchscript_graph_is_kept_only_when_clearly_faster(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "kernels", lambda p: {"Conv": 4, "BiasGelu": int(p.parent.name == "torchscript")})
    for figures, kept in (
        ({"dynamo": 10.0, "torchscript": 8.4}, "torchscript"),
        ({"dynamo": 10.0, "torchscript": 9.7}, "dynamo"),
    ):
        monkeypatch.setattr(export, "_time_interleaved", lambda *a, f=figures, **k: dict(f))
        details = _export(digits, tmp_path / kept)["details"]
        assert details["exporter"] == kept, details["exporter_choice"]
        ops = {n.op_type for n in onnx.load(str(tmp_path / kept / "out" / "model.onnx")).graph.node}
        assert "Conv" in ops
