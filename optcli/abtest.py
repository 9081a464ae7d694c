"""Interleaved A/B latency: is B faster than A, and how sure are we?

Two p50s taken minutes apart compare the machine's load at two moments as much as the models (a shared CI
runner: "1.24× slower", then "1.66× faster" for the same recipe). Here the models run in one process, in
alternating order within each round, so a burst of other work hits both alike; each round gives one ratio B/A
of per-round medians, and the rounds give a confidence interval on the ratio. A verdict against a limit is then
one of holds / fails / inconclusive (the interval straddles the limit: the machine was too noisy to say).

numpy/scipy only; runners are plain callables so tests drive it with fake clocks.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from optcli.report.summary import INCONCLUSIVE_HINT  # noqa: F401 (said with every inconclusive verdict)

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
CONFIDENCE = 0.95
MIN_ROUNDS, MAX_ROUNDS = 5, 20
# Each round runs a model at least this long. The t-interval assumes rounds see independent states of the machine;
# a tiny model's 30 calls take ~2 ms, so a whole A/B fitted inside one burst of other work (or one CPU frequency
# step) and gave intervals that excluded each other run to run (digits CNN at b1: 0.97 [0.95-0.99], then
# 1.03 [1.02-1.04]). Spread over 5-20 rounds of >= 25 ms each, the rounds sample the machine's states.
MIN_ROUND_SECONDS = 0.025
MAX_RUNS_PER_ROUND = 2000


def rounds_for(runs: int) -> tuple[int, int]:
    """(rounds, runs per round) from report.latency.runs: about the same number of timed calls per model as the
    recipe's latency loop, so the recipe's setting still governs the cost (and a tiny test recipe stays cheap)."""
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, runs // 5))
    return rounds, max(1, runs // rounds)


def _wall(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


@dataclass
class Ratio:
    """B/A time ratio: the point estimate (geometric mean over rounds) and its confidence interval."""

    value: float
    low: float
    high: float
    rounds: int
    runs: int
    logs: tuple[float, ...] = field(default=(), repr=False)  # the per-round log-ratios, for pooling two A/Bs

    @property
    def interval(self) -> list[float]:
        return [round(self.low, 4), round(self.high, 4)]


def pooled(first: Ratio, second: Ratio, confidence: float = CONFIDENCE) -> Ratio | None:
    """One interval over the rounds of two A/Bs of the same pair (twice the rounds: about 1/sqrt(2) as wide); None
    when either kept no rounds."""
    if not first.logs or not second.logs:
        return None
    logs = np.asarray(first.logs + second.logs)
    return ratio_interval(np.ones(len(logs)), np.exp(logs), first.runs, confidence)


def interleaved(
    calls: Sequence[Callable[[], object]],
    rounds: int,
    runs: int,
    warmup: int = 1,
    timer: Callable[[Callable[[], object]], float] = _wall,
) -> np.ndarray:
    """Per-round median time of each call, shape (rounds, len(calls)). In each round every model runs `runs`
    times, the models alternating call by call (A B A B ..., the order reversed every other round so neither
    always runs right after the other). timer(call) -> seconds; the default wraps perf_counter around the call."""
    for call in calls:
        for _ in range(warmup):
            call()
    medians = np.empty((rounds, len(calls)))
    for r in range(rounds):
        order = list(range(len(calls)))
        if r % 2:
            order.reverse()
        times: list[list[float]] = [[] for _ in calls]
        for _ in range(runs):
            for i in order:
                times[i].append(timer(calls[i]))
        medians[r] = [np.median(t) for t in times]
    return medians


def ratio_interval(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, runs: int = 1, confidence: float = CONFIDENCE
) -> Ratio:
    """B/A from paired per-round times: a t-interval on the mean of the per-round log-ratios, exponentiated.

    Why t on log-ratios and not a bootstrap: the rounds are paired (A and B share the machine's state within a
    round), a log makes the ratio's noise symmetric (2× slower and 2× faster are equally far from 1), and with the
    5-20 rounds a latency budget allows, a percentile bootstrap gives intervals too narrow (it cannot see beyond
    the few values it resamples) and varies from seed to seed, while the t-interval is exact for normal
    log-ratios and deterministic."""
    # scipy.special's t quantile, not scipy.stats.t.ppf: the same function underneath, and importing scipy.stats costs
    # every CLI process ~1 s more (measured: 0.4 s vs 1.1-1.7 s).
    from scipy.special import stdtrit

    logs = np.log(np.asarray(b, dtype=float)) - np.log(np.asarray(a, dtype=float))
    logs = logs[np.isfinite(logs)]
    n = len(logs)
    if n == 0:
        return Ratio(math.nan, math.nan, math.nan, 0, runs)
    mean = float(logs.mean())
    kept = tuple(float(x) for x in logs)
    if n < 2:
        return Ratio(math.exp(mean), 0.0, math.inf, n, runs, kept)
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * float(logs.std(ddof=1)) / math.sqrt(n)
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n, runs, kept)


def measure_ratios(
    calls: Sequence[Callable[[], object]],
    rounds: int,
    runs: int,
    warmup: int = 1,
    timer: Callable[[Callable[[], object]], float] = _wall,
) -> list[Ratio]:
    """Each call's time over the first one's, all interleaved in the same rounds in one process."""
    medians = interleaved(calls, rounds, runs, warmup, timer)
    return [ratio_interval(medians[:, 0], medians[:, i], runs) for i in range(1, len(calls))]


def verdict_at_most(low: float, high: float, limit: float) -> str:
    """For a value that must stay <= limit (a time ratio, a regression): the whole interval decides."""
    if not (math.isfinite(low) or math.isfinite(high)):
        return INCONCLUSIVE
    if high <= limit:
        return HOLDS
    if low > limit:
        return FAILS
    return INCONCLUSIVE


def verdict_at_least(low: float, high: float, limit: float) -> str:
    """For a value that must reach limit (a speed-up)."""
    if not (math.isfinite(low) or math.isfinite(high)):
        return INCONCLUSIVE
    if low >= limit:
        return HOLDS
    if high < limit:
        return FAILS
    return INCONCLUSIVE


def worst(verdicts: Sequence[str]) -> str:
    """One verdict for several batch sizes: any failure fails, any doubt leaves it inconclusive."""
    if FAILS in verdicts:
        return FAILS
    if INCONCLUSIVE in verdicts or not verdicts:
        return INCONCLUSIVE
    return HOLDS


def passed(verdict: str, inconclusive: str = "pass") -> bool:
    """A verdict as the exit code sees it: inconclusive counts as the user chose (gates.inconclusive / --inconclusive)."""
    return verdict == HOLDS or (verdict == INCONCLUSIVE and inconclusive == "pass")


# --------------------------------------------------------------------------- runners on files


def feeds_for(inputs, batch: int) -> dict:
    from optcli.model import example_inputs

    return example_inputs(inputs, batch=batch, seed=batch)


def takes_batch(inputs, batch: int) -> bool:
    """The one batch decision of model.py (a state's pinned axis, a scalar, a batch-less input), as latency uses it."""
    from optcli.model import batch_refusal

    return batch_refusal(inputs, batch) is None


def runs_per_round(calls: Sequence[Callable[[], object]], runs: int, timer=_wall) -> int:
    """At least `runs`, and enough that a round (every model, calls alternating) lasts MIN_ROUND_SECONDS; a probe of
    3 calls each, after the warm-up, sizes it. Sized on the sum: a model 100x slower than the other is not run
    100x more often, and the alternation spreads each model's calls over the whole round anyway."""
    cost = sum(float(np.median([timer(call) for _ in range(3)])) for call in calls)
    if cost <= 0 or not math.isfinite(cost):
        return runs
    return max(runs, min(MAX_RUNS_PER_ROUND, math.ceil(MIN_ROUND_SECONDS / cost)))


def race(base, others: Sequence, batch: int, warmup: int, runs: int, timer=_wall) -> list[Ratio] | None:
    """Each of `others` over `base` at one batch size, all of them interleaved in the same rounds (one call of each
    per turn, the order reversed every other round): several candidates ranked by one measurement, not by p50s
    taken one after another. None when a model does not take the batch."""
    models = [base, *others]
    if not all(takes_batch(m.inputs, batch) for m in models):
        return None
    feeds = feeds_for(base.inputs, batch)
    calls = [functools.partial(m, feeds) for m in models]
    for call in calls:
        for _ in range(max(1, min(warmup, 10))):
            call()
    rounds, per_round = rounds_for(runs)
    return measure_ratios(calls, rounds, runs_per_round(calls, per_round, timer), 0, timer)


def compare_runners(base, new, batch_sizes: Sequence[int], warmup: int, runs: int, timer=_wall) -> dict[str, Ratio]:
    """new/base time ratio per batch size the models take (measure.Runner objects on the same inputs)."""
    out = {}
    for batch in batch_sizes:
        ratios = race(base, [new], batch, warmup, runs, timer)
        if ratios:
            out[f"batch_{batch}"] = ratios[0]
    return out
