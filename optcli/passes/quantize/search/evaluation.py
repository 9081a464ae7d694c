"""How the search measures a written candidate: its metric on data.eval against the reference model's outputs, its
p50 latency at the search's batch and threads, and int8 against fp32 timed side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optcli.abtest import race
from optcli.measure import (
    FIDELITY_METRICS,
    fidelity,
    fidelity_metric,
    latency,
    metric_value,
    onnx_runner,
    predict,
    runner_for,
)
from optcli.model import fixed_batch


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
        assert self.labels is not None, "a metric other than fidelity is refused without labels (eval_set)"
        return metric_value(self.metric, outputs, self.labels[:n])

    def measure(self, path: Path, subset: int | None = None, timed: bool = True) -> tuple[float, float | None]:
        runner = onnx_runner(path, self.inputs, self.threads)
        batches = self.batches if subset is None else head(self.batches, subset)
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
    ratios = race_ratios(fp32, [int8], ev)
    return ratios[0] if ratios else None


def race_ratios(fp32: Path, contenders: list[Path], ev: Evaluation) -> list | None:
    """Each contender's time over fp32's (abtest.Ratio), all sessions interleaved in the same rounds at the search's
    batch, threads and runs: the search chooses between near-equal candidates by this, not by their p50s."""
    base = onnx_runner(fp32, ev.inputs, ev.threads)
    others = [onnx_runner(p, ev.inputs, ev.threads) for p in contenders]
    return race(base, others, ev.latency_batch, ev.latency_warmup, ev.latency_runs)


def head(batches: list[dict], n: int) -> list[dict]:
    """The first batches holding at least n samples (fewer when data.eval has fewer)."""
    out, total = [], 0
    for feeds in batches:
        if total >= n:
            break
        out.append(feeds)
        total += len(next(iter(feeds.values())))
    return out


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
