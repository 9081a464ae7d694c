"""The search engine: candidates tried in order within max_trials and time_budget_s, each written, measured and
kept only while it can still win; then the fallbacks (fallbacks.py) from the best one. The budget is checked
before each trial: a trial is not started when the pace so far says it cannot finish in time."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from optcli.measure import size_on_disk
from optcli.passes.quantize import profile as prof
from optcli.passes.quantize.ort import Settings
from optcli.passes.quantize.search import fallbacks
from optcli.passes.quantize.search.evaluation import Evaluation, head
from optcli.passes.quantize.search.goal import Goal, best_trial, contenders
from optcli.progress import ProgressTask


@dataclass
class Trial:
    name: str
    settings: Settings | None  # None: the fp32 input, for comparison
    metric: float | None = None
    latency_ms: float | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    meets: bool = False
    path: Path | None = None
    error: str | None = None
    slower_in_int8: list[str] = field(default_factory=list)  # nodes this trial keeps fp32 because the profile said so

    def row(self, chosen: bool) -> dict:
        row = {
            "name": self.name,
            "config": self.settings.summary() if self.settings else {"mode": "fp32"},
            "metric": None if self.metric is None else round(self.metric, 6),
            "latency_ms": self.latency_ms,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "chosen": chosen,
            "meets_target": self.meets,
        }
        if self.error:
            row["error"] = self.error
        if self.slower_in_int8:
            row["latency_fallback_nodes"] = len(self.slower_in_int8)
        return row


def estimate_s(seconds_per_trial: float, planned: int, budget_s: float) -> float:
    """The search's expected length: seconds per trial times the planned trials, never past the time budget."""
    return min(seconds_per_trial * planned, budget_s)


def minutes(seconds: float) -> str:
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def plan_line(planned: int, max_trials: int, budget_s: float, seconds_per_trial: float | None = None) -> str:
    """What the search is about to do, said before (and refined after) its first trial."""
    line = f"search: {planned} candidates planned (max_trials {max_trials}), budget {minutes(budget_s)}"
    if seconds_per_trial is not None:
        total = estimate_s(seconds_per_trial, planned, budget_s)
        line += f"; ~{minutes(total)} at {minutes(seconds_per_trial)} per trial"
    return line


def fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"


