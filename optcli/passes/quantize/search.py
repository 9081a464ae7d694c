"""Accuracy-aware int8: find the fastest int8 model that stays inside a stated metric target.

1. Base candidates (dynamic / static QDQ, per-channel / per-tensor, calibration method, SmoothQuant alpha) are each
   written with onnxruntime.quantization and measured on the written file: metric on data.eval, latency, size.
2. If a faster candidate misses the target, nodes fall back to fp32 greedily: nodes are ranked by sensitivity
   (quantize-one-node: the metric drop when only that node is int8, on a subset of data.eval), then the most
   sensitive ones are excluded one more per trial, re-measuring each time, until the target holds.
3. Latency fallback: ONNX Runtime's profiler times the fp32 graph and the int8 candidate node by node (profile.py);
   regions (a Conv/Gemm/MatMul and the ops hanging off it) that cost more in int8 than their fp32 twin, such as
   Quantize/Dequantize islands around HardSwish or Resize, are written back in fp32 and the result re-measured.
4. The fastest candidate meeting the target wins. Int8 slower than fp32 is never kept silently.
Everything is bounded by max_trials and time_budget_s.

CNNs (graphs with Conv) get their own candidates: static QDQ only (dynamic int8 turns Conv into ConvInteger, which
has no fast kernel in ONNX Runtime: issue #12854), BatchNorm folded into the convs first, op-type subsets
(Conv / Conv+Gemm / +MatMul / all ops but the post-processing tail), asymmetric vs symmetric uint8 activations
(U8S8 is what the session fuses into QLinearConv), reduce_range from the CPU's ISA (isa.py; no VNNI: 7-bit weights).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from optcli.abtest import FAILS, HOLDS, INCONCLUSIVE, INCONCLUSIVE_HINT, compare_runners
from optcli.measure import (
    FIDELITY_METRICS,
    fidelity,
    fidelity_metric,
    higher_is_better,
    latency,
    metric_value,
    onnx_runner,
    predict,
    runner_for,
    size_on_disk,
)
from optcli.model import fixed_batch
from optcli.passes.quantize import profile as prof
from optcli.passes.quantize.isa import choose_int8
from optcli.passes.quantize.ort import Settings, quantize_onnx
from optcli.report.terminal import ProgressTask

# Ops ONNX Runtime quantizes that carry weights; sensitivity is ranked over these.
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
# A candidate must be this much faster than the best one meeting the target (or fp32) to be worth a fallback.
NOISE = 0.95
# Static candidates quantize only compute ops unless op_types is given: QDQ pairs around data-movement ops cost CPU time.
STATIC_COMPUTE_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose"]
# CNN candidates' op-type subsets, narrowest first; None: every op ORT can quantize (its QLinearSigmoid, QLinearMul,
# QLinearConcat ... keep SiLU-style activations in int8), less the post-processing tail.
CNN_OP_SUBSETS = (("Conv",), ("Conv", "Gemm"), ("Conv", "Gemm", "MatMul"), None)
DYNAMIC_CONV_NOTE = (
    "dynamic candidates skipped for this CNN: dynamic int8 turns Conv into ConvInteger, which has no fast kernel in "
    "ONNX Runtime (issue #12854; 4.6-6.3x slower than fp32 measured on two CNNs); static QDQ is tried instead"
)


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


@dataclass
class Goal:
    metric: str
    threshold: float
    baseline: float
    higher_better: bool

    def meets(self, value: float | None) -> bool:
        if value is None or not np.isfinite(value):
            return False
        return value >= self.threshold - 1e-12 if self.higher_better else value <= self.threshold + 1e-12

    def better(self, a: float | None, b: float | None) -> bool:
        if a is None:
            return False
        if b is None:
            return True
        return a > b if self.higher_better else a < b


@dataclass
class Evaluation:
    """Scores an artifact on data.eval against the reference model's outputs, and times it."""

    batches: list[dict]
    labels: np.ndarray | None
    metric: str
    reference: list[np.ndarray]
    inputs: list
    threads: int
    latency_batch: int
    latency_runs: int
    latency_warmup: int = 2

    def score(self, outputs: list[np.ndarray]) -> float:
        """The metric of outputs computed on the first len(outputs) eval samples."""
        n = len(outputs[0])
        if self.metric in FIDELITY_METRICS:
            return fidelity_metric(self.metric, fidelity([r[:n] for r in self.reference], outputs))
        return metric_value(self.metric, outputs, self.labels[:n])

    def measure(self, path: Path, subset: int | None = None, timed: bool = True) -> tuple[float, float | None]:
        runner = onnx_runner(path, self.inputs, self.threads)
        batches = self.batches if subset is None else _head(self.batches, subset)
        outputs = predict(runner, batches)
        value = self.score(outputs)
        lat = time_p50(path, self, runner) if timed else None
        return value, lat

    def profile_feeds(self) -> dict:
        return self.batches[0]


