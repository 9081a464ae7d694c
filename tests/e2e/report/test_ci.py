"""Results where CI shows them: --junit gates, the GitHub job summary, `compare` regression limits and exit codes,
and the Makefile target a CI job calls."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import EXPORT, REPO, digits_recipe, run_cli, write_recipe

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic"}]


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    """One digits int8 run with a gate that holds and one that cannot: (recipe, out, junit path, summary path)."""
    tmp = tmp_path_factory.mktemp("ci")
    gates = {"max_accuracy_drop": 0.05, "max_size_bytes": 10}
    recipe = write_recipe(tmp, digits_recipe(digits, PASSES, report=FAST, gates=gates))
    summary = tmp / "summary.md"
    summary.write_text("earlier step's summary\n")
    import os

    os.environ["GITHUB_STEP_SUMMARY"] = str(summary)
    try:
        result = run_cli("run", recipe, "-o", tmp / "out", "--junit", tmp / "gates.xml", "--quiet")
    finally:
        del os.environ["GITHUB_STEP_SUMMARY"]
    assert result.exit_code == 1, result.stderr  # max_size_bytes: 10 cannot hold
    return recipe, tmp / "out", tmp / "gates.xml", summary


def test_junit_xml_has_one_testcase_per_gate_with_limit_value_and_failure(finished):
    _, out, junit, _ = finished
    report = json.loads((out / "report.json").read_text())
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "2" and root.get("failures") == "1"
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {g["name"] for g in report["gates"]}
    for gate in report["gates"]:
        case = cases[gate["name"]]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props == {"limit": str(gate["limit"]), "value": str(gate["value"])}
        failure = case.find("failure")
        assert (failure is None) == gate["passed"]
    message = cases["max_size_bytes"].find("failure").get("message")
    size = report["steps"][-1]["size_bytes"]
    assert f"value {size}" in message and "limit 10" in message


def test_github_step_summary_gets_the_markdown_report_appended(finished):
    _, out, _, summary = finished
    text = summary.read_text()
    assert text.startswith("earlier step's summary\n")  # appended, not replaced
    assert (out / "report.md").read_text().strip() in text


def edited(report: Path, tmp: Path, name: str, change) -> Path:
    data = copy.deepcopy(json.loads(report.read_text()))
    change(data["steps"][-1])
    path = tmp / name / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


def slowed(report: Path, tmp: Path) -> Path:
    """A report whose final artifact really is slower: the same graph plus a heavy side output (two MatMuls fed by
    the input, so nothing folds at load). compare re-times both artifacts side by side; an edited p50 decides nothing."""
    import hashlib

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    data = json.loads(report.read_text())
    model = onnx.load(data["output"]["path"])
    g, x = model.graph, model.graph.input[0].name
    rng = np.random.default_rng(0)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "busy_shape"),
            numpy_helper.from_array(rng.standard_normal((64, 2048)).astype(np.float32), "busy_w1"),
            numpy_helper.from_array(rng.standard_normal((2048, 2048)).astype(np.float32), "busy_w2"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Reshape", [x, "busy_shape"], ["busy_flat"]),
            helper.make_node("MatMul", ["busy_flat", "busy_w1"], ["busy_h"]),
            helper.make_node("MatMul", ["busy_h", "busy_w2"], ["busy"]),
        ]
    )
    g.output.append(helper.make_tensor_value_info("busy", onnx.TensorProto.FLOAT, ["n", 2048]))
    folder = tmp / "really_slower"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    sha = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    data["output"] = {**data["output"], "path": str(folder / "model.onnx"), "sha256": sha}
    (folder / "report.json").write_text(json.dumps(data))
    return folder / "report.json"


def test_compare_exits_1_on_each_kind_of_regression_and_0_within_the_limits(finished, tmp_path):
    _, out, _, _ = finished
    base = out / "report.json"

    def slower(step):
        for v in step["latency"].values():
            v["p50_ms"] *= 1.10

    def less_accurate(step):
        step["accuracy"]["value"] -= 0.01

    def larger(step):
        step["size_bytes"] = int(step["size_bytes"] * 1.03)

    limits = ["--max-latency-regression", "0.05", "--max-accuracy-drop", "0.005", "--max-size-growth", "0.02"]
    same = run_cli("compare", base, base, *limits)
    assert same.exit_code == 0, same.stderr
    for name, change, failing in [
        ("slower", slower, "max_latency_regression"),
        ("less_accurate", less_accurate, "max_accuracy_drop"),
        ("larger", larger, "max_size_growth"),
    ]:
        new = slowed(base, tmp_path) if change is slower else edited(base, tmp_path, name, change)
        result = run_cli("compare", new, base, *limits, "--json")
        assert result.exit_code == 1, result.stderr
        checks = {c["name"]: c for c in result.json()["checks"]}
        assert [n for n, c in checks.items() if not c["passed"]] == [failing]
        assert failing in result.stderr
    assert checks["max_size_growth"]["value"] == pytest.approx(0.03, abs=1e-4)
    loose = run_cli("compare", edited(base, tmp_path, "slower2", slower), base, "--max-latency-regression", "0.2")
    assert loose.exit_code == 0, loose.stderr  # 10% slower is inside a 20% limit
    plain = run_cli("compare", base, base, "--json")  # no limits: the comparison only, exit 0
    assert plain.exit_code == 0 and "checks" not in plain.json()


@pytest.mark.system
def test_makefile_ci_target_runs_and_fails_on_a_regression(finished, tmp_path):
    recipe, out, _, _ = finished
    bin_dir = Path(sys.executable).parent
    relaxed = write_recipe(tmp_path, {**json.loads((out / "report.json").read_text())["recipe"], "gates": {}})
    slow_base = edited(out / "report.json", tmp_path, "slow_base", lambda s: s["latency"]["batch_1"].update(p50_ms=1e6))
    ci = tmp_path / "ci"

    def make(baseline: Path):
        args = ["make", "-s", "-C", str(REPO), "ci-gate", f"BIN={bin_dir}", f"RECIPE={relaxed}", f"OUT={ci}"]
        return subprocess.run([*args, f"BASELINE={baseline}"], capture_output=True, text=True, timeout=300)

    good = make(slow_base)  # a baseline 1000 s slow: no regression
    assert good.returncode == 0, good.stderr
    assert ET.parse(ci / "junit.xml").getroot().tag == "testsuites"
    assert ET.parse(ci / "compare-junit.xml").getroot().get("failures") == "0"

    def accurate(step):  # as slow as before (latency noise is not the point here), far more accurate
        step["latency"]["batch_1"]["p50_ms"] = 1e6
        step["accuracy"]["value"] = 1.5

    bad = make(edited(out / "report.json", tmp_path, "accurate_base", accurate))
    assert bad.returncode != 0 and "regression: max_accuracy_drop (" in bad.stderr