class Search:
    clock = staticmethod(time.perf_counter)  # seconds; a test's fake clock stands in for trials that take long

    def __init__(
        self,
        config,
        ctx,
        source: Path,
        model,
        quantize_fn,
        evaluation: Evaluation,
        goal: Goal,
        calib_batches,
        sources: dict[str, Path] | None = None,
    ):
        self.config = config
        self.space = config.search
        self.ctx = ctx
        self.progress = ProgressTask()  # run_search's "trial k of n, best so far" task while it runs
        self.source = source
        # The graphs candidates are written from (Settings.source): the pass's input, the BN-folded graph, the raw file.
        self.sources = {"input": source, **(sources or {})}
        self.profiles: dict[str, prof.Profile] = {}
        self.regions: dict[Path, prof.Regions] = {}  # per source graph: which nodes each compute op owns
        self.stem_fp32: set[str] = set()  # leading compute nodes the stem fallback kept fp32 (accuracy)
        self.slow_figures: dict[str, dict] = {}  # node -> its fp32 / int8 region cost when the profile sent it back
        self.model = model
        self.quantize_fn = quantize_fn  # (source, target, settings, calib_batches, smooth_batches) -> details
        self.ev = evaluation
        self.goal = goal
        self.calib = calib_batches
        self.smooth_batches = calib_batches or head(evaluation.batches, self.space.sensitivity_samples)
        self.started = self.clock()
        self.trials: list[Trial] = []
        self.work = ctx.step_dir / "candidates"
        self.work.mkdir(exist_ok=True)
        self.sensitivity: dict[str, float] = {}
        self.quantizable_count: int | None = None
        self.notes: list[str] = []
        self.plan: dict = {}  # planned candidates, cap, budget and, after the first trial, the estimate
        self.skipped: list[dict] = []  # candidates not tried: how many, and why
        self.race: list[dict] = []  # the contenders timed side by side for the final choice (race_contenders)

    # ----------------------------------------------------------------- budget
    def elapsed(self) -> float:
        return self.clock() - self.started

    def out_of_budget(self) -> bool:
        return self.elapsed() >= self.space.time_budget_s

    def seconds_per_trial(self) -> float | None:
        timed = [t.seconds for t in self.trials if t.settings is not None]
        return sum(timed) / len(timed) if timed else None

    def budget_short(self) -> bool:
        """The remaining budget cannot fit one more trial at the pace measured so far: starting it would only run
        past the budget, so the result can differ from a full search only through time, never through a guess."""
        pace = self.seconds_per_trial()
        return pace is not None and self.space.time_budget_s - self.elapsed() < pace

    def budget_spent(self) -> bool:
        return self.out_of_budget() or self.budget_short()

    def skip(self, count: int, why: str) -> None:
        if count > 0:
            self.skipped.append({"count": count, "why": why})
            self.notes.append(f"{count} candidate{'s' if count != 1 else ''} skipped: {why}")

    def trials_used(self) -> int:
        return sum(1 for t in self.trials if t.settings is not None)

    def can_try(self) -> bool:
        return self.trials_used() < self.space.max_trials and not self.budget_spent()

    # ----------------------------------------------------------------- trials
    def write_candidate(self, settings: Settings, tag: str) -> Path:
        folder = self.work / tag
        folder.mkdir(exist_ok=True)
        target = folder / "model.onnx"
        source = self.sources[settings.source]
        if source not in self.regions:
            self.regions[source] = prof.Regions(source)
        written = replace(settings, exclude=self.regions[source].members(settings.exclude))
        self.quantize_fn(source, target, written, self.calib, self.smooth_batches)
        return target

    def try_settings(self, settings: Settings) -> Trial:
        trial = Trial(settings.name(), settings)
        t0 = self.clock()
        tag = f"{len(self.trials):03d}"
        try:
            trial.path = self.write_candidate(settings, tag)
            trial.metric, trial.latency_ms = self.ev.measure(trial.path)
            trial.size_bytes = size_on_disk(trial.path)["size_bytes"]
            trial.meets = self.goal.meets(trial.metric)
        except Exception as e:  # one configuration failing (an op ORT cannot quantize) must not end the search
            trial.error = f"{type(e).__name__}: {str(e).strip()[:200]}"
            trial.path = None
            shutil.rmtree(self.work / tag, ignore_errors=True)
            self.ctx.warn(f"candidate {trial.name} failed: {trial.error}")
        trial.seconds = self.clock() - t0
        self.trials.append(trial)
        self._drop_losers()
        best = self.choose()
        self.progress.advance(
            best=f"{best.name} {fmt(best.metric)}" if best is not None else None,
            time=f"{minutes(self.elapsed())} of {minutes(self.space.time_budget_s)}",
        )
        self.ctx.log(
            f"{self.ctx.step_name}: {trial.name}: {self.goal.metric} {fmt(trial.metric)}, p50 {fmt(trial.latency_ms)} ms"
            f"{' (meets target)' if trial.meets else ''}"
        )
        return trial

    def _drop_losers(self) -> None:
        """Delete written candidates that can no longer be chosen (disk: one int8 model per trial adds up); the
        contenders the final race may still pick stay."""
        keep = {id(t) for t in contenders(self.trials, self.goal)}  # the best trial is always among them
        for t in self.trials:
            if t.settings is not None and t.path is not None and id(t) not in keep:
                shutil.rmtree(t.path.parent, ignore_errors=True)
                t.path = None

    def measure_fp32(self) -> Trial:
        t0 = self.clock()
        trial = Trial("fp32 (input)", None)
        trial.metric, trial.latency_ms = self.ev.measure(self.source)
        trial.size_bytes = size_on_disk(self.model.path)["size_bytes"]
        trial.meets = self.goal.meets(trial.metric)
        trial.seconds = self.clock() - t0
        self.trials.append(trial)
        return trial

    def choose(self) -> Trial | None:
        return best_trial(self.trials, self.goal)

    # ----------------------------------------------------------------- profiles (latency fallback, the report)
    def profile_of(self, path: Path) -> prof.Profile:
        key = str(path)
        if key not in self.profiles:
            runs = max(self.ev.latency_runs, 5)
            self.profiles[key] = prof.profile(path, self.ev.profile_feeds(), self.ev.threads, runs=runs)
        return self.profiles[key]

    def compare(self, trial: Trial) -> prof.Comparison:
        """fp32 vs int8 cost per region, the fp32 side profiled on the graph the candidate was written from."""
        assert trial.settings is not None and trial.path is not None, "only a written int8 candidate is compared"
        source = self.sources[trial.settings.source]
        return prof.compare(source, self.profile_of(source), trial.path, self.profile_of(trial.path))

    # ----------------------------------------------------------------- the search
    def run(self, candidates: list[Settings]) -> tuple[Trial, Trial]:
        """Measure fp32, try the candidates, then the fallbacks; returns (fp32, chosen)."""
        fp32 = self.base_round(candidates)
        fallbacks.improve(self, fp32)
        chosen = self.choose()
        if chosen is None:
            raise RuntimeError(
                "no int8 candidate could be written and measured: "
                + "; ".join(t.error or "" for t in self.trials if t.error)[:400]
            )
        return fp32, chosen

    def base_round(self, candidates: list[Settings]) -> Trial:
        """The plan said, fp32 measured, then each candidate while the trial cap and the budget allow."""
        planned = min(len(candidates), self.space.max_trials)
        budget = self.space.time_budget_s
        self.plan = {"candidates": planned, "max_trials": self.space.max_trials, "time_budget_s": budget}
        self.plan["line"] = plan_line(planned, self.space.max_trials, budget)
        self.ctx.log(f"{self.ctx.step_name}: {self.plan['line']}")
        fp32 = self.measure_fp32()
        for i, settings in enumerate(candidates):
            # The first candidate always runs: a budget that the fp32 measurement alone used up (a loaded machine)
            # must end the search with the best it has, not with nothing.
            if self.trials_used() and (self.trials_used() >= self.space.max_trials or self.out_of_budget()):
                self.notes.append(
                    f"{'time budget' if self.out_of_budget() else 'max_trials'} reached before all base candidates were tried"
                )
                break
            if self.trials_used() and self.budget_short():
                left = budget - self.elapsed()
                pace = self.seconds_per_trial()
                assert pace is not None, "trials ran: budget_short measured their pace"
                self.skip(
                    len(candidates) - i,
                    f"the remaining time budget ({minutes(left)}) is less than one trial (~{minutes(pace)})",
                )
                break
            self.try_settings(settings)
            if self.trials_used() == 1:
                pace = self.seconds_per_trial()
                assert pace is not None, "the trial just ran"
                self.plan["seconds_per_trial"] = round(pace, 3)
                self.plan["estimate_s"] = round(estimate_s(pace, planned, budget), 3)
                self.plan["line"] = plan_line(planned, self.space.max_trials, budget, pace)
                self.ctx.log(f"{self.ctx.step_name}: {self.plan['line']}")
        return fp32