def time_p50(path: Path, ev: Evaluation, runner=None) -> float | None:
    """p50 latency of the artifact at the search's batch and threads (the figure every trial is judged by): the
    report's latency loop (measure.latency) with the recipe's warm-up, so a trial and its report row agree."""
    runner = runner or onnx_runner(path, ev.inputs, ev.threads)
    figures, _ = latency(runner, [ev.latency_batch], warmup=ev.latency_warmup, runs=ev.latency_runs)
    return figures[f"batch_{ev.latency_batch}"]["p50_ms"] if figures else None


def time_ratio(fp32: Path, int8: Path, ev: Evaluation):
    """int8 time over fp32's (abtest.Ratio), both sessions run interleaved in this process at the search's batch,
    threads and runs: what the "int8 faster than fp32" gate decides on, never two p50s taken minutes apart."""
    runners = [onnx_runner(p, ev.inputs, ev.threads) for p in (fp32, int8)]
    ratios = compare_runners(*runners, [ev.latency_batch], ev.latency_warmup, ev.latency_runs)
    return ratios.get(f"batch_{ev.latency_batch}")


def faster_verdict(ratio) -> str:
    """int8 faster than fp32: holds when the whole interval of int8/fp32 time is below 1, fails when it is at or
    above 1 (as fast at best), inconclusive when the machine's noise straddles 1."""
    if ratio is None:
        return INCONCLUSIVE
    return HOLDS if ratio.high < 1.0 else FAILS if ratio.low >= 1.0 else INCONCLUSIVE


def estimate_s(seconds_per_trial: float, planned: int, budget_s: float) -> float:
    """The search's expected length: seconds per trial times the planned trials, never past the time budget."""
    return min(seconds_per_trial * planned, budget_s)


def _minutes(seconds: float) -> str:
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def plan_line(planned: int, max_trials: int, budget_s: float, seconds_per_trial: float | None = None) -> str:
    """What the search is about to do, said before (and refined after) its first trial."""
    line = f"search: {planned} candidates planned (max_trials {max_trials}), budget {_minutes(budget_s)}"
    if seconds_per_trial is not None:
        total = estimate_s(seconds_per_trial, planned, budget_s)
        line += f"; ~{_minutes(total)} at {_minutes(seconds_per_trial)} per trial"
    return line


def _head(batches: list[dict], n: int) -> list[dict]:
    out, total = [], 0
    for feeds in batches:
        if total >= n:
            break
        out.append(feeds)
        total += len(next(iter(feeds.values())))
    return out


def make_goal(target, reference_value: float) -> Goal:
    if target.metric in FIDELITY_METRICS:
        higher = FIDELITY_METRICS[target.metric][1]
    else:
        higher = higher_is_better(target.metric)
    if target.min_value is not None:
        threshold = target.min_value
    else:
        threshold = reference_value - target.max_drop if higher else reference_value + target.max_drop
    return Goal(target.metric, float(threshold), float(reference_value), higher)


def base_candidates(config, has_calibration: bool) -> list[Settings]:
    space = config.search
    user_ops = tuple(config.op_types) if config.op_types else None
    out = []
    for mode in space.modes:
        if mode == "static" and not has_calibration:
            continue
        for per_channel in space.per_channel:
            for alpha in space.smoothquant:
                methods = space.calibration if mode == "static" else ["minmax"]
                for method in methods:
                    ops = user_ops if (mode == "dynamic" or user_ops) else tuple(STATIC_COMPUTE_OPS)
                    out.append(Settings(mode, per_channel, method, alpha, frozenset(), ops))
    return out


def graph_ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def is_cnn(ops: dict[str, int]) -> bool:
    return ops.get("Conv", 0) + ops.get("ConvTranspose", 0) > 0


