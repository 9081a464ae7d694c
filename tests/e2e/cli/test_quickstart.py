"""The README's quick start, checked against independent re-measurement of what it wrote."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import yaml
from conftest import REPO, digits_recipe, run_cli, run_subprocess, write_recipe


def _ort_accuracy(model_path, npz):
    data = np.load(npz)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": data["x"]})[0]
    return float((logits.argmax(1) == data["y"]).mean())


def test_static_int8_keeps_digits_accuracy_within_one_point_and_report_matches_disk(digits, tmp_path):
    recipe = write_recipe(
        tmp_path,
        digits_recipe(
            digits, [{"type": "quantize", "mode": "static", "per_channel": True}], gates={"max_accuracy_drop": 0.01}
        ),
    )
    out = tmp_path / "out"
    result = run_cli("run", recipe, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()  # --json: stdout is only JSON
    assert [s["name"] for s in report["steps"]] == ["original", "1-export", "2-quantize"]  # torch model exported first
    final = report["steps"][-1]
    model = out / "model.onnx"
    assert report["output"]["path"] == str(model) and model.is_file()
    assert final["size_bytes"] == os.path.getsize(model) == os.path.getsize(out / "steps" / "2-quantize" / "model.onnx")
    assert final["size_bytes"] < 0.6 * report["steps"][1]["size_bytes"]
    assert abs(final["accuracy"]["value"] - _ort_accuracy(model, digits / "digits_test.npz")) < 1e-9
    assert report["steps"][0]["accuracy"]["value"] - final["accuracy"]["value"] <= 0.01
    ops = {n.op_type for n in __import__("onnx").load(str(model)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert json.loads((out / "report.json").read_text())["steps"][-1]["size_bytes"] == final["size_bytes"]
    assert (out / "report.md").read_text().count("2-quantize") >= 1
    assert "<svg" in (out / "report.html").read_text()
    assert report["passed"] and report["gates"][0]["name"] == "max_accuracy_drop"
    for batch in ("batch_1", "batch_8"):
        lat = final["latency"][batch]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]


def test_failed_gate_exits_1_and_names_the_gate(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, [{"type": "quantize"}], gates={"max_size_bytes": 1000}))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 1
    assert "max_size_bytes" in result.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passed"] is False


def test_shipped_example_recipe_validates_and_resolves_relative_to_the_recipe(digits, tmp_path):
    # configs/ points at ../build/example; a copy of the repo layout in tmp keeps the test independent of `make example`.
    (tmp_path / "configs").mkdir()
    (tmp_path / "build").mkdir()
    os.symlink(digits, tmp_path / "build" / "example")
    recipe = yaml.safe_load((REPO / "configs" / "digits_static_int8.yaml").read_text())
    recipe["model"]["factory_kwargs"] = {"width": 16}
    path = write_recipe(tmp_path / "configs", recipe, "digits_static_int8.yaml")
    result = run_cli("validate", path, cwd=tmp_path / "build")
    assert result.exit_code == 0, result.stderr
    assert "1-export -> 2-quantize" in result.stderr


def test_help_is_instant_without_torch_or_onnxruntime():
    code = (
        "import sys\nfrom optcli.cli import main\nsys.argv=['optcli','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch','onnxruntime','onnx','numpy') if m in sys.modules), file=sys.stderr)"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    assert "run" in proc.stdout and "validate" in proc.stdout


def test_python_dash_m_and_json_stdout_is_pure(digits, tmp_path):
    # This checks stdout, not speed: dynamic int8 on the digits CNN runs ConvInteger, slower than fp32, and the
    # default speed gate would rightly fail it.
    quantize = {"type": "quantize", "mode": "dynamic", "allow_slower": True}
    recipe = write_recipe(tmp_path, digits_recipe(digits, [quantize]))
    result = run_subprocess("run", recipe, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # nothing but JSON on stdout, even with the exporter's chatter
    assert report["steps"][1]["details"]["exporter"] in ("dynamo", "torchscript")
    assert "optcli" in result.stderr  # progress went to stderr
