"""The int8 search's decisions, unit-tested with fakes (no model is quantized or run): how a target becomes a
threshold, which trial wins, when the budget stops trials, and in which order nodes fall back to fp32."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from optcli.passes.quantize.config import Search as SearchSpace
from optcli.passes.quantize.ort import Settings
from optcli.passes.quantize.search import Goal, Search, Trial, engine, fallbacks, make_goal
from optcli.passes.quantize.search.goal import best_trial, contenders, race_winner

STATIC = Settings("static", True, "minmax")


def target(metric: str, min_value=None, max_drop=None, max_increase=None):
    return SimpleNamespace(metric=metric, min_value=min_value, max_drop=max_drop, max_increase=max_increase)


def trial(name: str, metric, latency_ms, meets: bool, path: str | None = "m.onnx") -> Trial:
    t = Trial(name, STATIC, metric=metric, latency_ms=latency_ms, meets=meets)
    t.path = Path(path) if path else None
    return t


# ----------------------------------------------------------------------------- goal scoring


def test_accuracy_drop_target_is_measured_down_from_the_original_models_score():
    goal = make_goal(target("accuracy", max_drop=0.01), 0.95)
    assert goal.higher_better and goal.threshold == pytest.approx(0.94) and goal.baseline == 0.95
    assert goal.meets(0.94) and goal.meets(0.97) and not goal.meets(0.9399)


def test_error_metric_target_is_measured_up_from_the_original_models_error():
    goal = make_goal(target("mse", max_drop=0.5), 2.0)
    assert not goal.higher_better and goal.threshold == pytest.approx(2.5)
    assert goal.meets(2.5) and goal.meets(1.0) and not goal.meets(2.6)
    assert goal.better(1.0, 2.0) and not goal.better(3.0, 2.0)


def test_relative_perplexity_target_is_a_fraction_of_the_original_models_perplexity():
    goal = make_goal(target("perplexity", max_increase=0.02), 25.0)
    assert not goal.higher_better and goal.threshold == pytest.approx(25.5)
    assert goal.meets(25.5) and not goal.meets(25.6)


def test_min_value_target_ignores_the_original_score_and_nan_never_meets_it():
    goal = make_goal(target("cosine", min_value=0.99), 0.5)
    assert goal.threshold == 0.99 and goal.higher_better
    assert not goal.meets(float("nan")) and not goal.meets(None) and goal.meets(0.995)


# ----------------------------------------------------------------------------- which candidate wins


def test_fastest_candidate_meeting_the_target_wins_over_a_more_accurate_slower_one():
    goal = Goal("cosine", 0.99, 1.0, True)
    fast, slow = trial("fast", 0.991, 1.0, True), trial("slow", 0.999, 2.0, True)
    missing = trial("fastest-but-misses", 0.9, 0.5, False)
    assert best_trial([slow, missing, fast], goal) is fast


def test_an_untimed_candidate_ranks_after_timed_ones_that_meet_the_target():
    goal = Goal("cosine", 0.99, 1.0, True)
    untimed, timed = trial("untimed", 0.999, None, True), trial("timed", 0.991, 9.0, True)
    assert best_trial([untimed, timed], goal) is timed


def test_when_nothing_meets_the_target_the_closest_metric_wins_whichever_way_is_better():
    up = Goal("accuracy", 0.99, 1.0, True)
    assert best_trial([trial("a", 0.90, 1.0, False), trial("b", 0.95, 3.0, False)], up).name == "b"
    down = Goal("mse", 0.1, 0.0, False)
    assert best_trial([trial("a", 0.5, 1.0, False), trial("b", 0.3, 3.0, False)], down).name == "b"


def test_fp32_failed_and_deleted_trials_are_never_chosen():
    goal = Goal("cosine", 0.99, 1.0, True)
    fp32 = Trial("fp32 (input)", None, metric=1.0, latency_ms=1.0, meets=True, path=Path("in.onnx"))
    deleted = trial("deleted", 0.999, 0.1, True, path=None)
    failed = trial("failed", None, None, False)
    assert best_trial([fp32, deleted, failed], goal) is None


def test_candidates_too_close_in_p50_to_rank_are_raced_the_rest_are_not():
    goal = Goal("cosine", 0.99, 1.0, True)
    fastest, close, closer = trial("a", 0.991, 1.0, True), trial("b", 0.995, 1.25, True), trial("c", 0.99, 1.1, True)
    far, missing = trial("far", 0.999, 1.5, True), trial("misses", 0.9, 0.5, False)
    untimed, deleted = trial("untimed", 0.999, None, True), trial("deleted", 0.999, 1.0, True, path=None)
    pool = contenders([far, close, missing, untimed, deleted, closer, fastest], goal)
    assert [t.name for t in pool] == ["a", "c", "b"]  # within 1.3x of the fastest, fastest p50 first
    assert contenders([fastest, far], goal) == [fastest]  # one contender: no race
    assert contenders([missing], goal) == [missing]  # nothing meets the goal: the closest, unraced


def test_the_race_picks_the_lowest_time_ratio_and_a_tie_keeps_the_faster_p50():
    def r(value):
        return SimpleNamespace(value=value)

    assert race_winner([r(0.80), r(0.72), r(0.75)]) == 1
    assert race_winner([r(0.75), r(0.75)]) == 0
    assert race_winner([None, r(float("nan")), r(0.9)]) == 2


def test_the_search_keeps_every_contender_on_disk_until_the_race_and_drops_the_rest(tmp_path, monkeypatch):
    search = fake_search(tmp_path, monkeypatch, lambda kept: 1.0, fallback=False)
    latencies = iter([1.0, 1.0, 1.2, 2.0])  # fp32, then three candidates: two within 1.3x of the fastest
    monkeypatch.setattr(search.ev, "measure", lambda path, subset=None, timed=True: (1.0, next(latencies)))
    search.run([replace(STATIC, smooth_alpha=a) for a in (0.1, 0.2, 0.3)])
    kept = [t.name for t in search.trials if t.path is not None]
    assert kept == [t.name for t in contenders(search.trials, search.goal)] and len(kept) == 2


# ----------------------------------------------------------------------------- the engine with fakes


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEvaluation:
    """Scores a written candidate by the nodes it keeps in fp32 (the engine tells the fake through its file), each
    measurement costing `seconds` on the fake clock."""

    latency_runs = 1
    batches = [{"x": [0.0] * 4}]
    reference = [[0.0] * 4]

    def __init__(self, clock: Clock, seconds: float, score):
        self.clock, self.seconds, self.score_of = clock, seconds, score

    def measure(self, path, subset=None, timed=True):
        self.clock.now += self.seconds
        kept = frozenset(filter(None, Path(path).read_text().split(","))) if Path(path).suffix == ".onnx" else None
        return self.score_of(kept), (1.0 if timed else None)

    def score(self, outputs) -> float:
        return 1.0


class Ctx:
    step_name = "quantize"

    def __init__(self, folder: Path):
        self.step_dir, self.lines = folder, []

    def log(self, message: str) -> None:
        self.lines.append(message)

    warn = log


def fake_search(tmp_path, monkeypatch, score, trial_s=1.0, goal=None, **space) -> Search:
    clock = Clock()
    monkeypatch.setattr(engine, "size_on_disk", lambda path: {"size_bytes": 1})

    class Fake(Search):
        def write_candidate(self, settings, tag):
            target = self.work / tag / "model.onnx"
            target.parent.mkdir(exist_ok=True)
            target.write_text(",".join(sorted(settings.exclude)))  # the fake evaluation scores by this
            return target

    Fake.clock = staticmethod(clock)
    source = tmp_path / "input.txt"
    source.write_text("")
    config = SimpleNamespace(search=SearchSpace(**space), allow_slower=True)
    goal = goal or Goal("cosine", 0.99, 1.0, True)
    model = SimpleNamespace(path=source)
    return Fake(config, Ctx(tmp_path), source, model, None, FakeEvaluation(clock, trial_s, score), goal, None)


def test_trials_stop_at_max_trials_and_the_search_says_why(tmp_path, monkeypatch):
    search = fake_search(tmp_path, monkeypatch, lambda kept: 1.0, max_trials=2, fallback=False)
    search.run([replace(STATIC, smooth_alpha=a) for a in (0.1, 0.2, 0.3, 0.4)])
    assert search.trials_used() == 2
    assert any("max_trials reached" in n for n in search.notes)


def test_the_first_candidate_runs_even_when_fp32_alone_spent_the_budget(tmp_path, monkeypatch):
    search = fake_search(tmp_path, monkeypatch, lambda kept: 1.0, trial_s=100.0, time_budget_s=50.0, fallback=False)
    fp32, chosen = search.run([STATIC, replace(STATIC, per_channel=False)])
    assert search.trials_used() == 1 and chosen.settings == STATIC
    assert any("time budget reached" in n for n in search.notes)


def test_nodes_fall_back_to_fp32_most_sensitive_first_until_the_target_holds(tmp_path, monkeypatch):
    # Sensitivity: quantizing "b" alone costs most, then "c"; "a" costs nothing. The target needs b and c in fp32.
    cost = {"a": 0.0, "b": 0.02, "c": 0.01}
    nodes = ["a", "b", "c"]
    monkeypatch.setattr(fallbacks, "quantizable_nodes", lambda path, settings, excluded: list(nodes))

    def score(kept):
        return 1.0 - sum(v for n, v in cost.items() if n not in kept)

    goal = Goal("cosine", 0.995, 1.0, True)
    search = fake_search(tmp_path, monkeypatch, score, goal=goal, max_fallback_fraction=1.0)
    base = search.try_settings(STATIC)
    assert not base.meets  # 0.97 < 0.995; b alone in fp32: 0.99, still short
    fallbacks.accuracy_fallback(search, base, best_latency=None)
    tried = [sorted(t.settings.exclude) for t in search.trials[1:]]
    assert tried == [["b"], ["b", "c"]]  # one more node per trial, in sensitivity order, stopping once it holds
    assert search.sensitivity["b"] > search.sensitivity["c"] > search.sensitivity["a"]
    assert search.choose().settings.exclude == {"b", "c"}


def test_fallback_stops_at_max_fallback_fraction_of_the_nodes(tmp_path, monkeypatch):
    nodes = ["a", "b", "c", "d"]
    monkeypatch.setattr(fallbacks, "quantizable_nodes", lambda path, settings, excluded: list(nodes))
    search = fake_search(tmp_path, monkeypatch, lambda kept: 0.5, max_fallback_fraction=0.5)
    base = search.try_settings(STATIC)
    fallbacks.accuracy_fallback(search, base, best_latency=None)
    assert search.trials_used() == 1 + 2
    assert any("limit of 2 nodes" in n for n in search.notes)


def test_fallback_starts_from_the_best_scoring_candidate_clearly_faster_than_what_meets():
    goal = Goal("cosine", 0.99, 1.0, True)
    fp32 = Trial("fp32 (input)", None, metric=1.0, latency_ms=10.0, meets=True)
    meets = trial("meets", 0.995, 8.0, True)
    close = trial("close-but-as-slow", 0.98, 7.9, False)  # within 5 % of 8 ms: falling back can only lose
    fast = trial("fast", 0.97, 4.0, False)
    faster_worse = trial("faster-worse", 0.95, 3.0, False)
    base, ceiling = fallbacks.fallback_base([meets, close, fast, faster_worse], fp32, goal, allow_slower=False)
    assert base is fast and ceiling == 8.0
    # Nothing meets: the ceiling is fp32's latency, unless a slower int8 is allowed.
    base, ceiling = fallbacks.fallback_base([close, trial("slow", 0.985, 12.0, False)], fp32, goal, False)
    assert base is close and ceiling is None
    base, _ = fallbacks.fallback_base([close, trial("slow", 0.985, 12.0, False)], fp32, goal, True)
    assert base.name == "slow"
