"""The search's plan and time budget, decided with a fake clock and fake trials (no model run). The digits search run
is in tests/e2e/passes/quantize/test_search_budget.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from optcli.passes.quantize.config import Search as SearchSpace
from optcli.passes.quantize.ort import Settings
from optcli.passes.quantize.search import Goal, Search, estimate_s, plan_line
from optcli.passes.quantize.search import engine as search_engine


def test_estimate_is_seconds_per_trial_times_planned_trials_capped_by_the_budget():
    assert estimate_s(14.0, 9, 1800.0) == 14.0 * 9
    assert estimate_s(300.0, 9, 1800.0) == 1800.0


def test_plan_line_says_candidates_cap_budget_and_estimate():
    assert plan_line(9, 24, 1800.0) == "search: 9 candidates planned (max_trials 24), budget 30 min"
    line = plan_line(9, 24, 1800.0, 14.0)
    assert line == "search: 9 candidates planned (max_trials 24), budget 30 min; ~2 min at 14 s per trial"
    assert plan_line(4, 24, 1800.0, 0.063).endswith("; ~0.3 s at 0.1 s per trial")  # a small model: no "~0 s"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEvaluation:
    """Every measurement takes `seconds` on the fake clock and scores `value`."""

    latency_runs = 1
    batches: list = []

    def __init__(self, clock: FakeClock, seconds: float, value: float):
        self.clock, self.seconds, self.value = clock, seconds, value

    def measure(self, path, subset=None, timed=True):
        self.clock.now += self.seconds
        return self.value, 1.0


class Ctx:
    def __init__(self, folder):
        self.step_dir, self.step_name = folder, "quantize"
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    warn = log


def fake_search(tmp_path, monkeypatch, budget: float, trial_s: float, value: float = 1.0, max_trials: int = 24):
    clock = FakeClock()
    monkeypatch.setattr(search_engine, "size_on_disk", lambda path: {"size_bytes": path.stat().st_size})
    model = tmp_path / "model.onnx"
    model.write_bytes(b"0" * 10)

    class Timed(Search):
        def write_candidate(self, settings, tag):
            target = self.work / tag / "model.onnx"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"0" * 5)
            return target

    Timed.clock = staticmethod(clock)
    space = SearchSpace(time_budget_s=budget, max_trials=max_trials, fallback=False)
    config = SimpleNamespace(search=space, allow_slower=True)
    ctx = Ctx(tmp_path)
    goal = Goal("cosine", 0.99, 1.0, True)
    search = Timed(
        config, ctx, model, SimpleNamespace(path=model), None, FakeEvaluation(clock, trial_s, value), goal, None
    )
    return search, ctx


def candidates(n: int) -> list[Settings]:
    return [Settings("static", True, "minmax", float(alpha)) for alpha in np.linspace(0.1, 1, n)]


def test_search_logs_its_plan_before_the_first_trial_and_the_estimate_after_it(tmp_path, monkeypatch):
    search, ctx = fake_search(tmp_path, monkeypatch, budget=1800.0, trial_s=14.0)
    search.run(candidates(9))
    assert ctx.lines[0] == "quantize: search: 9 candidates planned (max_trials 24), budget 30 min"
    assert (
        "quantize: search: 9 candidates planned (max_trials 24), budget 30 min; ~2 min at 14 s per trial" in ctx.lines
    )
    assert search.plan["estimate_s"] == 14.0 * 9 and search.skipped == []


def test_search_stops_when_the_remaining_budget_cannot_fit_one_more_trial(tmp_path, monkeypatch):
    # fp32 (10 s) + 3 trials of 10 s = 40 s; 5 s left of 45 is less than one trial: 6 of 9 candidates skipped.
    search, _ = fake_search(tmp_path, monkeypatch, budget=45.0, trial_s=10.0)
    search.run(candidates(9))
    assert search.trials_used() == 3
    assert [s["count"] for s in search.skipped] == [6]
    assert search.skipped[0]["why"] == "the remaining time budget (5.0 s) is less than one trial (~10 s)"
    assert "less than one trial" in search.skipped[0]["why"] and any("6 candidates skipped" in n for n in search.notes)


def test_search_planned_count_is_capped_by_max_trials(tmp_path, monkeypatch):
    search, ctx = fake_search(tmp_path, monkeypatch, budget=1800.0, trial_s=1.0, max_trials=4)
    search.run(candidates(9))
    assert search.plan["candidates"] == 4 and search.trials_used() == 4
    assert ctx.lines[0].startswith("quantize: search: 4 candidates planned (max_trials 4)")