def cnn_candidates(config, ops: dict[str, int], has_calibration: bool, reduce_range: bool, tail: frozenset[str]):
    """Static QDQ on the BatchNorm-folded graph, one candidate per op-type subset, plus symmetric activations.

    `reduce_range` is isa.choose_int8's (the recipe's, else this CPU's). Axes the user set in `search` are kept; the others take CNN defaults (per-channel, no SmoothQuant)."""
    space = config.search
    chosen = space.model_fields_set
    if not has_calibration:
        return []
    per_channel = space.per_channel if "per_channel" in chosen else [True]
    subsets: list[tuple[str, ...] | None] = []
    if config.op_types:
        subsets.append(tuple(config.op_types))
    else:
        for subset in CNN_OP_SUBSETS:
            present = None if subset is None else tuple(o for o in subset if ops.get(o))
            if present != () and present not in subsets:
                subsets.append(present)
    out = []
    for ops_subset in subsets:
        for pc in per_channel:
            for method in space.calibration:
                exclude = tail if ops_subset is None else frozenset()
                out.append(
                    Settings("static", pc, method, None, exclude, ops_subset, reduce_range, False, source="folded")
                )
    # Symmetric uint8 activations (zero point 128) for the widest subset: fuses like asymmetric, ranges differ.
    if out:
        out.append(replace(out[-1], activation_symmetric=True))
    return out


def fold_batchnorm(source: Path, target: Path) -> Path:
    """BatchNorm folded into the convs (and constants folded): ONNX Runtime's offline basic-level optimization,
    which writes only standard ONNX ops, so any runtime loads it. Unnamed nodes get names (the profile maps the
    session's nodes back to them). The source is returned unchanged if ORT cannot write the model."""
    import onnx
    import onnxruntime as ort

    from optcli.onnx_check import name_nodes

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        proto = onnx.load(str(target))
    except Exception:  # an optimization, never a reason to fail the search
        target.unlink(missing_ok=True)
        return source
    name_nodes(proto)
    onnx.save(proto, str(target))
    return target


