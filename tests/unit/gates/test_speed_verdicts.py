"""Speed verdicts decided on fake timings: an interleaved A/B ratio with a confidence interval, three outcomes (holds /
fails / inconclusive), and the gates that read them. The CLI runs are in tests/e2e/gates/test_verdicts.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from optcli.abtest import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    measure_ratios,
    race,
    ratio_interval,
    rounds_for,
    verdict_at_least,
    verdict_at_most,
)
from optcli.gates import check_gates, default_gates
from optcli.model import InputSpec


def fake_ratio(a_times, b_times, runs=1):
    """measure_ratios on fake runners: each call returns the next of its given times, the timer takes it as the
    time the call took (deterministic, no clock)."""
    a, b = iter(a_times), iter(b_times)
    rounds = len(a_times) // runs - 1  # the first value of each is the warm-up
    return measure_ratios([lambda: next(a), lambda: next(b)], rounds, runs, warmup=1, timer=lambda call: call())[0]


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
    measure_ratios([lambda: order.append("a") or 1.0, lambda: order.append("b") or 1.0], 2, 2, 0, lambda c: c())
    assert order == ["a", "b", "a", "b", "b", "a", "b", "a"]  # every other round reversed


def test_a_race_times_every_contender_against_the_base_in_the_same_rounds():
    # Fake runners whose "time" is a fixed cost plus a burst that hits whatever runs during round 2: the burst lands
    # on every model of that round alike, so the ratios stay what the costs say.
    calls = []

    def runner(cost):
        def call(feeds):
            calls.append(cost)
            return cost * (3.0 if 12 < len(calls) <= 24 else 1.0)  # calls 12-23: rounds 0 and 1

        call.inputs = [InputSpec("x", (1, 4), "float32")]  # type: ignore[attr-defined]
        return call

    base, fast, slow = runner(10.0), runner(5.0), runner(12.0)
    ratios = race(base, [fast, slow], batch=1, warmup=1, runs=10, timer=lambda call: call())
    assert [round(r.value, 6) for r in ratios] == [0.5, 1.2]
    # 3 warm-up calls and a 9-call probe, then rounds of 2 turns: every turn runs all three, every other round reversed.
    assert calls[12:21] == [10.0, 5.0, 12.0, 10.0, 5.0, 12.0, 12.0, 5.0, 10.0]


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


def _measured(value: float, spread: float, rounds: int = 5) -> dict:
    """An A/B result as abtest makes it: per-round log-ratios around `value`, and the interval they give."""
    swings = np.linspace(-spread, spread, rounds)
    return {"batch_1": ratio_interval(np.ones(rounds), value * np.exp(swings))}


def _slowdown(first: dict, second: dict | None) -> dict:
    recheck = (lambda: second) if second is not None else None
    gates = default_gates(_steps(), 0, first, speed=True, recheck=recheck)
    return next(g for g in gates if "slowdown" in g["name"])


def test_default_speed_gate_fails_only_when_a_second_ab_confirms_the_slowdown():
    slower, quiet = _measured(1.8, 0.1), _measured(1.0, 0.1)
    confirmed = _slowdown(slower, slower)
    assert confirmed["verdict"] == FAILS and not confirmed["passed"] and "two A/B" in confirmed["note"]
    assert confirmed["interval"][1] - confirmed["interval"][0] < np.diff(slower["batch_1"].interval)[0]  # pooled
    burst = _slowdown(slower, quiet)  # a burst during the first A/B only: the second alone is under the limit
    assert burst["verdict"] != FAILS and burst["passed"] and "a second A/B decided" in burst["note"]


def test_an_inconclusive_first_verdict_is_decided_on_both_measurements_pooled():
    # A model truly ~1.17x slower on a busy machine: the first interval just touches the 1.10 limit (inconclusive),
    # the second A/B alone is as wide; the rounds of both together put it past the limit, as a quiet machine would.
    first, second = _measured(1.16, 0.1), _measured(1.18, 0.1)
    assert _slowdown(first, None)["verdict"] == INCONCLUSIVE
    assert verdict_at_most(second["batch_1"].low, second["batch_1"].high, 1.10) == INCONCLUSIVE
    decided = _slowdown(first, second)
    assert decided["verdict"] == FAILS and decided["interval"][0] > 1.10 and "both together" in decided["note"]
    # ... and a model at its baseline's speed, first measured in a burst, holds once both are counted
    assert _slowdown(_measured(1.05, 0.15), _measured(0.95, 0.05))["verdict"] == HOLDS


def test_default_speed_gate_forgives_a_few_percent_a_busy_machine_cannot_resolve():
    # 1.07x [1.06-1.08]: slower with confidence, but under the 10 % minimum effect the default gate asks for.
    slightly = {"batch_1": _ratio(1.07, 1.06, 1.08)}
    (gate,) = [g for g in default_gates(_steps(), 0, slightly, speed=True) if "slowdown" in g["name"]]
    assert gate["verdict"] == HOLDS and gate["passed"]


def test_a_tiny_models_rounds_last_long_enough_to_sample_the_machine():
    from optcli.abtest import MIN_ROUND_SECONDS, runs_per_round

    fast = [lambda: 50e-6, lambda: 60e-6]  # 50 us per call: 30 calls would fit inside one burst of other work
    assert runs_per_round(fast, 6, timer=lambda call: call()) * (50e-6 + 60e-6) >= MIN_ROUND_SECONDS
    slow = [lambda: 0.2, lambda: 0.3]  # a real model: the recipe's runs already take long enough
    assert runs_per_round(slow, 6, timer=lambda call: call()) == 6
    # one tiny model against a heavy one: sized on the pair, not on the tiny one (500 calls of the heavy one would
    # make a round last 15 s)
    lopsided = [lambda: 50e-6, lambda: 0.03]
    assert runs_per_round(lopsided, 1, timer=lambda call: call()) == 1
