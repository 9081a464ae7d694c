"""Latency verdicts carry their noise: an interleaved A/B ratio with a confidence interval, and three outcomes
(holds / fails / inconclusive) whose exit code for inconclusive is the user's choice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import digits_recipe, run_cli, write_recipe

from optcli.abtest import FAILS, HOLDS, INCONCLUSIVE

FAST = {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 10, "threads": 1}}
PASSES = [{"type": "export"}, {"type": "quantize", "mode": "static"}]


def _ratio(value, low, high):
    return SimpleNamespace(value=value, low=low, high=high, rounds=5, runs=1, interval=[low, high])


# --------------------------------------------------------------------------- the CLI, as a user runs it


@pytest.fixture(scope="module")
def quantized(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verdicts")
    recipe = write_recipe(tmp, digits_recipe(digits, PASSES, report=FAST, gates={"min_speedup": 0.01}))
    result = run_cli("run", recipe, "-o", tmp / "out", "--quiet", "--json")
    return tmp, recipe, result


def test_min_speedup_the_model_clearly_meets_holds_with_its_interval(quantized):
    _, _, result = quantized
    assert result.exit_code == 0, result.stderr
    (gate,) = [g for g in result.json()["gates"] if g["name"] == "min_speedup"]
    assert gate["verdict"] == HOLDS and gate["passed"]
    low, high = gate["interval"]
    assert 0.01 < low <= gate["value"] <= high


def test_min_speedup_the_model_cannot_meet_fails_with_exit_1(quantized):
    tmp, recipe, _ = quantized
    result = run_cli("run", recipe, "-o", tmp / "out100", "--quiet", "--set", "gates.min_speedup=100")
    assert result.exit_code == 1 and "min_speedup" in result.stderr
    (gate,) = [g for g in json.loads((tmp / "out100/report.json").read_text())["gates"] if g["name"] == "min_speedup"]
    assert gate["verdict"] == FAILS and gate["interval"][1] < 100


def test_compare_of_a_report_with_itself_holds_a_5_percent_latency_limit(quantized):
    tmp, _, _ = quantized
    report = tmp / "out" / "report.json"
    result = run_cli("compare", report, report, "--max-latency-regression", "0.05", "--json")
    assert result.exit_code == 0, result.stderr
    (check,) = result.json()["checks"]
    assert check["verdict"] in (HOLDS, INCONCLUSIVE) and check["interval"][0] <= 0.05


def test_compare_without_the_artifacts_is_inconclusive_and_exit_code_follows_the_users_choice(quantized, tmp_path):
    tmp, _, _ = quantized
    data = json.loads((tmp / "out" / "report.json").read_text())
    data["output"]["path"] = str(tmp_path / "gone" / "model.onnx")
    moved = tmp_path / "report.json"
    moved.write_text(json.dumps(data))
    args = ["compare", moved, tmp / "out" / "report.json", "--max-latency-regression", "0.05", "--json"]
    lenient = run_cli(*args)
    assert lenient.exit_code == 0, lenient.stderr
    (check,) = lenient.json()["checks"]
    assert check["verdict"] == INCONCLUSIVE and "not on disk" in check["note"]
    strict = run_cli(*args, "--inconclusive", "fail")
    assert strict.exit_code == 1 and "max_latency_regression" in strict.stderr


def test_inconclusive_speed_gate_exit_code_follows_the_users_choice(quantized, monkeypatch):
    tmp, recipe, _ = quantized
    import optcli.runner

    # A noisy machine, injected: the side-by-side ratio straddles min_speedup 1.2 (0.8× to 1.3× the time).
    monkeypatch.setattr(optcli.runner, "compare_runners", lambda *a, **k: {"batch_1": _ratio(0.8, 0.5, 1.3)})
    args = ["run", recipe, "-o", tmp / "noisy", "--quiet", "--overwrite", "--set", "gates.min_speedup=1.2"]
    lenient = run_cli(*args)
    assert lenient.exit_code == 0, lenient.stderr
    report = json.loads((tmp / "noisy" / "report.json").read_text())
    (gate,) = [g for g in report["gates"] if g["name"] == "min_speedup"]
    assert gate["verdict"] == INCONCLUSIVE and gate["passed"]
    assert any("min_speedup inconclusive" in w and "report.latency.runs" in w for w in report["warnings"])
    strict = run_cli(*args, "--inconclusive", "fail")
    assert strict.exit_code == 1 and "min_speedup" in strict.stderr
    assert json.loads((tmp / "noisy" / "report.json").read_text())["recipe"]["gates"]["inconclusive"] == "fail"


def test_bench_says_the_machine_was_busy(quantized, monkeypatch):
    tmp, _, _ = quantized
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a simulated load above any core count
    result = run_cli("bench", tmp / "out" / "model.onnx", "--runs", "5", "--warmup", "1")
    assert result.exit_code == 0, result.stderr
    assert "timings not trustworthy: the machine was busy" in " ".join(result.stdout.split())
    quiet = run_cli("bench", tmp / "out" / "model.onnx", "--runs", "5", "--json")
    assert "load average 64.0" in quiet.json()["busy"]