def output_tail(path: Path) -> frozenset[str]:
    """Nodes between the last compute op and a graph output (decode, post-processing).

    Left fp32 in the all-ops candidate: a detector's output concatenates box coordinates (0..320) with class scores
    (0..1), and one int8 scale for both rounds every score to 0 (seen on YOLOv8n: box F1 0 at cosine 0.9997)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    tail: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in tail or node.op_type in STATIC_COMPUTE_OPS:
            continue
        tail.add(node.name)
        stack.extend(node.input)
    return frozenset(n for n in tail if n)


def quantizable_nodes(path: Path, settings: Settings, excluded: set[str]) -> list[str]:
    """Nodes this configuration would turn into int8: weight ops (and, for static, activation MatMuls)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    ops = set(settings.op_types or WEIGHT_OPS)
    names = []
    for node in proto.graph.node:
        if not node.name or node.name in excluded or node.op_type not in ops or node.op_type not in WEIGHT_OPS:
            continue
        has_weight = any(i in inits for i in node.input[:2])
        if node.op_type == "Gather":
            has_weight = bool(node.input) and node.input[0] in inits
        if has_weight or (settings.mode == "static" and node.op_type == "MatMul"):
            names.append(node.name)
    return names


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
        self.smooth_batches = calib_batches or _head(evaluation.batches, self.space.sensitivity_samples)
        self.started = self.clock()
        self.trials: list[Trial] = []
        self.work = ctx.step_dir / "candidates"
        self.work.mkdir(exist_ok=True)
        self.sensitivity: dict[str, float] = {}
        self.quantizable_count: int | None = None
        self.notes: list[str] = []
        self.plan: dict = {}  # planned candidates, cap, budget and, after the first trial, the estimate
        self.skipped: list[dict] = []  # candidates not tried: how many, and why

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

    # ----------------------------------------------------------------- trials
    def _write(self, settings: Settings, tag: str) -> Path:
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
            trial.path = self._write(settings, tag)
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
            best=f"{best.name} {_fmt(best.metric)}" if best is not None else None,
            time=f"{_minutes(self.elapsed())} of {_minutes(self.space.time_budget_s)}",
        )
        self.ctx.log(
            f"{self.ctx.step_name}: {trial.name}: {self.goal.metric} {_fmt(trial.metric)}, p50 {_fmt(trial.latency_ms)} ms"
            f"{' (meets target)' if trial.meets else ''}"
        )
        return trial

    def _drop_losers(self) -> None:
        """Delete written candidates that can no longer be chosen (disk: one int8 model per trial adds up)."""
        keep = {id(self.choose())}
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

    def can_try(self) -> bool:
        return self.trials_used() < self.space.max_trials and not self.budget_spent()

    # ----------------------------------------------------------------- sensitivity + fallback
    def rank(self, base: Settings, nodes: list[str]) -> list[str]:
        """Quantize-one-node sensitivity: metric lost when only this node is int8 (subset of data.eval)."""
        n = self.space.sensitivity_samples
        count = sum(len(next(iter(b.values()))) for b in _head(self.ev.batches, n))
        reference_value = self.ev.score([r[:count] for r in self.ev.reference])
        for i, node in enumerate(nodes):
            if self.out_of_budget():
                self.notes.append(
                    f"time budget reached while ranking: {len(nodes) - i} of {len(nodes)} nodes unranked (ranked last)"
                )
                break
            others = frozenset(x for x in nodes if x != node) | base.exclude
            path = self._write(replace(base, exclude=others), "sensitivity")
            try:
                value, _ = self.ev.measure(path, subset=n, timed=False)
            except Exception as e:
                self.ctx.warn(f"sensitivity of {node} not measured: {type(e).__name__}: {str(e)[:120]}")
                continue
            drop = reference_value - value if self.goal.higher_better else value - reference_value
            self.sensitivity[node] = float(drop)
        shutil.rmtree(self.work / "sensitivity", ignore_errors=True)
        return sorted(nodes, key=lambda x: -self.sensitivity.get(x, float("-inf")))

    def fallback(self, base: Trial, best_latency: float | None) -> None:
        nodes = quantizable_nodes(self.sources[base.settings.source], base.settings, set(base.settings.exclude))
        if not nodes:
            return
        limit = int(self.space.max_fallback_fraction * len(nodes))
        self.ctx.log(f"{self.ctx.step_name}: ranking {len(nodes)} nodes by sensitivity ({base.name})")
        order = self.rank(base.settings, nodes)
        self.quantizable_count = len(nodes)
        for k in range(1, limit + 1):
            if not self.can_try():
                self.notes.append(
                    "fallback stopped: " + ("time budget reached" if self.budget_spent() else "max_trials reached")
                )
                return
            trial = self.try_settings(replace(base.settings, exclude=base.settings.exclude | frozenset(order[:k])))
            trial.slower_in_int8 = list(base.slower_in_int8)
            if trial.meets:
                return
            if best_latency is not None and trial.latency_ms is not None and trial.latency_ms > best_latency:
                self.notes.append(
                    f"fallback stopped at {k} nodes: already slower than a candidate that meets the target"
                )
                return
        self.notes.append(
            f"fallback stopped at the limit of {limit} nodes (max_fallback_fraction {self.space.max_fallback_fraction})"
        )

    # ----------------------------------------------------------------- latency fallback (profile)
    def profile_of(self, path: Path) -> prof.Profile:
        key = str(path)
        if key not in self.profiles:
            runs = max(self.ev.latency_runs, 5)
            self.profiles[key] = prof.profile(path, self.ev.profile_feeds(), self.ev.threads, runs=runs)
        return self.profiles[key]

    def compare(self, trial: Trial) -> prof.Comparison:
        """fp32 vs int8 cost per region, the fp32 side profiled on the graph the candidate was written from."""
        source = self.sources[trial.settings.source]
        return prof.compare(source, self.profile_of(source), trial.path, self.profile_of(trial.path))

    def latency_fallback(self, trial: Trial, rounds: int = 2) -> None:
        """Write the regions the profile shows slower in int8 back in fp32; re-measure; repeat while it pays."""
        current = trial
        for _ in range(rounds):
            if current.path is None or current.settings is None or not self.can_try():
                return
            source = self.sources[current.settings.source]
            quantized = set(quantizable_nodes(source, current.settings, set(current.settings.exclude)))
            try:
                comparison = self.compare(current)
            except Exception as e:  # the profiler is an aid; a model it cannot profile is still measured end to end
                self.notes.append(f"latency fallback skipped: profiling failed ({type(e).__name__}: {str(e)[:120]})")
                return
            slow = comparison.slower(quantized)
            if not slow:
                self.notes.append(
                    f"latency fallback: no int8 region of {current.name} is slower than fp32 in the profile"
                )
                return
            cost = {r["node"]: r for r in comparison.rows}
            if set(slow) >= quantized:
                # Nothing int8 would be left: that candidate is the input with extra Q/DQ, not an int8 model.
                self.notes.append(
                    f"latency fallback: every int8 region of {current.name} ({len(quantized)}) is slower than fp32 in "
                    "the profile; int8 does not pay for this model on this CPU"
                )
                return
            for n in slow:
                self.slow_figures[n] = {
                    "fp32_ms": cost[n]["fp32_ms"],
                    "int8_ms": cost[n]["int8_ms"],
                    "from": current.name,
                }
            extra = sum(cost[n]["int8_ms"] - cost[n]["fp32_ms"] for n in slow)
            settings = replace(
                current.settings, exclude=current.settings.exclude | frozenset(slow), tag="latency-fallback"
            )
            fallen = sorted(set(current.slower_in_int8) | set(slow))
            self.notes.append(
                f"latency fallback from {current.name}: {len(slow)} of {len(quantized)} int8 regions cost "
                f"{extra:.3f} ms more than fp32 in the profile; written back in fp32 and re-measured"
            )
            new = self.try_settings(settings)
            new.slower_in_int8 = fallen
            if new.latency_ms is None or current.latency_ms is None or new.latency_ms >= current.latency_ms:
                return
            current = new

    def stem_fallback(self, base: Trial) -> None:
        """A CNN's first convs (few channels, full resolution) are where int8 loses most accuracy and gains least
        speed: keep the first 1, 2, 4, 8 ... compute nodes fp32 until the target holds. One trial per step, so it
        fits a budget that ranking every node by sensitivity (one quantization per node) does not."""
        source = self.sources[base.settings.source]
        nodes = quantizable_nodes(source, base.settings, set(base.settings.exclude))
        limit = int(self.space.max_fallback_fraction * len(nodes))
        k = 1
        while k <= limit and self.can_try():
            trial = self.try_settings(
                replace(base.settings, exclude=base.settings.exclude | frozenset(nodes[:k]), tag=f"stem-fp32x{k}")
            )
            trial.slower_in_int8 = list(base.slower_in_int8)
            self.stem_fp32 |= set(nodes[:k])
            if trial.meets:
                self.notes.append(f"stem fallback: the first {k} compute nodes in fp32 meet the target")
                return
            k *= 2
        self.notes.append("stem fallback: the target was not met with up to " + f"{k // 2} leading nodes in fp32")

    # ----------------------------------------------------------------- the search
    def run(self, candidates: list[Settings]) -> tuple[Trial, Trial]:
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
                self.skip(
                    len(candidates) - i,
                    f"the remaining time budget ({_minutes(left)}) is less than one trial (~{_minutes(self.seconds_per_trial())})",
                )
                break
            self.try_settings(settings)
            if self.trials_used() == 1:
                pace = self.seconds_per_trial()
                self.plan["seconds_per_trial"] = round(pace, 3)
                self.plan["estimate_s"] = round(estimate_s(pace, planned, budget), 3)
                self.plan["line"] = plan_line(planned, self.space.max_trials, budget, pace)
                self.ctx.log(f"{self.ctx.step_name}: {self.plan['line']}")
        # What hand-tuning found on MiniLM: ORT's pre-processing can make the int8 graph slower; try the best without it.
        best = self.choose()
        if best is not None and "raw" in self.sources and best.settings.source == "input" and self.can_try():
            self.try_settings(replace(best.settings, source="raw"))
        best = self.choose()
        if best is not None and self.space.fallback and self.can_try():
            self.latency_fallback(best)
        best = self.choose()
        if best is not None and not best.meets and best.settings.source == "folded" and self.space.fallback:
            self.stem_fallback(best)
        done = [t for t in self.trials if t.settings is not None and t.metric is not None]
        if self.space.fallback and done and not any(t.meets for t in done) and not self.can_try():
            self.notes.append(
                "fallback skipped: " + ("time budget reached" if self.budget_spent() else "max_trials reached")
            )
        if self.space.fallback and done and self.can_try():
            meeting = [t for t in done if t.meets]
            # A candidate whose latency could not be measured ranks by its metric alone (no None < None).
            best_latency = min((t.latency_ms for t in meeting if t.latency_ms is not None), default=None)
            # Fallback can only pay off from a candidate faster than the best one that already meets the target.
            ceiling = (
                best_latency
                if best_latency is not None
                else (fp32.latency_ms if not self.config.allow_slower else None)
            )
            # Within timing noise (5%) of the ceiling, falling back nodes can only lose: skip those.
            pool = [t for t in done if not t.meets and (ceiling is None or (t.latency_ms or 0) < NOISE * ceiling)]
            if pool:
                base = max(pool, key=lambda t: t.metric if self.goal.higher_better else -t.metric)
                self.fallback(base, best_latency)
        chosen = self.choose()
        if chosen is None:
            raise RuntimeError(
                "no int8 candidate could be written and measured: "
                + "; ".join(t.error or "" for t in self.trials if t.error)[:400]
            )
        return fp32, chosen

    def choose(self) -> Trial | None:
        done = [
            t
            for t in self.trials
            if t.settings is not None and t.metric is not None and np.isfinite(t.metric) and t.path is not None
        ]
        if not done:
            return None
        meeting = [t for t in done if t.meets]
        if meeting:
            return min(meeting, key=lambda t: t.latency_ms if t.latency_ms is not None else float("inf"))
        best = done[0]
        for t in done[1:]:
            if self.goal.better(t.metric, best.metric):
                best = t
        return best


