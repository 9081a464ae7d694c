"""Latency verdicts carry their noise: an interleaved A/B ratio with a confidence interval, and three outcomes
(holds / fails / inconclusive) whose exit code for inconclusive is the user's choice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import digits_recipe, run_cli, write_recipe

from optcli.abtest import FAILS, HOLDS, INCONCLUSIVE, measure_ratio, rounds_for, verdict_at_least, verdict_at_most
from optcli.gates import check_gates, default_gates

FAST = {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 10, "threads": 1}}
PASSES = [{"type": "export"}, {"type": "quantize", "mode": "static"}]


def fake_ratio(a_times, b_times, runs=1):
    """measure_ratio on fake runners: each call returns the next of its given times, the timer takes it as the
    time the call took (deterministic, no clock)."""
    a, b = iter(a_times), iter(b_times)
    rounds = len(a_times) // runs - 1  # the first value of each is the warm-up
    return measure_ratio(lambda: next(a), lambda: next(b), rounds, runs, warmup=1, timer=lambda call: call())


def test_clearly_faster_model_holds_a_speed_limit():
    rng = np.random.default_rng(0)
    a = 10 + rng.normal(0, 0.2, 11)
    b = 5 + rng.normal(0, 0.2, 11)  # twice as fast, little noise
    r = fake_ratio(a, b)
    assert r.value == pytest.approx(0.5, rel=0.05) and r.low < r.value < r.high
    assert verdict_at_most(r.low, r.high, 1.0) == HOLDS
    assert verdict_at_least(1 / r.high, 1 / r.low, 1.5) == HOLDS  # a 1.5× speed-up holds with confidence


def test_clearly_slower_model_fails_a_speed_limit():
    rng = np.random.default_rng(1)
    r = fake_ratio(10 + rng.normal(0, 0.2, 11), 18 + rng.normal(0, 0.2, 11))
    assert r.low > 1.5
    assert verdict_at_most(r.low, r.high, 1.05) == FAILS
    assert verdict_at_least(1 / r.high, 1 / r.low, 1.0) == FAILS


def test_noisy_rounds_around_the_limit_are_inconclusive_not_a_coin_flip():
    # Same speed on average, but a busy machine makes each round's ratio swing from 0.6× to 1.7×.
    swings = [0.6, 1.7, 0.8, 1.4, 0.7, 1.5, 0.9, 1.3]
    r = fake_ratio([10.0] * (len(swings) + 1), [10.0] + [10 * s for s in swings])
    assert r.low < 1.0 < r.high
    assert verdict_at_most(r.low, r.high, 1.05) == INCONCLUSIVE
    assert verdict_at_least(1 / r.high, 1 / r.low, 1.2) == INCONCLUSIVE


def test_models_alternate_within_each_round_so_a_burst_hits_both():
    order = []
    measure_ratio(lambda: order.append("a") or 1.0, lambda: order.append("b") or 1.0, 2, 2, 0, lambda c: c())
    assert order == ["a", "b", "a", "b", "b", "a", "b", "a"]  # every other round reversed


def test_ab_cost_follows_report_latency_runs():
    assert rounds_for(3) == (5, 1)  # a test recipe's few runs: a few calls per model
    rounds, per_round = rounds_for(100)
    assert rounds * per_round == 100


def _steps(quantize_details=None):
    step = {"latency": {"batch_1": {"p50_ms": 1.0}}, "fidelity": {"cosine_mean": 1.0}, "size_bytes": 10}
    step["compressed_bytes"] = 10
    return [
        {**step, "name": "original", "type": None, "path": "m.onnx"},
        {**step, "name": "1-quantize", "type": "quantize", "path": "s/m.onnx", "details": quantize_details or {}},
    ]


def _ratio(value, low, high):
    return SimpleNamespace(value=value, low=low, high=high, rounds=5, runs=1, interval=[low, high])


@pytest.mark.parametrize(
    "ratio, policy, verdict, passed",
    [
        ((0.5, 0.45, 0.55), "pass", HOLDS, True),
        ((2.0, 1.8, 2.2), "pass", FAILS, False),
        ((0.8, 0.5, 1.3), "pass", INCONCLUSIVE, True),
        ((0.8, 0.5, 1.3), "fail", INCONCLUSIVE, False),
    ],
)
def test_min_speedup_gate_says_its_interval_and_inconclusive_follows_the_users_choice(ratio, policy, verdict, passed):
    gates = SimpleNamespace(max_accuracy_drop=None, min_fidelity_cosine=None, max_size_bytes=None, min_speedup=1.2)
    gates.max_perplexity_increase = None
    (gate,) = check_gates(gates, _steps(), baseline=0, ab={"batch_1": _ratio(*ratio)}, inconclusive=policy)
    assert gate["verdict"] == verdict and gate["passed"] is passed
    assert gate["value"] == pytest.approx(1 / ratio[0], abs=1e-3)
    assert gate["interval"] == [pytest.approx(1 / ratio[2], abs=1e-3), pytest.approx(1 / ratio[1], abs=1e-3)]


def test_default_speed_gate_fails_only_a_model_slower_with_confidence_and_not_weight_only_int4():
    slower = {"batch_1": _ratio(1.8, 1.6, 2.0)}
    noisy = {"batch_1": _ratio(1.2, 0.8, 1.8)}
    by_name = {g["name"]: g for g in default_gates(_steps(), 0, slower, speed=True)}
    assert by_name["max_slowdown (default)"]["verdict"] == FAILS and not by_name["max_slowdown (default)"]["passed"]
    by_name = {g["name"]: g for g in default_gates(_steps(), 0, noisy, speed=True)}
    assert by_name["max_slowdown (default)"]["verdict"] == INCONCLUSIVE and by_name["max_slowdown (default)"]["passed"]
    int4 = default_gates(_steps({"weight_only": {"bits": 4}}), 0, slower, speed=True)
    assert "max_slowdown (default)" not in {g["name"] for g in int4}
    allowed = default_gates(_steps(), 0, slower, passes=[SimpleNamespace(allow_slower=True)], speed=True)
    assert "max_slowdown (default)" not in {g["name"] for g in allowed}


def test_default_speed_gate_fails_only_when_a_second_ab_confirms_the_slowdown():
    slower, quiet = {"batch_1": _ratio(1.8, 1.6, 2.0)}, {"batch_1": _ratio(1.0, 0.9, 1.1)}
    (confirmed,) = [
        g for g in default_gates(_steps(), 0, slower, speed=True, recheck=lambda: slower) if "slowdown" in g["name"]
    ]
    assert confirmed["verdict"] == FAILS and not confirmed["passed"] and "two A/B" in confirmed["note"]
    (burst,) = [
        g for g in default_gates(_steps(), 0, slower, speed=True, recheck=lambda: quiet) if "slowdown" in g["name"]
    ]
    assert burst["verdict"] == INCONCLUSIVE and burst["passed"] and "re-measurement did not" in burst["note"]
    assert burst["value"] == pytest.approx(1.0)  # the gate shows the measurement it ended on


def test_default_speed_gate_forgives_a_few_percent_a_busy_machine_cannot_resolve():
    # 1.07x [1.06-1.08]: slower with confidence, but under the 10 % minimum effect the default gate asks for.
    slightly = {"batch_1": _ratio(1.07, 1.06, 1.08)}
    (gate,) = [g for g in default_gates(_steps(), 0, slightly, speed=True) if "slowdown" in g["name"]]
    assert gate["verdict"] == HOLDS and gate["passed"]


def test_a_tiny_models_rounds_last_long_enough_to_sample_the_machine():
    from optcli.abtest import MIN_ROUND_SECONDS, runs_per_round

    fast = [lambda: 50e-6, lambda: 60e-6]  # 50 us per call: 30 calls would fit inside one burst of other work
    assert runs_per_round(fast, 6, timer=lambda call: call()) * 50e-6 >= MIN_ROUND_SECONDS
    slow = [lambda: 0.2, lambda: 0.3]  # a real model: the recipe's runs already take long enough
    assert runs_per_round(slow, 6, timer=lambda call: call()) == 6


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
