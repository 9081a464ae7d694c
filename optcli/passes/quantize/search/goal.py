"""What the search aims for and how a trial is judged against it: the target as a threshold on the baseline, which
trial wins, and the int8-versus-fp32 speed verdict. Pure decisions, no model run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from optcli.abtest import FAILS, HOLDS, INCONCLUSIVE
from optcli.config import higher_is_better
from optcli.measure import FIDELITY_METRICS


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

    def relation(self) -> str:
        return ">=" if self.higher_better else "<="


def make_goal(target, reference_value: float) -> Goal:
    """The recipe's target (min_value, or max_drop / max_increase from the reference model's own score) as a
    threshold."""
    if target.metric in FIDELITY_METRICS:
        higher = FIDELITY_METRICS[target.metric][1]
    else:
        higher = higher_is_better(target.metric)
    if target.min_value is not None:
        threshold = target.min_value
    elif target.max_increase is not None:  # a lower-is-better metric (the config allows it for no other)
        threshold = reference_value * (1 + target.max_increase)
    else:
        threshold = reference_value - target.max_drop if higher else reference_value + target.max_drop
    return Goal(target.metric, float(threshold), float(reference_value), higher)


def best_trial(trials: list, goal: Goal):
    """The winner among measured int8 trials still on disk: the fastest meeting the goal (an untimed one ranks
    last), else the one whose metric comes closest. None when no trial was measured."""
    done = [
        t
        for t in trials
        if t.settings is not None and t.metric is not None and np.isfinite(t.metric) and t.path is not None
    ]
    if not done:
        return None
    meeting = [t for t in done if t.meets]
    if meeting:
        return min(meeting, key=lambda t: t.latency_ms if t.latency_ms is not None else float("inf"))
    best = done[0]
    for t in done[1:]:
        if goal.better(t.metric, best.metric):
            best = t
    return best


# Trials meeting the goal whose p50 is within this factor of the fastest one's are raced side by side before one is
# chosen: p50s taken one trial after another differ by the machine's load at each moment as much as by the models
# (a shared 2-core runner moves one model's p50 by 10-30 % between trials), so closer than this they do not rank.
CONTENDER_SPREAD = 1.3
MAX_CONTENDERS = 3  # each one is another int8 model on disk and another session in the race


def contenders(trials: list, goal: Goal) -> list:
    """The trials the final choice is raced between (fastest p50 first): the ones meeting the goal, on disk and timed,
    within CONTENDER_SPREAD of the fastest; just the best trial when fewer than two qualify."""
    best = best_trial(trials, goal)
    if best is None or not best.meets or best.latency_ms is None:
        return [best] if best is not None else []
    near = sorted(
        (
            t
            for t in trials
            if t.settings is not None
            and t.meets
            and t.path is not None
            and t.latency_ms is not None
            and t.latency_ms <= CONTENDER_SPREAD * best.latency_ms
        ),
        key=lambda t: t.latency_ms,
    )
    return near[:MAX_CONTENDERS] if len(near) > 1 else [best]


def race_winner(ratios: list) -> int:
    """Index of the contender whose time over fp32's (one interleaved measurement) is lowest; ties go to the earlier
    one (the faster p50). An unmeasured ratio never wins."""
    values = [r.value if r is not None and math.isfinite(r.value) else math.inf for r in ratios]
    return min(range(len(values)), key=lambda i: (values[i], i))


def faster_verdict(ratio) -> str:
    """int8 faster than fp32: holds when the whole interval of int8/fp32 time is below 1, fails when it is at or
    above 1 (as fast at best), inconclusive when the machine's noise straddles 1."""
    if ratio is None:
        return INCONCLUSIVE
    return HOLDS if ratio.high < 1.0 else FAILS if ratio.low >= 1.0 else INCONCLUSIVE