def evaluation_for(model, config, ctx, metric: str | None = None) -> Evaluation:
    """data.eval batches, their labels, and the original model's outputs on them; scored by metric (default: the
    target's)."""
    from optcli.errors import PassFailed

    data = ctx.data.eval
    spec = ctx.recipe.report.latency
    fixed = fixed_batch(model.inputs)
    pairs = list(data.batches(batch_size=fixed or data.batch_size, limit=config.search.eval_samples))
    batches = [feeds for feeds, _ in pairs]
    labels = np.concatenate([y for _, y in pairs]) if data.labels is not None else None
    metric = metric or config.target.metric
    if metric not in FIDELITY_METRICS and labels is None:
        raise PassFailed(
            ctx.step_name,
            f"target metric {metric} needs labels in data.eval (set data.eval.labels), or use metric: cosine",
        )
    reference = predict(runner_for(ctx.reference, spec.threads), batches)
    return Evaluation(
        batches,
        labels,
        metric,
        reference,
        model.inputs,
        spec.threads,
        fixed or max(spec.batch_sizes),
        config.search.latency_runs,
        max(1, min(spec.warmup, 10)),
    )


def run_search(model, config, ctx, source: Path, target: Path, exclude: set[str], calib) -> None:
    """Run the search, write the chosen model to `target`, and record the search block and its gates in ctx.details."""
    ev = evaluation_for(model, config, ctx)
    goal = make_goal(config.target, ev.score(ev.reference))
    cache = {"dir": ctx.step_dir / "candidates"}
    cache["dir"].mkdir(exist_ok=True)
    sources: dict[str, Path] = {}
    ops = graph_ops(source)
    notes: list[str] = []
    explicit_modes = "modes" in config.search.model_fields_set
    if is_cnn(ops) and (not explicit_modes or "static" in config.search.modes):
        sources["folded"] = fold_batchnorm(source, cache["dir"] / "bn_folded.onnx")
        int8 = choose_int8(config, ctx.recipe.report.target)  # the recipe's reduce_range, else this CPU's
        candidates = cnn_candidates(config, ops, calib is not None, int8.reduce_range, output_tail(sources["folded"]))
        candidates = [replace(c, exclude=c.exclude | frozenset(exclude)) for c in candidates]
        notes.append(
            f"CNN candidates: static QDQ on the BatchNorm-folded graph ({ops.get('BatchNormalization', 0)} BatchNormalization "
            f"in the input), reduce_range {int8.reduce_range} ({int8.chosen_by['reduce_range']}: {int8.reason})"
        )
        if "dynamic" in config.search.modes:
            notes.append(DYNAMIC_CONV_NOTE)
            weights = tuple(o for o in ("MatMul", "Gemm") if ops.get(o))
            if explicit_modes and weights:  # asked for: dynamic on the MatMul/Gemm part only, never on Conv
                candidates.append(Settings("dynamic", True, "minmax", None, frozenset(exclude), weights))
        if calib is None:
            ctx.warn("search: this CNN needs data.calibration for static int8 candidates")
    else:
        candidates = [replace(c, exclude=frozenset(exclude)) for c in base_candidates(config, calib is not None)]
        if is_cnn(ops):
            notes.append(
                DYNAMIC_CONV_NOTE.replace("skipped", "asked for").replace(
                    "static QDQ is tried instead", "search.modes has no static"
                )
            )
            ctx.warn("search.modes without static on a CNN: " + DYNAMIC_CONV_NOTE.split(": ", 1)[1])
    if config.preprocess and Path(source) != Path(model.path) and not is_cnn(ops):
        sources["raw"] = Path(model.path)
    if "static" in config.search.modes and calib is None:
        ctx.warn("search: static candidates skipped (no data.calibration)")

    def write(src, dst, settings, calib_batches, smooth_batches):
        return quantize_onnx(src, dst, settings, config, calib_batches, smooth_batches, ctx, cache=cache)

    search = Search(config, ctx, source, model, write, ev, goal, calib, sources)
    search.notes.extend(notes)
    planned = min(len(candidates), config.search.max_trials)
    with ctx.progress.task(f"{ctx.step_name}: search trials", total=planned) as search.progress:
        fp32, chosen = search.run(candidates)
    chosen_source = search.sources[chosen.settings.source]
    if search.quantizable_count is None:
        search.quantizable_count = len(quantizable_nodes(chosen_source, chosen.settings, set(exclude)))
    searched_s = search.elapsed()  # the budget governs trials; the profile of the chosen model is timed on its own
    profile_block = chosen_profile(search, chosen, exclude, cache)
    if profile_block is not None:
        profile_block["seconds"] = round(search.elapsed() - searched_s, 3)
    shutil.copyfile(chosen.path, target)
    shutil.rmtree(search.work, ignore_errors=True)
    ratio = time_ratio(source, target, ev)
    speed = faster_verdict(ratio)
    faster = speed == HOLDS
    if chosen.latency_ms is None:
        search.notes.append(
            f"latency not measured at batch {ev.latency_batch}: candidates ranked by {goal.metric} alone"
        )
    fallen = sorted(chosen.settings.exclude - frozenset(exclude), key=lambda n: -search.sensitivity.get(n, 0.0))
    ctx.details["search"] = {
        "metric": goal.metric,
        "target": goal.threshold,
        "baseline": goal.baseline,
        "higher_is_better": goal.higher_better,
        "chosen": chosen.name,
        "chosen_config": chosen.settings.summary(),
        "candidates": [t.row(t is chosen) for t in search.trials],
        "fallback_nodes": [
            {"node": n, "sensitivity": round(search.sensitivity[n], 6) if n in search.sensitivity else None}
            for n in fallen
        ],
        "quantizable_nodes": search.quantizable_count,
        "sensitivity": {n: round(v, 6) for n, v in sorted(search.sensitivity.items(), key=lambda kv: -kv[1])},
        "fp32_latency_ms": fp32.latency_ms,
        "versus_fp32": None
        if ratio is None
        else {
            "time_ratio": round(ratio.value, 4),
            "interval": ratio.interval,
            "verdict": speed,
            "rounds": ratio.rounds,
            "runs": ratio.runs,
        },
        "latency_batch": ev.latency_batch,
        "threads": ev.threads,
        "trials": search.trials_used(),
        "seconds": round(searched_s, 3),
        "notes": search.notes,
        "plan": search.plan,
        "skipped": {"count": sum(s["count"] for s in search.skipped), "why": [s["why"] for s in search.skipped]},
        "latency_fallback_nodes": [{"node": n, **search.slow_figures.get(n, {})} for n in chosen.slower_in_int8],
        "profile": profile_block,
    }
    screened = sorted({t for k, v in cache.items() if k != "dir" and k[0] == "inf" for t in v})
    if screened:
        ctx.details["nonfinite_tensors"] = screened
        ctx.warn(
            f"static candidates: {len(screened)} tensors hold inf/NaN/huge values on calibration data (e.g. attention masks); "
            "the nodes touching them were left in float"
        )
    relation = ">=" if goal.higher_better else "<="
    gates = [
        {
            "name": f"target {goal.metric} {relation} {goal.threshold:.6g}",
            "limit": goal.threshold,
            "value": round(chosen.metric, 6),
            "passed": chosen.meets,
        }
    ]
    if not chosen.meets:
        ctx.warn(
            f"no candidate met {goal.metric} {relation} {goal.threshold:.6g}; kept the best, {chosen.name} "
            f"({goal.metric} {chosen.metric:.6g}, p50 {_fmt(chosen.latency_ms)} ms vs fp32 {_fmt(fp32.latency_ms)} ms)"
        )
    side_by_side = (
        f"side by side int8/fp32 time {ratio.value:.3f}× (95% interval {ratio.interval[0]}-{ratio.interval[1]}, "
        f"{ratio.rounds} rounds)"
        if ratio is not None
        else "not timed side by side"
    )
    if not faster:
        note = (
            f"int8 is not faster than fp32 here: {chosen.name} p50 {_fmt(chosen.latency_ms)} ms vs fp32 {_fmt(fp32.latency_ms)} ms "
            f"(batch {ev.latency_batch}, {ev.threads} threads); {side_by_side}"
        )
        if speed == INCONCLUSIVE:
            note += f": inconclusive, {INCONCLUSIVE_HINT}"
        if profile_block:
            note += (
                f"; profiled kernel time int8 {profile_block['int8_total_ms']:.3f} ms vs fp32 {profile_block['fp32_total_ms']:.3f} ms, "
                f"{profile_block['fused']['int8_kernels']} int8 kernels and {profile_block['fused']['quantize_linear']} "
                f"QuantizeLinear / {profile_block['fused']['dequantize_linear']} DequantizeLinear in the session"
            )
        ctx.warn(
            note
            + ("; kept because allow_slower: true" if config.allow_slower else "; set allow_slower: true to accept it")
        )
    if not config.allow_slower:
        # The verdict, not `passed`, is the pass's word: the run turns inconclusive into passed as the user chose.
        gates.append(
            {
                "name": "int8 faster than fp32",
                "limit": 1.0,
                "value": round(ratio.value, 4) if ratio is not None else None,
                "interval": ratio.interval if ratio is not None else None,
                "verdict": speed,
                "passed": speed != FAILS,
                "note": note if not faster else f"int8/fp32 time ratio at batch {ev.latency_batch}; {side_by_side}",
            }
        )
    ctx.details["gates"] = gates
    ctx.log(
        f"{ctx.step_name}: chose {chosen.name} ({goal.metric} {chosen.metric:.6g}, p50 {_fmt(chosen.latency_ms)} ms, fp32 {_fmt(fp32.latency_ms)} ms)"
    )


def chosen_profile(search: Search, chosen: Trial, exclude: set[str], cache: dict) -> dict | None:
    """The report's view of what the session runs for the chosen model: per-op-type and per-region fp32 vs int8 ms,
    which compute nodes stayed fp32 and why."""
    source = search.sources[chosen.settings.source]
    try:
        comparison = search.compare(chosen)
    except Exception as e:
        search.notes.append(f"profile of the chosen model not taken ({type(e).__name__}: {str(e)[:120]})")
        return None
    every = set(quantizable_nodes(source, replace(chosen.settings, exclude=frozenset()), set()))
    quantized = set(quantizable_nodes(source, chosen.settings, set(chosen.settings.exclude)))
    nonfinite = {n for k, v in cache.items() if k != "dir" and k[0] == "inf" for n in v}
    why: dict[str, str] = {}
    for node in every - quantized:
        if node in exclude:
            why[node] = "excluded in the recipe"
        elif node in chosen.slower_in_int8:
            why[node] = "slower in int8 here (profile)"
        elif node in search.sensitivity:
            why[node] = "accuracy (sensitivity fallback)"
        elif node in search.stem_fp32:
            why[node] = "accuracy (first convs kept fp32)"
        elif node in nonfinite:
            why[node] = "inf/NaN on calibration data"
    fp32_nodes = set(why)
    ordered = sorted(comparison.rows, key=lambda r: -abs(r["int8_ms"] - r["fp32_ms"]))
    return {
        "fp32_total_ms": round(comparison.fp32_total_ms, 4),
        "int8_total_ms": round(comparison.int8_total_ms, 4),
        "unattributed_ms": {"fp32": round(comparison.fp32_other_ms, 4), "int8": round(comparison.int8_other_ms, 4)},
        "fused": prof.fused_counts(comparison.session_ops),
        "session_ops": comparison.session_ops,
        "op_types": prof.op_type_table(comparison, quantized, why),
        "regions": [
            {**r, "int8": r["node"] in quantized, "why_fp32": why.get(r["node"])}
            for r in ordered[:40]
            if r["node"] in quantized or r["node"] in fp32_nodes or r["node"] in every
        ],
    }


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"
